"""A value of the sampler's noisy states, and the prox sampler steered by it (the reward tilt as sampler control).

The KL-optimal policy at temperature beta, p_beta(x | c) ~ p_0(x | c) exp(R(x, c) / beta), is the base's path measure
twisted by h_k(y, c) = E_0[exp(R / beta) | y_k = y]: each Gaussian transition N(mu, s^2 I) of the base becomes
N(mu + s^2 grad log h_{k-1}(mu), s^2 I) to first order in s^2 (the h-transform of stochastic control). With a learned
value V(y, c, k) ~ E_0[R | y_k = y] (regressed on the base's own rollouts) and log h ~ V / beta, the steered sampler
shifts each mean by `scale * s^2 * grad V` (scale = 1 / beta) and pays |shift|^2 / (2 s^2) nats per transition: a
policy whose distance from the base is known exactly, and that can look at the caption only through V.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from proxmodel.model import ProxT2I, precond_coefficients, prox_fn
from proxmodel.sampler import StepGrid, Variant, half_step, hybrid_step, initial_state, standard_normal


def state_inputs(grid: StepGrid, k: int, batch: int, device: torch.device | str,
                 variant: Variant = "hybrid") -> tuple[torch.Tensor, torch.Tensor]:
    """(t, lam) of the prox applied to the state y_k (step k of `hybrid_step`): what a value of y_k is told."""
    t = torch.full((batch,), grid.t_at(k - 1), dtype=torch.float32, device=device)
    lam = torch.full((batch,), half_step(grid, k, variant).lam, dtype=torch.float32, device=device)
    return t, lam


class ValueModel(nn.Module):
    """V(y_k, c, k): the expected final reward of the base's trajectory through state y_k for caption c.

    A copy of the base (trained) read out by the spatial mean of its eps: the base already maps (y, t, lam, caption)
    to a map of what the clean image will hold, so the value starts from its caption features, not from scratch.
    Contexts come from the base's frozen text encoder, computed once by the caller.
    """

    def __init__(self, base: ProxT2I):
        super().__init__()
        self.model = copy.deepcopy(base)
        self.model.text.requires_grad_(False)  # unused: the caller passes contexts
        self.head = nn.Linear(1, 1)  # the reward's offset and scale

    def forward(self, y: torch.Tensor, t: torch.Tensor, lam: torch.Tensor, context: torch.Tensor,
                k: Optional[torch.Tensor] = None) -> torch.Tensor:
        # the network alone, its input scaled as the base scales it: the eps's skip term c_skip * y would add the
        # state's own noise to the readout, which the regression can only remove by ignoring the network too
        model, view = self.model, (-1, *([1] * (y.dim() - 1)))
        if model.cfg.kind == "prox" and model.cfg.prox_param == "precond":
            c_in = precond_coefficients(model.schedule.alpha(t), lam, model.sigma_data)[1]
        else:
            c_in = torch.rsqrt(1.0 + lam)
        out = model._net(y * c_in.view(view), t, lam, context)
        return self.head(out.mean(dim=tuple(range(1, out.dim()))).unsqueeze(-1)).squeeze(-1)


class DenoisedValue(nn.Module):
    """V(y_k, c, k) = R_phi(prox_0(y_k), c, k): a small reward model read on the frozen base's denoised estimate.

    The state's own noise is what makes a value of y_k hard to learn from a few thousand rollouts; the base's prox
    removes it (at the late steps its output is nearly the final image), so R_phi sees an image, the step and the
    caption's token features (one cross-attention from the image's 8x8 features to the tokens, so a word can be
    matched with a place). The gradient of V reaches y_k through the base's prox.
    """

    def __init__(self, base: ProxT2I, steps: int, width: int = 48):
        super().__init__()
        object.__setattr__(self, "base", base)  # frozen, not a submodule: not trained, not in the state dict
        channels = base.sample_shape(1)[1]
        text_width = base.encode_text(base.tokenize([""])).shape[-1]
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
        )
        self.step = nn.Embedding(steps + 1, width)
        self.words = nn.Linear(text_width, width)
        self.attend = nn.MultiheadAttention(width, 4, batch_first=True)
        self.out = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(width, 1))

    def denoise(self, y: torch.Tensor, t: torch.Tensor, lam: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return prox_fn(self.base, context=context)(y, t, lam)

    def forward(self, y: torch.Tensor, t: torch.Tensor, lam: torch.Tensor, context: torch.Tensor, k: torch.Tensor,
                denoised: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`k`: the state's step [B]; `denoised`: prox_0(y) if the caller has it (training reads it from a cache)."""
        x = self.denoise(y, t, lam, context) if denoised is None else denoised
        h = self.trunk(x) + self.step(k)[:, :, None, None]
        b, c, hh, ww = h.shape
        queries = h.flatten(2).transpose(1, 2)
        words = self.words(context)
        attended, _ = self.attend(queries, words, words)
        h = torch.cat([h, attended.transpose(1, 2).reshape(b, c, hh, ww)], dim=1)
        return self.out(h).squeeze(-1)


@dataclass
class SteeredTrajectory:
    states: torch.Tensor  # [B, N, ...]: y_N..y_1, as a Trajectory's
    images: torch.Tensor  # x_0 = prox(y_1), model space
    kl: torch.Tensor  # [B, N-1]: KL(steered transition || base transition) in nats (summed over dimensions)


def value_grad(value: nn.Module, y: torch.Tensor, grid: StepGrid, k: int, context: torch.Tensor,
               variant: Variant = "hybrid") -> torch.Tensor:
    """grad_y V(y, c, k) at the states y = y_k, per row (V of one row does not depend on another's input)."""
    t, lam = state_inputs(grid, k, y.shape[0], y.device, variant)
    steps = torch.full((y.shape[0],), k, dtype=torch.long, device=y.device)
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(value(y, t, lam, context, steps).sum(), y)
    return grad


@torch.no_grad()
def sample_steered(model: ProxT2I, value: Optional[nn.Module], context: torch.Tensor, shape: tuple[int, ...],
                   grid: StepGrid, scale: float, *, eta: float = 1.0, generator: Optional[torch.Generator] = None,
                   device: torch.device | str = "cpu", variant: Variant = "hybrid") -> SteeredTrajectory:
    """The stochastic prox sampler with each transition's mean shifted by scale * s^2 * grad V at that mean.

    Draws its noise in `sample_hybrid`'s order, so scale 0 (or value None) is the base's trajectory for the same
    generator, bit for bit: a steered and a base sample differ only by the steering.
    """
    if eta == 0.0 or variant == "flow":
        raise ValueError("steering shifts a Gaussian transition's mean; the deterministic sampler has none (eta > 0)")
    prox = prox_fn(model, context=context)
    n, batch = grid.steps, shape[0]
    y = initial_state(standard_normal(shape, generator, device), standard_normal(shape, generator, device), grid, eta,
                      variant)
    states, kls = [y], []
    for k in range(n, 0, -1):
        noise = standard_normal(shape, generator, device) if k > 1 else None
        out = hybrid_step(prox, y, grid, k, eta=eta, noise=torch.zeros_like(y) if k > 1 else None, variant=variant)
        if k == 1:
            return SteeredTrajectory(torch.stack(states, dim=1), out.x, torch.stack(kls, dim=1))
        std = eta * half_step(grid, k - 1, variant).noise_std
        mean = out.mean
        if value is not None and scale != 0.0:
            shift = scale * std**2 * value_grad(value, mean, grid, k - 1, context, variant)
            mean = mean + shift
            kls.append(shift.flatten(1).pow(2).sum(1) / (2 * std**2))
        else:
            kls.append(torch.zeros(batch, device=device))
        y = mean + std * noise
        states.append(y)
    raise AssertionError("unreachable: the loop returns at k = 1")
