"""Evaluation shared by both modes: the sampler with fixed noise on held-out prompts, rewards, a sample grid."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from proxmodel.model import ProxT2I, prox_fn
from proxmodel.sampler import sample_hybrid
from proxmodel.schedule import VPSchedule
from rewards.base import RewardModel


@torch.no_grad()
def generate(model: ProxT2I, prompts: Sequence[str], steps: int, seed: int, eta: float = 1.0) -> torch.Tensor:
    """Images in [0, 1], [B, C, H, W], from the hybrid sampler with the noise of `seed` (eta=0: deterministic)."""
    was_training = model.training
    model.eval()
    context = model.encode_text(model.tokenize(prompts))
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    traj = sample_hybrid(
        prox_fn(model, context=context), (len(prompts), cfg.channels, cfg.image_size, cfg.image_size),
        VPSchedule().grid(steps), eta=eta, generator=gen,
    )
    model.train(was_training)
    return to_unit(traj.images)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] to image space [0, 1]."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, upscale: int = 4) -> Image.Image:
    grid = make_grid(images, nrow=nrow, padding=1, pad_value=0.5)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr).resize((arr.shape[1] * upscale, arr.shape[0] * upscale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img


def evaluate(model: ProxT2I, prompts: Sequence[str], steps: int, seed: int, rewards: dict[str, RewardModel], eta: float = 1.0):
    """(images, {reward name: mean score}) on `prompts` with fixed noise (the same seed gives the same draws)."""
    images = generate(model, prompts, steps, seed, eta)
    return images, {name: float(r.score(images, prompts).mean()) for name, r in rewards.items()}
