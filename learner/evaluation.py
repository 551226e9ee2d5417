"""Evaluation in one process (pretraining, sampling, benchmarks): a model's sampler with fixed noise on held-out
prompts, scored by reward models in the same process; sample grids. (GRPO evaluates through its actors instead:
learner/grpo.py, RolloutActor.evaluate.) Images leave on the CPU, for rewards and grids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from proxmodel.generate import generate
from proxmodel.model import ProxT2I
from rewards.base import RewardModel, to_uint8_images


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, C, H, W] in [0, 1] to PIL images (grey for one channel)."""
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in to_uint8_images(images)]


GRID_COLUMNS, GRID_PAD, GRID_UPSCALE = 8, 1, 4  # benchmarks/before_after_grid.py crops grids by this layout


def save_grid(images: torch.Tensor, path: Path, nrow: int = GRID_COLUMNS, upscale: int = GRID_UPSCALE) -> Image.Image:
    grid = make_grid(images, nrow=nrow, padding=GRID_PAD, pad_value=0.5)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr).resize((arr.shape[1] * upscale, arr.shape[0] * upscale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img


def evaluate(model: ProxT2I, prompts: Sequence[str], steps: int, seed: int, rewards: dict[str, RewardModel],
             eta: float = 1.0, sampler: Optional[str] = None, guidance: float = 1.0):
    """(images, {reward name: mean score}) on `prompts` with fixed noise (the same seed gives the same draws)."""
    images = generate(model, prompts, steps, seed, eta, sampler, guidance)
    return images, {name: float(r.score(images, prompts).mean()) for name, r in rewards.items()}


def reward_matrix(model: ProxT2I, prompts: Sequence[str], steps: int, seed: int, seeds: int,
                  rewards: dict[str, RewardModel], eta: float = 1.0, sampler: Optional[str] = None,
                  guidance: float = 1.0) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """(images of the first noise seed, {reward name: scores [prompts, seeds]}) with the noise of seed, seed + 1, ...

    The matrices are what learner/bootstrap.py turns into confidence intervals; the same prompts and seeds before
    and after training give paired differences."""
    first, columns = None, {name: [] for name in rewards}
    for s in range(seeds):
        images = generate(model, prompts, steps, seed + s, eta, sampler, guidance)
        first = images if first is None else first
        for name, r in rewards.items():
            columns[name].append(r.score(images, prompts).double().cpu().numpy())
    return first, {name: np.stack(cols, axis=1) for name, cols in columns.items()}
