"""One update on 2 DeepSpeed ranks (Ray actors, ZeRO-2 and ZeRO-3) equals the same update on 1 rank."""

import os
from pathlib import Path

import pytest
import ray
import torch

from actors.stream import EmbeddedRedis
from learner.config import RunConfig
from learner.grpo_learner import LearnerGroup
from proxmodel.model import save_model
from tests.grpo_batch import PROMPTS, write_batch

STEPS, G = 3, 4
LR = 1e-3


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    checkpoint = str(save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "c"))
    env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "TRANSFORMERS_", "MLFLOW_", "DS_", "TOKENIZERS"))}
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})
    with EmbeddedRedis() as server:
        yield checkpoint, server
    ray.shutdown()


def one_update(checkpoint, server, world: int, stage: int, rewards=None, run_id=None,
               **grpo) -> dict[str, torch.Tensor]:
    run_id = run_id or f"w{world}s{stage}"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        write_batch(checkpoint, server.address, run_id, steps=STEPS, group_size=G, ranks=world, rewards=rewards)
    finally:
        torch.set_num_threads(previous)
    cfg = RunConfig.model_validate({
        # recompute=group: every rank re-scores in the same per-group shapes, so the only difference left is the
        # ranks' (merged, batch, shapes would add rounding that Adam amplifies on near-zero gradients; test_learner
        # bounds that on its own).
        "grpo": {"steps": STEPS, "group_size": G, "prompts_per_iteration": len(PROMPTS), "lr": LR, "recompute": "group",
                 **grpo},
        "actors": {"torch_threads": 1, "learner": {"count": world, "num_cpus": 1}},
        "deepspeed": {"zero_stage": stage},
    })
    learners = LearnerGroup(ray, cfg, checkpoint, server.address, run_id, Path(run_id))
    try:
        metrics = ray.get(learners.call("train", 0, len(PROMPTS)), timeout=300)
        bound = 0.0 if rewards is None else 1e-3 * cfg.grpo.clip_range  # uneven shards: merged, kernel rounding
        trained = len(PROMPTS) - sum(float(r.std()) == 0 for r in rewards or [])
        assert all(m["ratio_max_dev"] <= bound and m["groups_trained"] == trained for m in metrics)
        state, version = ray.get(learners.call("publish"), timeout=300)[0]
        assert version == 1
        return state
    finally:
        learners.shutdown()


def test_update_does_not_depend_on_the_number_of_ranks(cluster, tiny_model):
    checkpoint, server = cluster
    start = {k: v.float() for k, v in tiny_model.state_dict().items()}
    single = one_update(checkpoint, server, world=1, stage=2)
    moved = torch.cat([(single[k] - start[k]).flatten() for k in start]).abs()
    assert float(moved.max()) > 0.5 * LR  # Adam's first step moves parameters by about lr
    for stage in (2, 3):
        sharded = one_update(checkpoint, server, world=2, stage=stage)
        diff = torch.cat([(sharded[k] - single[k]).flatten() for k in single]).abs()
        # Float tolerance, with one allowance: Adam divides by |g| + 1e-8, so a parameter whose gradient is
        # itself at rounding level (~1e-9) moves by a visible part of lr on summation-order noise alone.
        close = float((diff <= 1e-3 * LR).float().mean())
        assert close >= 0.999 and float(diff.max()) <= 0.25 * LR, (
            f"ZeRO-{stage}, 2 ranks vs 1: {close:.5f} of parameters within 1e-3 lr, worst {float(diff.max()):.2e}"
        )


def test_zero3_ranks_with_unequal_shards_update_instead_of_hanging(cluster, tiny_model):
    """One group of four has equal rewards and is dropped, so two ZeRO-3 ranks hold 2 and 1 groups. Each network
    call gathers the weights from every rank, so per-group re-scoring (grpo.recompute=group) made 2 calls on one
    rank and 1 on the other and hung; the learner now merges such a batch. Would catch the hang (a timeout here)
    and an update that differs from one rank's on the same three groups. Adam with eps far above every gradient
    entry steps along the gradient itself (lr x g / eps), not its sign, so a loss scaled wrongly for the number of
    ranks or for shards of unequal size (each rank's loss is rescaled to the global mean) shows as a 2x step."""
    checkpoint, server = cluster
    rewards = [torch.rand(G, generator=torch.Generator().manual_seed(i)) for i in range(len(PROMPTS))]
    rewards[1] = torch.full((G,), 0.5)
    sgd = {"adam_eps": 1e3, "lr": 1e3}  # a plain gradient step of size 1 x g
    start = {k: v.float() for k, v in tiny_model.state_dict().items()}
    single = one_update(checkpoint, server, world=1, stage=2, rewards=rewards, run_id="uneven-w1", **sgd)
    sharded = one_update(checkpoint, server, world=2, stage=3, rewards=rewards, run_id="uneven-w2", **sgd)
    moved = torch.cat([(single[k] - start[k]).flatten() for k in single]).abs()
    diff = torch.cat([(sharded[k] - single[k]).flatten() for k in single]).abs()
    assert float(moved.max()) > 0 and float(diff.max()) <= 1e-2 * float(moved.max()), (diff.max(), moved.max())
