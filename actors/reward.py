"""RewardActor: batched scoring with several reward models; RewardClient: timeouts and retries across actors."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import ray
import redis
import torch

from actors.redaction import redact
from actors.stream import RedisAddress
from rewards import build
from rewards.base import reward_class

log = logging.getLogger(__name__)


class ScoreCache:
    """Scores on Redis under (reward name + options, image hash, prompt): a repeated request is not rescored.

    Values are JSON floats (a float32 survives the round trip exactly); nothing is pickled. The cache is optional:
    when Redis does not answer, a read is all misses and a write is skipped (with a warning), so scoring goes on.
    """

    PREFIX = "proxrl:reward:"

    def __init__(self, address: RedisAddress, ttl_s: int):
        self.client, self.ttl_s = address.connect(), ttl_s

    @staticmethod
    def keys(spec: dict, images: torch.Tensor, prompts: Sequence[str]) -> list[str]:
        """One key per image: sha256 of the reward spec, of the image's exact values and of the prompt."""
        model = model_digest(json.dumps([spec["name"], spec.get("options", {})], sort_keys=True, default=str))
        pixels = images.detach().float().cpu().contiguous()
        out = []
        for image, prompt in zip(pixels, prompts):
            digest = hashlib.sha256(str(tuple(image.shape)).encode() + image.numpy().tobytes()).hexdigest()
            text = hashlib.sha256(prompt.encode()).hexdigest()
            out.append(f"{ScoreCache.PREFIX}{spec['name']}:{model}:{digest}:{text}")
        return out

    def get(self, keys: list[str]) -> list[Optional[float]]:
        try:
            return [None if v is None else json.loads(v) for v in self.client.mget(keys)]
        except (redis.RedisError, OSError) as e:
            self._skipped("read", e)
            return [None] * len(keys)

    def put(self, keys: list[str], scores: torch.Tensor) -> None:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key, value in zip(keys, scores.tolist()):
                    pipe.set(key, json.dumps(value), ex=self.ttl_s)
                pipe.execute()
        except (redis.RedisError, OSError) as e:
            self._skipped("write", e)

    def _skipped(self, what: str, error: Exception) -> None:
        log.warning("reward cache %s skipped, scoring goes on without it (%s: %s)", what, type(error).__name__,
                    redact(str(error)))


@functools.lru_cache(maxsize=None)
def model_digest(spec_json: str) -> str:
    """What a cached score depends on besides the image and prompt (taken once per process): the reward's name and
    options (not its weight), the source of the module defining it (changed thresholds are another model), every
    file its options name (path, size, modification time: a checkpoint replaced at the same path) and the device kind
    it scores on (CUDA autocast is not the CPU's float32)."""
    name, options = json.loads(spec_json)
    parts = [spec_json, hashlib.sha256(Path(inspect.getfile(reward_class(name))).read_bytes()).hexdigest(),
             "cuda" if torch.cuda.is_available() else "cpu"]
    for value in options.values():
        if isinstance(value, str) and os.path.exists(value):
            root = Path(value).resolve()
            files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
            parts += [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def process_memory_mb() -> dict[str, float]:
    """This process's resident memory and, once it has used a GPU, the memory torch holds there, in MB: logged every
    iteration, so memory that grows over a run shows long before an out-of-memory kill ends it."""
    import psutil

    out = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # allocated, and held by the caching allocator
        out.update(gpu_mb=torch.cuda.memory_allocated() / 2**20, gpu_reserved_mb=torch.cuda.memory_reserved() / 2**20)
    return out


class MemoryReport:
    """An actor the driver can ask for its process's memory (process_memory_mb)."""

    def memory_mb(self) -> dict[str, float]:
        return process_memory_mb()


class RewardActor(MemoryReport):
    """Holds the configured reward models; scores images in batches of at most `batch_size`.

    With `cache` (a Redis address), scores already on Redis are reused and only the rest are computed.
    """

    def __init__(self, specs: list[dict], batch_size: int, torch_threads: int = 0,
                 cache: Optional[RedisAddress] = None, cache_ttl_s: int = 86400):
        set_threads(torch_threads)
        self.specs = {s["name"]: s for s in specs}
        self.models = {s["name"]: build(s["name"], **s.get("options", {})) for s in specs}
        self.batch_size = batch_size
        self.cache = ScoreCache(cache, cache_ttl_s) if cache is not None else None

    def placement(self) -> str:
        """The device the reward models were built on (rewards.build's rule; summary.json's `devices`)."""
        return "cuda" if torch.cuda.is_available() else "cpu"

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              names: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """{reward name: float32 scores [B]} for images [B, 3, H, W] in [0, 1], of the rewards `names` (None: all)."""
        prompts = list(prompts)
        if unknown := sorted(set(names or ()) - set(self.models)):
            raise KeyError(f"this reward actor holds {sorted(self.models)}, not {unknown}")
        return {name: self._score_one(name, images, prompts) for name in (names or self.models)}

    def _score_one(self, name: str, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.cache is None:
            return self._compute(name, images, prompts)
        keys = self.cache.keys(self.specs[name], images, prompts)
        cached = self.cache.get(keys)
        scores = torch.tensor([float("nan") if v is None else v for v in cached], dtype=torch.float32)
        todo = [i for i, v in enumerate(cached) if v is None]
        if todo:
            fresh = self._compute(name, images[todo], [prompts[i] for i in todo])
            scores[todo] = fresh
            self.cache.put([keys[i] for i in todo], fresh)
        return scores

    def _compute(self, name: str, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        model = self.models[name]
        parts = [model.score(images[i : i + self.batch_size], prompts[i : i + self.batch_size]).float().cpu()
                 for i in range(0, len(prompts), self.batch_size)]
        return torch.cat(parts)


class RewardClient:
    """Sends a scoring request to one reward actor; on an error or a timeout, tries the next one. A timed-out request
    is not abandoned: the first of the attempts in flight to answer is used. An actor runs its calls one at a time,
    so a retry is never sent to an actor still running this request (with one reward actor, or once every actor
    holds an attempt): such a copy could start only once the call ahead of it answered, and would then score the
    whole request again for nothing, delaying the next request. The attempt is given another timeout instead."""

    def __init__(self, actors: list, timeout_s: float, retries: int):
        self.actors, self.timeout_s, self.retries = actors, timeout_s, retries
        self._next = 0

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              names: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        errors: list[str] = []
        running: dict = {}  # attempt in flight -> the index of the actor running it
        for _ in range(self.retries + 1):
            index = self._next % len(self.actors)
            self._next += 1
            if index not in running.values():
                running[self.actors[index].score.remote(images, list(prompts), names)] = index
            deadline = time.monotonic() + self.timeout_s
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not ready:  # one more attempt, still waiting for these
                    errors.append(f"no answer within {self.timeout_s:g} s (actors.reward.timeout_s)")
                    log.warning("no reward actor answered in %g s; trying another", self.timeout_s)
                    break
                del running[ready[0]]
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, (ValueError, KeyError, TypeError)):
                        drop_undelivered(running)
                        # the reward's own code refused its input: every actor would raise the same, so no retry
                        raise RuntimeError(f"reward scoring raised {type(e.cause).__name__}: {e.cause}") from None
                    log.warning("reward actor failed (%s); trying another", type(e.cause).__name__)  # OOM, a GPU fault
                    errors.append(f"{type(e.cause).__name__}: {e.cause}")
                    continue
                except ray.exceptions.RayError as e:
                    log.warning("reward actor failed (%s); trying another", type(e).__name__)
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                drop_undelivered(running)
                return result
        drop_undelivered(running)
        raise RuntimeError(f"all {self.retries + 1} reward attempts failed: {errors}")


def drop_undelivered(attempts) -> None:
    """Drops the attempts not yet delivered to an actor (e.g. one queued for a restarting actor); one already
    delivered still runs, unused: Ray cannot cancel a sync actor's call."""
    for ref in attempts:
        ray.cancel(ref)


def set_threads(n: int) -> None:
    import os

    torch.set_num_threads(n if n > 0 else (os.cpu_count() or 1))


class Threaded(MemoryReport):
    """An actor whose torch thread count the driver sets while the run goes (learner/layout.py)."""

    def node(self) -> tuple[str, int]:
        """(Ray node id, cores there): actors on one node that compute at the same time share its cores."""
        import os

        return ray.get_runtime_context().get_node_id(), os.cpu_count() or 1

    def use_threads(self, n: int) -> int:
        """Set this process's torch threads (0 = all cores); returns the count now in use."""
        set_threads(n)
        return torch.get_num_threads()
