"""Proximal matching (docs/method.md sec. 5): the loss whose minimiser tends to the MAP denoiser, i.e. the prox."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from proxmodel.schedule import VPSchedule, sample_train_pairs


def proximal_matching_loss(pred: torch.Tensor, target: torch.Tensor, zeta: float) -> torch.Tensor:
    """mean_i [1 - exp(-||a_i - b_i||^2 / (d zeta^2))], d the data dimension of one sample."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (1.0 - torch.exp(-mse / (zeta * zeta))).mean()


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The score baseline's eps-MSE (its minimiser is the posterior mean of the noise: the MMSE denoiser)."""
    return (pred.float() - target.float()).pow(2).mean()


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).abs().mean()


@dataclass(frozen=True)
class LossSchedule:
    """L1 warm-up for `l1_frac` of training, then proximal matching with zeta0, then zeta0/2 (equal halves)."""

    total_steps: int
    l1_frac: float
    zeta0: float

    def stage(self, step: int) -> tuple[str, float]:
        """('l1', 0) or ('pm', zeta) at optimiser step `step` (0-based)."""
        warm = int(self.l1_frac * self.total_steps)
        if step < warm:
            return "l1", 0.0
        half = warm + (self.total_steps - warm) // 2
        return "pm", self.zeta0 if step < half else self.zeta0 / 2

    def loss(self, step: int, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kind, zeta = self.stage(step)
        return l1_loss(pred, target) if kind == "l1" else proximal_matching_loss(pred, target, zeta)


def make_training_pairs(
    x0: torch.Tensor,
    schedule: VPSchedule,
    step_candidates: list[int],
    generator: torch.Generator | None = None,
    variants: tuple[str, ...] = ("hybrid",),
    tie: int = 1,
    target: str = "noise",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, t, lam, target) with x_t = sqrt(alpha_t) x0 + sqrt(1 - alpha_t) xi', y = x_t + sqrt(lam) xi.

    The prox target is x_t; under prox = y - sqrt(lam) eps the regression target of eps is xi (target="noise",
    ProxDM), or E[xi | x0, y] (target="conditional", `conditional_noise`; pretrain.target). With tie = k, each
    run of k consecutive samples shares its (t, lam, xi, xi') (common random numbers for samples compared with
    each other, e.g. a GRPO group).
    """
    b = x0.shape[0]
    if tie < 1 or b % tie:
        raise ValueError(f"tie={tie} must divide the batch of {b} samples")
    t, lam = sample_train_pairs(schedule, step_candidates, b // tie, generator, variants)
    noise_shape = (b // tie, *x0.shape[1:])
    xi_t = torch.randn(noise_shape, generator=generator)
    xi = torch.randn(noise_shape, generator=generator)
    t, lam, xi_t, xi = (v.repeat_interleave(tie, dim=0).to(x0.device) for v in (t, lam, xi_t, xi))
    view = (-1,) + (1,) * (x0.dim() - 1)
    alpha = schedule.alpha(t).view(view)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * xi_t
    y = x_t + lam.sqrt().view(view) * xi
    if target == "conditional":
        xi = conditional_noise(y, x0, t, lam, schedule)
    return y, t, lam, xi


def conditional_noise(y: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, lam: torch.Tensor,
                      schedule: VPSchedule) -> torch.Tensor:
    """E[xi | x0, y]: the prox's regression target with the noise split between x_t and y averaged out.

    Given x0, the noise of y is n = y - sqrt(alpha_t) x0 = sqrt(1 - alpha_t) xi' + sqrt(lam) xi, and its two parts
    are jointly Gaussian, so E[xi | n] = sqrt(lam) n / (1 - alpha_t + lam). The target xi itself carries the
    unpredictable split (residual variance (1 - alpha_t) / (1 - alpha_t + lam) per dimension, 0.35-0.47 at the
    noisiest steps), which drowns the caption's part of the gradient; this target has the same conditional mean
    given (y, c), hence the same MSE minimiser, and none of that noise (docs/results.md, "The caption signal").
    """
    view = (-1,) + (1,) * (x0.dim() - 1)
    alpha, lam = schedule.alpha(t).view(view), lam.view(view)
    return lam.sqrt() * (y - alpha.sqrt() * x0) / (1.0 - alpha + lam)


def x0_loss_scale(t: torch.Tensor, lam: torch.Tensor, schedule: VPSchedule) -> torch.Tensor:
    """[B]: 1 / min(k, 1), k = sqrt(lam alpha_t) / (1 - alpha_t + lam) the weight of x0 in `conditional_noise`.

    An eps prediction implies a clean image; with the conditional target its residual is k times that image's error,
    so the residual times this scale is the x0 error wherever k < 1 (the noisy pairs) and stays the eps error
    elsewhere (pretrain.loss_space=x0)."""
    alpha = schedule.alpha(t)
    k = (lam * alpha).sqrt() / (1.0 - alpha + lam)
    return 1.0 / k.clamp(max=1.0)


def score_x0_loss_scale(t: torch.Tensor, schedule: VPSchedule) -> torch.Tensor:
    """[B]: 1 / min(k, 1), k = sqrt(alpha_t / (1 - alpha_t)) the ratio of an eps residual to the error of the clean
    image it implies (x0 = (x_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)): the score model's twin of
    `x0_loss_scale` (pretrain.loss_space=x0 for kind score)."""
    alpha = schedule.alpha(t)
    k = (alpha / (1.0 - alpha)).sqrt()
    return 1.0 / k.clamp(max=1.0)


def in_loss_space(eps: torch.Tensor, xi: torch.Tensor, t: torch.Tensor, lam: torch.Tensor, kind: str,
                  schedule: VPSchedule, space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) where pretrain.loss_space measures them: as they are (eps), or each pair's scaled by
    its x0_loss_scale (score_x0_loss_scale for kind score) so the residual is the implied clean image's error."""
    if space == "eps":
        return eps, xi
    scale = x0_loss_scale(t, lam, schedule) if kind == "prox" else score_x0_loss_scale(t, schedule)
    scale = scale.view(-1, *([1] * (eps.dim() - 1)))
    return eps * scale, xi * scale


def make_score_pairs(
    x0: torch.Tensor, schedule: VPSchedule, t_min: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, eps) with t ~ U(t_min, 1) and x_t = sqrt(alpha_t) x0 + sqrt(1 - alpha_t) eps: the score baseline's data."""
    b = x0.shape[0]
    t = (t_min + (1.0 - t_min) * torch.rand(b, generator=generator)).to(x0.device)
    view = (-1,) + (1,) * (x0.dim() - 1)
    alpha = schedule.alpha(t).view(view)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps, t, eps
