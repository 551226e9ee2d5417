"""The proximal samplers, HYBRID and fully BACKWARD, and their policy view (docs/method.md sec. 2 and 3).

One step function, `hybrid_step`, is shared by evaluation, rollouts and the learner's log-prob recomputation,
so the three can never disagree. A trajectory is described by its auxiliary (pre-prox) states y_N..y_1. For the
hybrid sampler (the default, `variant="hybrid"`):

    y_N     = (1 + gamma_N / 2) x_N + sqrt(gamma_N) z_N,            x_N ~ N(0, I)   (independent of theta)
    x_{k-1} = prox_theta(y_k; t_{k-1}, lam = gamma_k, c)
    y_{k-1} = (1 + gamma_{k-1} / 2) x_{k-1} + eta sqrt(gamma_{k-1}) z_{k-1}           (the policy's action)
    x_0     = prox_theta(y_1; 0, gamma_1, c)                                          (deterministic given y_1)

so pi_theta(y_{k-1} | y_k, c) = N((1 + gamma_{k-1}/2) prox_theta(y_k; ...), eta^2 gamma_{k-1} I). eta = 1 is the
method; eta = 0 is the deterministic sampler. The fully backward sampler (`variant="backward"`, only for grids
with every gamma_k < 2) differs only in the forward half-step and the prox's lam:

    y_k = (x_k + eta sqrt(gamma_k) z_k) / (1 - gamma_k / 2),   lam_k = gamma_k / (1 - gamma_k / 2),

so its policy has mean prox / (1 - gamma/2) and variance eta^2 gamma / (1 - gamma/2)^2.

eta = 0 in the hybrid step is NOT a sampler of p_0: it follows the noiseless reverse-SDE drift (the full score), a
mode-seeking chain whose outputs are far less diverse than the data (docs/method.md sec. 6; "the mode chain"). The
deterministic sampler that samples is the implicit probability-flow step (`variant="flow"`, the ODE's half score):

    y_k = (1 + gamma_k / 2) x_k,   x_{k-1} = prox_theta(y_k; t_{k-1}, lam = gamma_k / 2, c)

which has no noise and no policy (a model must be trained on lam = gamma/2 pairs: pretrain.prox_variants flow).

Log-probs are computed in
float32 and REDUCED BY THE MEAN over data dimensions (as Flow-GRPO does), so a clip range for the policy ratio must
be small (about 1e-4..1e-2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

from proxmodel.schedule import StepGrid

# prox(y, t, lam) -> x: t and lam are float tensors of shape [B].
ProxFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Variant = Literal["hybrid", "backward", "flow"]
BACKWARD_MAX_GAMMA = 2.0  # the backward half-step divides by 1 - gamma/2


@dataclass(frozen=True)
class HalfStep:
    """y = scale * x + noise_std * z, then x' = prox(y; lam): the coefficients of one step of a prox sampler."""

    scale: float
    noise_std: float
    lam: float


def half_step(grid: StepGrid, k: int, variant: Variant = "hybrid") -> HalfStep:
    """The forward half-step into y_k and the prox's lam for step k (docs/method.md sec. 2)."""
    gamma = grid.gamma_at(k)
    if variant == "hybrid":
        return HalfStep(scale=1.0 + gamma / 2.0, noise_std=math.sqrt(gamma), lam=gamma)
    if variant == "backward":
        check_backward_grid(grid)
        shrink = 1.0 - gamma / 2.0
        return HalfStep(scale=1.0 / shrink, noise_std=math.sqrt(gamma) / shrink, lam=gamma / shrink)
    if variant == "flow":
        return HalfStep(scale=1.0 + gamma / 2.0, noise_std=0.0, lam=gamma / 2.0)
    raise ValueError(f"unknown prox sampler variant {variant!r}; use 'hybrid', 'backward' or 'flow'")


def check_backward_grid(grid: StepGrid) -> None:
    """The fully backward sampler needs every gamma_k < 2; say which step counts satisfy that."""
    worst = float(grid.gamma.max())
    if worst >= BACKWARD_MAX_GAMMA:
        n_min = grid.schedule.min_steps_below(BACKWARD_MAX_GAMMA)
        raise ValueError(
            f"the fully backward prox sampler needs every step size gamma_k < {BACKWARD_MAX_GAMMA:g}, but this "
            f"{grid.steps}-step grid has max gamma = {worst:.3f}. Use N >= {n_min} steps with this schedule "
            f"(beta_min={grid.schedule.beta_min:g}, beta_max={grid.schedule.beta_max:g}), or the hybrid sampler, "
            f"which has no step-size limit."
        )


@dataclass
class StepOutput:
    x: torch.Tensor  # prox output x_{k-1}
    y: Optional[torch.Tensor]  # next auxiliary state y_{k-1} (None after the last step)
    log_prob: Optional[torch.Tensor]  # [B] mean-over-dims log pi(y_{k-1} | y_k), float32 (None if deterministic/last)
    mean: Optional[torch.Tensor]  # policy mean of y_{k-1}


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, var: float, block: int = 1) -> torch.Tensor:
    """Per-sample log N(value; mean, var I), averaged over all non-batch dimensions, in float32.

    block s > 1: the log-density of the s x s block means only, i.e. of the action's coordinates in the orthonormal
    basis of block-constant images (a block's sum / s, each again N(., var)), divided like the full one by all the
    state's dimensions. The rest of the noise is independent of those coordinates and left out, so for a reward
    that sees block means only, A grad log p has the full log-prob's expectation and none of its fine-noise variance.
    [B, C, H, W] with H and W divisible by s.
    """
    diff = value.float() - mean.float()
    if block > 1:
        if diff.dim() != 4 or diff.shape[-1] % block or diff.shape[-2] % block:
            raise ValueError(f"credit block {block} does not tile states of shape {tuple(diff.shape[1:])}: use a "
                             f"block size that divides their height and width, or 1")
        diff = F.avg_pool2d(diff, block) * block
    per_dim = -(diff * diff) / (2.0 * var) - 0.5 * math.log(2.0 * math.pi * var)
    return per_dim.flatten(1).mean(dim=1) / (block * block)


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, var: float) -> torch.Tensor:
    """KL(N(mean_p, var I) || N(mean_q, var I)) per sample, averaged over dimensions like the log-probs, float32."""
    diff = mean_p.float() - mean_q.float()
    return (diff * diff).flatten(1).mean(dim=1) / (2.0 * var)


def hybrid_step(
    prox: ProxFn,
    y: torch.Tensor,
    grid: StepGrid,
    k: int,
    *,
    eta: float = 1.0,
    noise: Optional[torch.Tensor] = None,
    y_next: Optional[torch.Tensor] = None,
    variant: Variant = "hybrid",
    next_variant: Optional[Variant] = None,
    block: int = 1,
) -> StepOutput:
    """Step k (N..1) of the hybrid (or fully backward) prox sampler, from y_k.

    Either draws y_{k-1} with `noise` (z_{k-1}; zero/None with eta=0 gives the deterministic sampler) or, when
    `y_next` is given, scores that recorded action under the current prox (the learner's recomputation).
    `variant` made y_k (it sets the prox's lam); `next_variant` (default: the same) makes y_{k-1}: "flow" there
    switches a stochastic chain to the probability-flow ODE from this step on. `block`: the log-prob scores the
    action's block means only (gaussian_log_prob).
    """
    batch = y.shape[0]
    t_prev = torch.full((batch,), grid.t_at(k - 1), dtype=torch.float32, device=y.device)
    lam = torch.full((batch,), half_step(grid, k, variant).lam, dtype=torch.float32, device=y.device)
    x = prox(y, t_prev, lam)
    if k == 1:
        return StepOutput(x=x, y=None, log_prob=None, mean=None)
    nxt = half_step(grid, k - 1, next_variant or variant)
    mean = nxt.scale * x
    deterministic = eta == 0.0 or nxt.noise_std == 0.0
    if y_next is None:
        if deterministic:
            return StepOutput(x=x, y=mean, log_prob=None, mean=mean)
        if noise is None:
            raise ValueError("a stochastic step needs its noise z_{k-1}; pass noise= or eta=0")
        y_next = mean + eta * nxt.noise_std * noise
    if deterministic:
        raise ValueError(f"a recorded action has no density under a deterministic sampler (eta={eta}, {variant})")
    log_prob = gaussian_log_prob(y_next, mean, (eta * nxt.noise_std) ** 2, block)
    return StepOutput(x=x, y=y_next, log_prob=log_prob, mean=mean)


def initial_state(x_n: torch.Tensor, z_n: torch.Tensor, grid: StepGrid, eta: float = 1.0,
                  variant: Variant = "hybrid") -> torch.Tensor:
    """y_N from x_N ~ N(0, I): the first forward half-step, independent of theta."""
    first = half_step(grid, grid.steps, variant)
    return first.scale * x_n + eta * first.noise_std * z_n


def standard_normal(shape: tuple[int, ...], generator: Optional[torch.Generator],
                    device: torch.device | str) -> torch.Tensor:
    """N(0, I) drawn where `generator` lives and moved to `device`: a seed gives the same noise on any device."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


def made_by(n: int, k: int, variant: Variant, stochastic_steps: Optional[int]) -> Variant:
    """The half-step that made y_k in an n-step chain whose first `stochastic_steps` transitions are `variant` and
    the rest probability-flow steps (transition n - k makes y_k; y_N is the initial state)."""
    return variant if stochastic_steps is None or n - k <= stochastic_steps else "flow"


def start_noise(shape: tuple[int, ...], generator: Optional[torch.Generator], device: torch.device | str,
                shared: bool = False) -> torch.Tensor:
    """N(0, I) for a chain's starting state; `shared`: one draw for every row, so a GRPO group's members differ only
    by the policy's own noise (DanceGRPO's shared initial noise)."""
    if not shared:
        return standard_normal(shape, generator, device)
    return standard_normal((1, *shape[1:]), generator, device).expand(shape).contiguous()


@dataclass
class Trajectory:
    """What the policy did: auxiliary states y_N..y_1 ([B, N, ...], index 0 is y_N), images x_0, log-probs."""

    states: torch.Tensor
    images: torch.Tensor
    log_probs: Optional[torch.Tensor]  # [B, N-1]: log pi(y_{k-1} | y_k) for k = N..2; None if deterministic


@torch.no_grad()
def sample_hybrid(
    prox: ProxFn,
    shape: tuple[int, ...],
    grid: StepGrid,
    *,
    eta: float = 1.0,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
    variant: Variant = "hybrid",
    stochastic_steps: Optional[int] = None,
    shared_start: bool = False,
    block: int = 1,
) -> Trajectory:
    """Run the hybrid (or fully backward) sampler for len(grid) steps from x_N ~ N(0, I), recording the trajectory.

    `stochastic_steps` K: only the first K transitions are `variant` steps; the rest are probability-flow steps
    (deterministic, no log-prob), so the trajectory has K log-probs. The SDE and the ODE share their marginals, so
    the switch keeps the chain a sampler of p_0 (MixGRPO, Flow-GRPO-Fast); the model must know the flow variant.
    `shared_start`: every row starts from the same y_N (its x_N and z_N), independent of theta like any y_N.
    `block`: the log-probs score each action's block means only (gaussian_log_prob)."""
    n = grid.steps

    def draw() -> torch.Tensor:
        return standard_normal(shape, generator, device)

    def by(k: int) -> Variant:
        return made_by(n, k, variant, stochastic_steps)

    y = initial_state(start_noise(shape, generator, device, shared_start),
                      start_noise(shape, generator, device, shared_start), grid, eta, variant)
    states, log_probs = [y], []
    for k in range(n, 0, -1):
        stochastic = eta != 0.0 and by(k - 1) != "flow"
        noise = draw() if (k > 1 and stochastic) else None
        out = hybrid_step(prox, y, grid, k, eta=eta, noise=noise, variant=by(k), next_variant=by(k - 1),
                          block=block)
        if k == 1:
            images = out.x
        else:
            y = out.y
            states.append(y)
            if out.log_prob is not None:
                log_probs.append(out.log_prob)
    return Trajectory(
        states=torch.stack(states, dim=1),
        images=images,
        log_probs=torch.stack(log_probs, dim=1) if log_probs else None,
    )


def trajectory_log_probs(prox: ProxFn, states: torch.Tensor, grid: StepGrid, eta: float = 1.0,
                         variant: Variant = "hybrid") -> torch.Tensor:
    """Re-score a recorded trajectory (states [B, N, ...]) under `prox`: [B, N-1] log-probs, with gradients."""
    n = grid.steps
    out = []
    for i, k in enumerate(range(n, 1, -1)):
        step = hybrid_step(prox, states[:, i], grid, k, eta=eta, y_next=states[:, i + 1], variant=variant)
        out.append(step.log_prob)
    return torch.stack(out, dim=1)
