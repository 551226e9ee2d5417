"""Reward actors under Ray: batching across models, and a dead actor's request retried on another."""

import pytest
import ray
import torch

from actors.reward import RewardActor, RewardClient
from rewards.scenes import scene_batch

SPECS = [{"name": "compositional"}, {"name": "jpeg_compressibility", "options": {"quality": 90}}]


@pytest.fixture(scope="module")
def actors():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    handles = [ray.remote(RewardActor).options(num_cpus=0.5).remote(SPECS, 3, 1) for _ in range(2)]
    yield handles
    ray.shutdown()


def test_batched_scores_match_local_scoring_and_survive_a_dead_actor(actors):
    images, captions = scene_batch(seed=4, start=0, count=7, side=32)
    images = torch.from_numpy(images)
    local = RewardActor(SPECS, batch_size=64).score(images, captions)  # one batch, in this process
    client = RewardClient(actors, timeout_s=120, retries=1)
    remote = client.score(images, captions)  # batches of 3 in an actor
    assert set(remote) == {"compositional", "jpeg_compressibility"}
    for name in remote:
        assert torch.equal(remote[name], local[name])
    dead = actors[client._next % len(actors)]  # the actor the next request goes to dies
    ray.kill(dead)
    again = client.score(images, captions)  # ...and the request is retried on the other one
    assert torch.equal(again["compositional"], local["compositional"])
    with pytest.raises(RuntimeError, match="reward attempts failed"):
        RewardClient([dead], timeout_s=30, retries=1).score(images, captions)
