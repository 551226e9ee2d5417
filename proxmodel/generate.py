"""Sampling from a model, and the statistics of its samples: what evaluation computes wherever it runs (the rollout
actors during GRPO, the process that holds the model in pretraining, sampling and benchmarks).

Everything runs on the device of the model it is given: captions are tokenized there and noise, drawn on the CPU
from the seed (the same images on any device), is moved there. Images leave on the CPU.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from proxmodel.config import SAMPLERS
from proxmodel.model import ProxT2I
from proxmodel.policy import Policy
from proxmodel.sampler import Trajectory, Variant, gaussian_kl
from proxmodel.score import eps_fn, sample_ddim, sample_score


def device_of(model: ProxT2I) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sample(model: ProxT2I, prompts: Sequence[str], steps: int, seed: int, eta: float = 1.0,
           variant: Variant = "hybrid", guidance: float = 1.0) -> Trajectory:
    """The model's policy trajectory (prox sampler, or Euler-Maruyama for a score model) with the noise of `seed`,
    on the model's device."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    context = model.encode_text(model.tokenize(prompts, device))
    traj = Policy.of(model, steps, eta, guidance, variant).sample(
        model, {"context": context}, model.sample_shape(len(prompts)), torch.Generator().manual_seed(seed), device,
    )
    model.train(was_training)
    return traj


@torch.no_grad()
def generate(model: ProxT2I, prompts: Sequence[str], steps: int, seed: int, eta: float = 1.0,
             sampler: Optional[str] = None, guidance: float = 1.0) -> torch.Tensor:
    """Images in [0, 1], [B, C, H, W], on the CPU, with the noise of `seed` (eta=0: deterministic prox/SDE sampler).

    `sampler`: hybrid | backward | flow for a prox model, sde | ode | ddim for a score model; None = hybrid or ddim.
    """
    kind = model.cfg.kind
    allowed = SAMPLERS[kind]
    sampler = sampler or allowed[0 if kind == "prox" else 2]
    if sampler not in allowed:
        raise ValueError(f"sampler {sampler!r} does not apply to a {kind} model; use one of {allowed}")
    if kind == "prox":
        return model.to_images(sample(model, prompts, steps, seed, eta, sampler, guidance).images).cpu()
    was_training = model.training
    model.eval()
    device = device_of(model)
    eps = eps_fn(model, guidance, context=model.encode_text(model.tokenize(prompts, device)))
    shape, gen = model.sample_shape(len(prompts)), torch.Generator().manual_seed(seed)
    if sampler == "ddim":
        out = sample_ddim(eps, shape, steps, generator=gen, device=device)
    else:
        out = sample_score(eps, shape, steps, method=sampler, eta=eta, generator=gen, device=device)
    model.train(was_training)
    return model.to_images(out.images).cpu()



@torch.no_grad()
def hacking_monitors(model: ProxT2I, reference: ProxT2I, prompts: Sequence[str], steps: int, seed: int,
                     eta: float, group: int, guidance: float = 1.0) -> dict[str, float]:
    """Reward-hacking monitors on `group` fixed-noise samples per prompt.

    diversity: per-pixel std across a group, averaged (collapse drives it to 0); saturation: mean HSV saturation
    (over-saturation drives it to 1); kl_ref: mean per-step KL between the policy and the reference on the
    policy's own trajectories (drift), the same closed form the learner's KL term uses, per dimension (as the
    log-probs), and kl_ref_per_transition: the same summed over the dimensions (nats per sampler transition).
    `reference` must be on the model's device.
    """
    texts = [p for p in prompts for _ in range(group)]
    traj = sample(model, texts, steps, seed, eta, guidance=guidance)
    images = model.to_images(traj.images)
    diversity = images.reshape(len(prompts), group, -1).std(dim=1).mean()
    brightest, darkest = images.max(dim=1).values, images.min(dim=1).values
    saturation = ((brightest - darkest) / brightest.clamp_min(1e-6)).mean()
    tokens = model.tokenize(texts, device_of(model))
    policy = Policy.of(model, steps, eta, guidance)
    kls = []
    for j in range(steps - 1):
        mine = policy.transition(model.eval(), {"tokens": tokens}, traj.states, j)
        ref = policy.transition(reference.eval(), {"tokens": tokens}, traj.states, j)
        kls.append(gaussian_kl(mine.mean, ref.mean, mine.var).mean())
    kl = float(torch.stack(kls).mean())
    dims = math.prod(traj.states.shape[2:])
    return {"diversity": float(diversity), "saturation": float(saturation), "kl_ref": kl,
            "kl_ref_per_transition": kl * dims}
