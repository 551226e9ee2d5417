"""Reward actors under Ray: batching across models, and a dead actor's request retried on another."""

import pytest
import ray
import torch

from actors.reward import RewardActor, RewardClient, ScoreCache
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


class SlowReward:
    """A reward actor whose calls take `delay_s`: the first-call model load or a loaded machine."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def ready(self) -> bool:
        return True

    def score(self, images, prompts, names=None):
        import time

        time.sleep(self.delay_s)
        return {"slow": torch.ones(len(prompts))}


class RaisingReward:
    """A reward actor whose reward code raises `error` (by default: a caption outside a verifier's grammar),
    counting its calls."""

    def __init__(self, error: Exception = ValueError("caption part 'a photo of a cat' is not in the scene grammar")):
        self.calls, self.error = 0, error

    def count(self) -> int:
        return self.calls

    def score(self, images, prompts, names=None):
        self.calls += 1
        raise self.error


def test_an_error_of_the_reward_itself_is_raised_once_not_retried(actors):
    """Would catch: the reward's own exception read as a dead actor and retried on every actor (the same error
    each time), ending in a list of tracebacks instead of the one cause."""
    raising = ray.remote(RaisingReward).options(num_cpus=0).remote()
    with pytest.raises(RuntimeError, match="reward scoring raised ValueError: caption part 'a photo of a cat'"):
        RewardClient([raising], timeout_s=60, retries=2).score(torch.zeros(1, 3, 4, 4), ["a photo of a cat"])
    assert ray.get(raising.count.remote()) == 1


def test_a_fault_of_one_reward_actors_device_is_retried_on_another(actors):
    """A GPU fault (CUDA error, out of memory) is the actor's, not the reward's: another actor is asked. Would catch
    every error inside the reward code read as deterministic (a bad GPU ending the run)."""
    faulty = ray.remote(RaisingReward).options(num_cpus=0).remote(RuntimeError("CUDA error: an illegal memory access"))
    healthy = ray.remote(SlowReward).options(num_cpus=0).remote(0.0)
    out = RewardClient([faulty, healthy], timeout_s=60, retries=1).score(torch.zeros(2, 3, 4, 4), ["a", "b"])
    assert torch.equal(out["slow"], torch.ones(2)) and ray.get(faulty.count.remote()) == 1


def test_a_slow_answer_past_the_timeout_is_still_used(actors):
    """One reward actor, 2 s per call, timeout 1.5 s, one retry. Would catch: the timed-out call abandoned and the
    retry queued behind it on the same actor (answering at 4 s, past its own 1.5 s), which failed the whole rollout."""
    slow = ray.remote(SlowReward).options(num_cpus=0).remote(2.0)
    assert ray.get(slow.ready.remote())  # started: the timing below is the calls', not the process's
    out = RewardClient([slow], timeout_s=1.5, retries=1).score(torch.zeros(2, 3, 4, 4), ["a", "b"])
    assert torch.equal(out["slow"], torch.ones(2))
    with pytest.raises(RuntimeError, match=r"no answer within 0.2 s \(actors.reward.timeout_s\)"):
        RewardClient([slow], timeout_s=0.2, retries=1).score(torch.zeros(1, 3, 4, 4), ["a"])
    ray.kill(slow)


def test_redis_cache_reuses_scores_and_scores_only_misses():
    from actors.stream import EmbeddedRedis

    images, captions = scene_batch(seed=6, start=0, count=6, side=32)
    images = torch.from_numpy(images)
    with EmbeddedRedis() as redis_server:
        actor = RewardActor(SPECS, batch_size=4, cache=redis_server.address)
        scored: list[int] = []  # images each call to the JPEG model received
        model = actor.models["jpeg_compressibility"]
        original = model.score
        model.score = lambda im, pr: scored.append(len(pr)) or original(im, pr)
        first = actor.score(images[:4], captions[:4])  # all misses
        assert scored == [4]
        again = actor.score(images[:4], captions[:4])  # all hits: the model is not called
        assert scored == [4]
        for name in first:
            assert torch.equal(again[name], first[name])  # float32 survives the JSON round trip exactly
        mixed = actor.score(images, captions)  # 4 hits, 2 misses: only the misses are scored
        assert scored == [4, 2]
        assert torch.equal(mixed["jpeg_compressibility"], RewardActor(SPECS, 64).score(images, captions)["jpeg_compressibility"])
        actor.score(images[:1], captions[1:2])  # same image, another prompt: a miss
        assert scored == [4, 2, 1]
        # Another actor on the same Redis (e.g. a second reward actor) reuses the scores...
        other = RewardActor(SPECS, batch_size=4, cache=redis_server.address)
        other_model = other.models["jpeg_compressibility"]
        other_original = other_model.score
        other_model.score = lambda im, pr: scored.append(-len(pr)) or other_original(im, pr)
        other.score(images, captions)
        assert scored == [4, 2, 1]
        # ...but a reward with other options is another model: a miss.
        changed = RewardActor([{"name": "jpeg_compressibility", "options": {"quality": 50}}], 4,
                              cache=redis_server.address)
        assert set(ScoreCache.keys(changed.specs["jpeg_compressibility"], images, captions)).isdisjoint(
            ScoreCache.keys(actor.specs["jpeg_compressibility"], images, captions))
        reweighted = {**actor.specs["jpeg_compressibility"], "weight": 3.0}  # the weight is not part of the key
        assert ScoreCache.keys(reweighted, images, captions) == ScoreCache.keys(actor.specs["jpeg_compressibility"], images, captions)
        keys = list(redis_server.address.connect().scan_iter(ScoreCache.PREFIX + "*"))  # (KEYS is disabled)
        assert len(keys) == 2 * 7  # two rewards x (6 images + 1 new prompt), nothing else


def test_a_reward_file_replaced_at_the_same_path_is_another_model_to_the_cache(tmp_path):
    """A shared Redis keeps scores for a day: an HPS checkpoint replaced by another version at the same path (or a
    model folder whose files changed) must not be answered with the old file's scores. Would catch a key made of
    the name and options alone."""
    from actors.reward import model_digest

    checkpoint = tmp_path / "HPS_v2_compressed.pt"
    checkpoint.write_bytes(b"v2")
    spec = {"name": "hpsv2", "options": {"checkpoint": str(checkpoint)}}
    images, captions = torch.zeros(2, 3, 8, 8), ["a", "b"]
    before = ScoreCache.keys(spec, images, captions)
    model_digest.cache_clear()  # a new reward actor (the identity is taken once per process)
    assert ScoreCache.keys(spec, images, captions) == before  # the same file: the same model
    checkpoint.write_bytes(b"v2.1")
    model_digest.cache_clear()
    assert set(ScoreCache.keys(spec, images, captions)).isdisjoint(before)


def test_scoring_goes_on_when_the_cache_redis_is_gone():
    """The cache is optional: with its Redis stopped (restarted, killed), scores are computed as without it. Each
    call raised redis.ConnectionError, which the client read as a dead reward actor and failed the rollout."""
    from actors.stream import EmbeddedRedis

    images, captions = scene_batch(seed=7, start=0, count=3, side=32)
    images = torch.from_numpy(images)
    with EmbeddedRedis() as redis_server:
        actor = RewardActor(SPECS, batch_size=4, cache=redis_server.address)
        cached = actor.score(images, captions)
    fresh = actor.score(images, captions)  # the server is stopped: every read and write fails
    expected = RewardActor(SPECS, 64).score(images, captions)
    for name in expected:
        assert torch.equal(fresh[name], expected[name]) and torch.equal(cached[name], expected[name])


def test_a_rollout_whose_images_are_nonfinite_drops_its_groups_and_streams_nothing(actors, tiny_model, tmp_path):
    from actors.rollout import RolloutActor
    from actors.stream import EmbeddedRedis, ExperienceStream
    from proxmodel.model import save_model
    from tests.grpo_batch import PROMPTS

    checkpoint = str(save_model(tiny_model, tmp_path / "c"))
    weights = {"compositional": 0.5, "jpeg_compressibility": 0.5}
    with EmbeddedRedis() as server:
        rollout = RolloutActor(checkpoint, 3, 4, 1.0, 1.0, actors, weights, 120.0, 1, server.address, "nan",
                               torch_threads=1)
        stream = ExperienceStream(server.address, "nan")
        stream.create()
        healthy = rollout.rollout(PROMPTS[:2], [0, 1], iteration=0, seed=0)
        assert healthy["groups"] == 2 and healthy["dropped"] == 0
        # Each group's scores are its own images' under its own caption (would catch every group given the first
        # group's rows; a caption mix-up needs a caption-sensitive score, which this untrained model's images lack).
        local = RewardActor(SPECS, batch_size=64)
        for _, group in stream.read("check", count=2, timeout_s=5):
            expected = local.score(tiny_model.to_images(group.samples), [group.prompt] * len(group.samples))
            assert all(torch.equal(group.scores[name], expected[name]) for name in weights), group.prompt
        broken = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                  for k, v in tiny_model.state_dict().items()}
        rollout.set_weights(broken, 1)  # every image is NaN now
        result = rollout.rollout(PROMPTS[:2], [2, 3], iteration=1, seed=0)
        assert result["groups"] == 0 and result["dropped"] == 2
        assert stream.length() == 2  # only the healthy groups were written


def test_each_group_is_scored_under_its_own_caption(actors, tiny_model, clip_dir, tmp_path):
    """A rollout's groups go to the reward actors in one batch; each must come back scored against its own caption.
    CLIP's score depends on the caption, so this catches captions shuffled, shifted or shared between groups (the
    test above, on a verifier that scores an untrained model's images 0 under any caption, cannot)."""
    from actors.rollout import RolloutActor
    from actors.stream import EmbeddedRedis, ExperienceStream
    from proxmodel.model import save_model
    from tests.grpo_batch import PROMPTS

    specs = [{"name": "clip_score", "options": {"path": str(clip_dir)}}]
    clip_actors = [ray.remote(RewardActor).options(num_cpus=0.5).remote(specs, 3, 1)]
    checkpoint = str(save_model(tiny_model, tmp_path / "c"))
    prompts = PROMPTS[:3]
    with EmbeddedRedis() as server:
        rollout = RolloutActor(checkpoint, 3, 4, 1.0, 1.0, clip_actors, {"clip_score": 1.0}, 120.0, 1,
                               server.address, "clip", torch_threads=1)
        stream = ExperienceStream(server.address, "clip")
        stream.create()
        assert rollout.rollout(prompts, [0, 1, 2], iteration=0, seed=0)["groups"] == 3
        groups = [group for _, group in stream.read("check", count=3, timeout_s=5)]
    local = RewardActor(specs, batch_size=64)
    assert sorted(g.prompt for g in groups) == sorted(prompts)
    for group in groups:
        images = tiny_model.to_images(group.samples)
        own = local.score(images, [group.prompt] * len(images))["clip_score"]
        assert torch.allclose(group.scores["clip_score"], own, atol=1e-4), group.prompt
        for other in set(prompts) - {group.prompt}:  # the check can fail: another caption scores these images apart
            assert not torch.allclose(local.score(images, [other] * len(images))["clip_score"], own, atol=1e-3)
    ray.kill(clip_actors[0])


def test_a_single_reward_actor_killed_mid_call_is_restarted_and_the_call_made_again(actors):
    """With one reward actor there is no other to retry on: Ray restarts it (actors.reward_restarts) and makes the
    lost call again. Would catch: no max_restarts (the call fails), no max_task_retries (the lost call fails with the
    actor), a restarted actor scoring differently (rebuilt rewards differ from the first)."""
    import os
    import signal

    images, captions = scene_batch(seed=5, start=0, count=7, side=32)
    images = torch.from_numpy(images)
    one = ray.remote(RewardActor).options(num_cpus=0.5, max_restarts=1, max_task_retries=1).remote(SPECS, 3, 1)
    pid = ray.get(one.__ray_call__.remote(lambda self: os.getpid()))
    before = RewardClient([one], timeout_s=120, retries=0).score(images, captions)
    pending = one.score.remote(images, list(captions))
    os.kill(pid, signal.SIGKILL)
    after = ray.get(pending, timeout=120)
    assert ray.get(one.__ray_call__.remote(lambda self: os.getpid())) != pid  # a new process: it was restarted
    for name in before:
        assert torch.equal(after[name], before[name])


def test_cached_scores_expire():
    """Would catch cached scores written without a TTL (volatile-lru can then never evict them; the stream's writes
    fail)."""
    from actors.reward import RewardActor, ScoreCache
    from actors.stream import EmbeddedRedis

    with EmbeddedRedis() as server:
        actor = RewardActor([{"name": "compositional"}], 4, cache=server.address, cache_ttl_s=1234)
        actor.score(torch.rand(2, 3, 16, 16), ["a red circle", "a blue square"])
        client = server.address.connect()
        keys = list(client.scan_iter(ScoreCache.PREFIX + "*"))
        assert keys and all(0 < client.ttl(k) <= 1234 for k in keys)


def test_a_cached_score_of_zero_is_a_hit():
    """A verifier scores most untrained images 0: those scores are cached like any other. Would catch a cached
    0.0 read as a miss (rescored on every request)."""
    from actors.stream import EmbeddedRedis

    images, captions = torch.rand(3, 3, 16, 16), ["a red circle", "a blue square", "a green triangle"]
    with EmbeddedRedis() as redis_server:
        actor = RewardActor([{"name": "compositional"}], 4, cache=redis_server.address)
        keys = ScoreCache.keys(actor.specs["compositional"], images, captions)
        actor.cache.put(keys, torch.tensor([0.0, 0.0, 0.5]))
        calls = []
        model = actor.models["compositional"]
        original = model.score
        model.score = lambda im, pr: calls.append(len(pr)) or original(im, pr)
        assert torch.equal(actor.score(images, captions)["compositional"], torch.tensor([0.0, 0.0, 0.5]))
        assert calls == []


def test_a_reward_file_replaced_by_one_of_the_same_size_or_time_is_another_model(tmp_path):
    """Would catch the key made of a file's size alone (a checkpoint retrained to the same size) or of its time
    alone (a copy that kept its modification time, cp -p / rsync -t), and of a folder's own entry instead of the
    files in it."""
    import os

    from actors.reward import model_digest

    checkpoint = tmp_path / "model.pt"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"v1")
    images, captions = torch.zeros(2, 3, 8, 8), ["a", "b"]

    def keys(path):
        model_digest.cache_clear()  # a new reward actor (the identity is taken once per process)
        return set(ScoreCache.keys({"name": "hpsv2", "options": {"checkpoint": str(path)}}, images, captions))

    def replace(content: bytes, mtime_ns: int) -> None:
        checkpoint.write_bytes(content)
        os.utime(checkpoint, ns=(mtime_ns, mtime_ns))

    replace(b"v1", 10**18)
    before = keys(checkpoint)
    replace(b"v2", 2 * 10**18)  # the same size, another time
    assert keys(checkpoint).isdisjoint(before)
    before = keys(checkpoint)
    replace(b"v2.1", 2 * 10**18)  # another size, the same time
    assert keys(checkpoint).isdisjoint(before)
    before = keys(folder)
    (folder / "weights.bin").write_bytes(b"v2.1")  # rewritten in place: the folder's own entry is unchanged
    assert keys(folder).isdisjoint(before)


def test_a_reward_whose_code_changed_is_another_model_to_the_cache(tmp_path, monkeypatch):
    """A reward's thresholds live in its module: scores cached under the old code must not answer for the new.
    Would catch the module's source left out of the key."""
    import importlib.util
    import sys

    import rewards.base
    from actors.reward import model_digest

    source = tmp_path / "edited_reward.py"
    code = "from rewards.base import RewardModel\n\n\nclass Edited(RewardModel):\n    THRESHOLD = {}\n"
    images, captions = torch.zeros(2, 3, 8, 8), ["a", "b"]

    def keys(threshold):
        source.write_text(code.format(threshold))
        spec = importlib.util.spec_from_file_location("edited_reward", source)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "edited_reward", module)  # (where inspect finds a class's file)
        spec.loader.exec_module(module)
        monkeypatch.setitem(rewards.base._REGISTRY, "edited", module.Edited)
        model_digest.cache_clear()
        return set(ScoreCache.keys({"name": "edited"}, images, captions))

    assert keys(0.5) == keys(0.5) and keys(0.5).isdisjoint(keys(0.25))


def test_a_reward_actor_scores_only_the_rewards_asked_and_refuses_others():
    """A rollout asks for its weighted rewards only; an evaluation asks for its check rewards. Would catch every
    reward the actor holds being scored (and returned) whatever was asked."""
    images, captions = torch.rand(2, 3, 16, 16), ["a red circle", "a blue square"]
    actor = RewardActor(SPECS, 4)
    assert set(actor.score(images, captions, ["jpeg_compressibility"])) == {"jpeg_compressibility"}
    with pytest.raises(KeyError, match="not \\['hpsv2'\\]"):
        actor.score(images, captions, ["hpsv2"])


def test_zero_threads_means_every_core_and_memory_is_reported_in_megabytes():
    """actors.torch_threads=0 is documented as all cores; the memory log is in MB. Would catch 0 read as one
    thread, and a resident size reported in kB as MB."""
    import os

    from actors.reward import process_memory_mb, set_threads

    previous = torch.get_num_threads()
    try:
        set_threads(0)
        assert torch.get_num_threads() == (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(previous)
    assert 10 < process_memory_mb()["rss_mb"] < 64 * 1024  # this process holds torch: tens of MB at least


class CountingSlowReward(SlowReward):
    """A SlowReward that counts the calls it ran."""

    def __init__(self, delay_s: float):
        super().__init__(delay_s)
        self.calls = 0

    def count(self) -> int:
        return self.calls

    def score(self, images, prompts, names=None):
        self.calls += 1
        return super().score(images, prompts, names)


def test_an_unknown_reward_name_is_raised_once_not_retried(actors):
    """A KeyError (a reward name the actor does not hold) is the request's fault: every actor would raise it. Would
    catch KeyError read as the actor's fault and retried on every actor."""
    raising = ray.remote(RaisingReward).options(num_cpus=0).remote(KeyError("this reward actor holds ['a']"))
    with pytest.raises(RuntimeError, match="reward scoring raised KeyError"):
        RewardClient([raising], timeout_s=60, retries=2).score(torch.zeros(1, 3, 4, 4), ["a"])
    assert ray.get(raising.count.remote()) == 1
    ray.kill(raising)


def test_a_timed_out_call_is_not_copied_behind_itself(actors):
    """One reward actor, 1 s per call, timeout 0.8 s, one retry: the retry waits for the call in flight. Would catch
    a copy queued on the same actor: it starts the moment the first call answers and scores the request again for
    nothing (cancelling it then is too late), delaying every later request by a whole scoring."""
    slow = ray.remote(CountingSlowReward).options(num_cpus=0).remote(1.0)
    assert ray.get(slow.count.remote()) == 0  # started: the timing below is the calls'
    out = RewardClient([slow], timeout_s=0.8, retries=1).score(torch.zeros(1, 3, 4, 4), ["a"])
    assert torch.equal(out["slow"], torch.ones(1))
    assert ray.get(slow.count.remote()) == 1  # (a copy would have run before this call, and count 2)
    ray.kill(slow)
