"""RewardActor: batched scoring with several reward models; RewardClient: timeouts and retries across actors."""

from __future__ import annotations

import logging
from typing import Sequence

import ray
import torch

from rewards import build

log = logging.getLogger(__name__)


class RewardActor:
    """Holds the configured reward models; scores images in batches of at most `batch_size`."""

    def __init__(self, specs: list[dict], batch_size: int, torch_threads: int = 0):
        set_threads(torch_threads)
        self.models = {s["name"]: build(s["name"], **s.get("options", {})) for s in specs}
        self.batch_size = batch_size

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{reward name: float32 scores [B]} for images [B, 3, H, W] in [0, 1]."""
        out: dict[str, list[torch.Tensor]] = {name: [] for name in self.models}
        for i in range(0, len(prompts), self.batch_size):
            chunk, texts = images[i : i + self.batch_size], list(prompts[i : i + self.batch_size])
            for name, model in self.models.items():
                out[name].append(model.score(chunk, texts).float().cpu())
        return {name: torch.cat(parts) for name, parts in out.items()}


class RewardClient:
    """Sends a scoring request to one reward actor; on an error or a timeout, retries on the next one."""

    def __init__(self, actors: list, timeout_s: float, retries: int):
        self.actors, self.timeout_s, self.retries = actors, timeout_s, retries
        self._next = 0

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        errors = []
        for _ in range(self.retries + 1):
            actor = self.actors[self._next % len(self.actors)]
            self._next += 1
            try:
                return ray.get(actor.score.remote(images, list(prompts)), timeout=self.timeout_s)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as e:
                log.warning("reward actor failed (%s); retrying on another", type(e).__name__)
                errors.append(f"{type(e).__name__}: {e}")
        raise RuntimeError(f"all {self.retries + 1} reward attempts failed: {errors}")


def set_threads(n: int) -> None:
    import os

    torch.set_num_threads(n if n > 0 else (os.cpu_count() or 1))
