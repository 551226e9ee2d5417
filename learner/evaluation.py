"""Evaluation shared by both modes: the sampler with fixed noise on held-out prompts, rewards, a sample grid."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from proxmodel.model import ProxT2I, prox_fn
from proxmodel.sampler import Trajectory, gaussian_kl, hybrid_step, sample_hybrid
from proxmodel.schedule import VPSchedule
from rewards.base import RewardModel


@torch.no_grad()
def sample(model: ProxT2I, prompts: Sequence[str], steps: int, seed: int, eta: float = 1.0) -> Trajectory:
    """The hybrid sampler's trajectory for `prompts` with the noise of `seed` (eta=0: deterministic)."""
    was_training = model.training
    model.eval()
    context = model.encode_text(model.tokenize(prompts))
    gen = torch.Generator().manual_seed(seed)
    traj = sample_hybrid(
        prox_fn(model, context=context), model.sample_shape(len(prompts)), VPSchedule().grid(steps), eta=eta,
        generator=gen,
    )
    model.train(was_training)
    return traj


def generate(model: ProxT2I, prompts: Sequence[str], steps: int, seed: int, eta: float = 1.0) -> torch.Tensor:
    """Images in [0, 1], [B, C, H, W], from the hybrid sampler with the noise of `seed` (eta=0: deterministic)."""
    return model.to_images(sample(model, prompts, steps, seed, eta).images)


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


@torch.no_grad()
def hacking_monitors(model: ProxT2I, reference: ProxT2I, prompts: Sequence[str], steps: int, seed: int,
                     eta: float, group: int) -> dict[str, float]:
    """Reward-hacking monitors on `group` fixed-noise samples per prompt.

    diversity: per-pixel std across a group, averaged (collapse drives it to 0); saturation: mean HSV saturation
    (over-saturation drives it to 1); kl_ref: mean per-step KL between the policy and the reference on the
    policy's own trajectories (drift).
    """
    texts = [p for p in prompts for _ in range(group)]
    traj = sample(model, texts, steps, seed, eta)
    images = model.to_images(traj.images)
    diversity = images.reshape(len(prompts), group, -1).std(dim=1).mean()
    brightest, darkest = images.max(dim=1).values, images.min(dim=1).values
    saturation = ((brightest - darkest) / brightest.clamp_min(1e-6)).mean()
    tokens = model.tokenize(texts)
    policy = prox_fn(model.eval(), context=model.encode_text(tokens))
    ref = prox_fn(reference.eval(), context=reference.encode_text(tokens))
    grid = VPSchedule().grid(steps)
    kls = []
    for j, k in enumerate(range(steps, 1, -1)):
        y, y_next = traj.states[:, j], traj.states[:, j + 1]
        mean = hybrid_step(policy, y, grid, k, eta=eta, y_next=y_next).mean
        mean_ref = hybrid_step(ref, y, grid, k, eta=eta, y_next=y_next).mean
        kls.append(gaussian_kl(mean, mean_ref, eta**2 * grid.gamma_at(k - 1)).mean())
    return {"diversity": float(diversity), "saturation": float(saturation), "kl_ref": float(torch.stack(kls).mean())}
