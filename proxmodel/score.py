"""The score-based baselines on the same backbone (docs/method.md sec. 2): Euler-Maruyama, probability-flow ODE, DDIM.

The score model predicts eps at time t (`ModelConfig.kind: score`), so s(x, t) = -eps / sqrt(1 - alpha_t). Euler-
Maruyama and the ODE walk N-1 left-point steps on the uniform grid from t = 1 to t_min = 1e-3 and end with one
noiseless denoising step (Tweedie's E[x_0 | x_t_min]), N network evaluations in all:

    SDE: x_{k-1} = (1 + g_k/2) x_k + g_k s(x_k, t_k) + eta sqrt(g_k) z_k,   g_k = beta(t_k) (t_k - t_{k-1})
    ODE: x_{k-1} = x_k + g_k/2 (x_k + s(x_k, t_k))

`sde_step` is the SDE step as a pure function with its Gaussian log-prob N((1 + g/2) x + g s, eta^2 g I), mirroring
the prox sampler's `hybrid_step`, so a score-based GRPO baseline (DDPO / Flow-GRPO style) can score recorded actions
the same way. DDIM goes through diffusers' DDIMScheduler on the discrete twin of the VP schedule (`ddim_scheduler`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from diffusers import DDIMScheduler
from torch import nn

from proxmodel.model import guided_eps
from proxmodel.sampler import gaussian_log_prob, standard_normal, start_noise
from proxmodel.schedule import VPSchedule

# eps(x, t) -> eps_hat: t is a float tensor of shape [B].
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
T_MIN = 1e-3  # where the SDE/ODE stop before the final denoising step (the reference baseline's epsilon)
DDIM_TRAIN_STEPS = 1000  # discrete timesteps of the DDIM twin of the continuous schedule


def eps_fn(model: nn.Module, guidance: float = 1.0, **condition) -> EpsFn:
    """eps_hat(x, t) of a score model for a fixed caption condition, with classifier-free guidance w."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_eps(model, x, t, torch.zeros_like(t), guidance, **condition)

    return eps


def score_from_eps(eps: torch.Tensor, t: torch.Tensor, schedule: VPSchedule) -> torch.Tensor:
    """s(x, t) = -eps / sqrt(1 - alpha_t)."""
    sigma = (1.0 - schedule.alpha(t.double())).sqrt().float().view(-1, *([1] * (eps.dim() - 1)))
    return -eps / sigma


def score_times(steps: int, t_min: float = T_MIN) -> torch.Tensor:
    """t_min = tau_0 < ... < tau_{N-1} = 1: N-1 SDE/ODE steps, then the denoising step at tau_0."""
    if steps < 1:
        raise ValueError(f"a sampler needs at least 1 step, got steps={steps}")
    return torch.linspace(t_min, 1.0, steps, dtype=torch.float64) if steps > 1 else torch.ones(1, dtype=torch.float64)


@dataclass
class ScoreStep:
    x: torch.Tensor  # x_{k-1}
    mean: torch.Tensor  # its Gaussian mean given x_k
    log_prob: Optional[torch.Tensor]  # [B] mean-over-dims log N(x_{k-1}; mean, eta^2 g I), float32; None if eta=0


def _full(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((x.shape[0],), value, dtype=torch.float32, device=x.device)


def sde_step(
    eps: EpsFn,
    x: torch.Tensor,
    t: float,
    t_next: float,
    *,
    schedule: VPSchedule = VPSchedule(),
    eta: float = 1.0,
    noise: Optional[torch.Tensor] = None,
    x_next: Optional[torch.Tensor] = None,
    block: int = 1,
) -> ScoreStep:
    """One Euler-Maruyama step of the reverse SDE from t to t_next < t: draws x_next with `noise`, or scores it
    (`block`: its block means only, gaussian_log_prob)."""
    g = float(schedule.beta(t)) * (t - t_next)
    mean = (1.0 + g / 2.0) * x + g * score_from_eps(eps(x, _full(x, t)), _full(x, t), schedule)
    if x_next is None:
        if eta == 0.0:
            return ScoreStep(x=mean, mean=mean, log_prob=None)
        if noise is None:
            raise ValueError("a stochastic step needs its noise z; pass noise= or eta=0")
        x_next = mean + eta * math.sqrt(g) * noise
    if eta == 0.0:
        raise ValueError("a recorded action has no density under the deterministic step (eta=0)")
    return ScoreStep(x=x_next, mean=mean, log_prob=gaussian_log_prob(x_next, mean, eta * eta * g, block))


def ode_step(eps: EpsFn, x: torch.Tensor, t: float, t_next: float, schedule: VPSchedule = VPSchedule()) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from t to t_next < t."""
    g = float(schedule.beta(t)) * (t - t_next)
    return x + 0.5 * g * (x + score_from_eps(eps(x, _full(x, t)), _full(x, t), schedule))


def denoise(eps: EpsFn, x: torch.Tensor, t: float, schedule: VPSchedule = VPSchedule()) -> torch.Tensor:
    """The noiseless final step: Tweedie's E[x_0 | x_t] = (x - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)."""
    alpha = float(schedule.alpha(torch.tensor(t, dtype=torch.float64)))
    return (x - math.sqrt(1.0 - alpha) * eps(x, _full(x, t))) / math.sqrt(alpha)


@dataclass
class ScoreSample:
    images: torch.Tensor
    log_probs: Optional[torch.Tensor]  # [B, N-1] per-step SDE log-probs; None for the ODE, DDIM or eta=0
    states: Optional[torch.Tensor] = None  # [B, N, ...] x at tau_{N-1} = 1, ..., tau_0 (SDE/ODE); None for DDIM


@torch.no_grad()
def sample_score(
    eps: EpsFn,
    shape: tuple[int, ...],
    steps: int,
    *,
    method: Literal["sde", "ode"] = "sde",
    eta: float = 1.0,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
    schedule: VPSchedule = VPSchedule(),
    t_min: float = T_MIN,
    shared_start: bool = False,
    block: int = 1,
) -> ScoreSample:
    """Euler-Maruyama (`sde`) or probability-flow (`ode`) sampling with `steps` network evaluations; `shared_start`:
    every row starts from the same x at tau = 1; `block`: the SDE's log-probs score block means only."""
    times = score_times(steps, t_min).tolist()
    x = start_noise(shape, generator, device, shared_start)
    states, log_probs = [x], []
    for t, t_next in zip(times[:0:-1], times[-2::-1]):
        if method == "ode":
            x = ode_step(eps, x, t, t_next, schedule)
        else:
            noise = standard_normal(shape, generator, device) if eta != 0.0 else None
            step = sde_step(eps, x, t, t_next, schedule=schedule, eta=eta, noise=noise, block=block)
            x = step.x
            if step.log_prob is not None:
                log_probs.append(step.log_prob)
        states.append(x)
    images = denoise(eps, x, times[0], schedule)
    return ScoreSample(images=images, log_probs=torch.stack(log_probs, dim=1) if log_probs else None,
                       states=torch.stack(states, dim=1))


def ddim_scheduler(schedule: VPSchedule = VPSchedule(), train_steps: int = DDIM_TRAIN_STEPS) -> DDIMScheduler:
    """diffusers' DDIMScheduler on the discrete twin of the continuous VP schedule.

    diffusers' "linear" betas beta_i (i = 0..T-1) are beta(t)/T on the grid, i.e. beta_start = beta_min/T = 1e-4 and
    beta_end = beta_max/T = 0.02 for T = 1000 (DDPM's values), with prod(1 - beta_i) ~ alpha only to first order. We
    pass the exact betas instead, beta_i = 1 - alpha((i+1)/T) / alpha(i/T), so that alphas_cumprod[i] = alpha((i+1)/T)
    exactly and timestep i is continuous time (i+1)/T. "trailing" spacing starts the sampler at t = 1.
    """
    t = torch.arange(train_steps + 1, dtype=torch.float64) / train_steps
    alpha = schedule.alpha(t)
    betas = (1.0 - alpha[1:] / alpha[:-1]).tolist()
    return DDIMScheduler(
        num_train_timesteps=train_steps, trained_betas=betas, timestep_spacing="trailing",
        set_alpha_to_one=True, clip_sample=False, prediction_type="epsilon",
    )


@torch.no_grad()
def sample_ddim(
    eps: EpsFn,
    shape: tuple[int, ...],
    steps: int,
    *,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
    schedule: VPSchedule = VPSchedule(),
) -> ScoreSample:
    """Deterministic DDIM (eta = 0) with `steps` network evaluations; the last step lands on alpha = 1."""
    scheduler = ddim_scheduler(schedule)
    scheduler.set_timesteps(steps)
    x = standard_normal(shape, generator, device)
    for timestep in scheduler.timesteps:
        t = (int(timestep) + 1) / scheduler.config.num_train_timesteps
        x = scheduler.step(eps(x, _full(x, t)), timestep, x).prev_sample
    return ScoreSample(images=x, log_probs=None)
