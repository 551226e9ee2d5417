"""The forward-process RL objective for prox models: the pretraining loss on the policy's own samples, split by
advantage into an implicit positive and negative policy around the sampling policy (after DiffusionNFT).

For a pair (y, t, lam) built from a rollout's clean sample x_0 with noise target xi, let e_old = eps_old(y) be the
sampling policy's prediction (the weights that drew the batch, frozen for it) and e = eps_theta(y). With the implicit
policies e+ = (1 - beta) e_old + beta e and e- = (1 + beta) e_old - beta e, the loss of the sample is

    r ||e+ - xi||^2 / d + (1 - r) ||e- - xi||^2 / d,      r = 1/2 + 1/2 clip(A / adv_scale, -1, 1),

whose minimiser is e = e_old + (1 / beta) E[(2r - 1)(xi - e_old) | y]: the reward-tilted correction, with no
self-distillation term (at r = 1/2 the gradient at e = e_old is zero), so the sampler's own biases are not trained
back into the model. docs/forward_objective.md derives it and says why the tilt is not a plain weighted loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from proxmodel.losses import make_training_pairs, x0_loss_scale
from proxmodel.schedule import VPSchedule


def optimality(advantages: torch.Tensor, adv_scale: float, negatives: bool = True) -> torch.Tensor:
    """r = 1/2 + 1/2 clip(A / adv_scale, -1, 1) in [0, 1]: how far a sample belongs to the positive policy.
    negatives=False: r = 1/2 for every below-average sample, whose loss then only holds e at e_old on it."""
    r = 0.5 + 0.5 * (advantages.float() / adv_scale).clamp(-1.0, 1.0)
    return r if negatives else r.clamp_min(0.5)


def split_loss(eps: torch.Tensor, eps_old: torch.Tensor, xi: torch.Tensor, r: torch.Tensor,
               beta: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i w_i [r_i ||e+_i - xi_i||^2 / d + (1 - r_i) ||e-_i - xi_i||^2 / d] (see the module docstring);
    w = 1 unless given (ForwardBatch.weight)."""
    eps, eps_old, xi = eps.float(), eps_old.float(), xi.float()
    positive = ((1 - beta) * eps_old + beta * eps - xi).pow(2).flatten(1).mean(dim=1)
    negative = ((1 + beta) * eps_old - beta * eps - xi).pow(2).flatten(1).mean(dim=1)
    per_sample = r * positive + (1 - r) * negative
    return (per_sample if weight is None else weight * per_sample).mean()


@dataclass(frozen=True)
class ForwardBatch:
    """Pairs built once per batch from the rollouts' samples, with the sampling policy's prediction on them."""

    y: torch.Tensor
    t: torch.Tensor
    lam: torch.Tensor
    xi: torch.Tensor
    tokens: torch.Tensor
    eps_old: torch.Tensor
    r: torch.Tensor
    weight: torch.Tensor | None = None  # [B] per-pair loss weight (loss_space x0); None = 1

    @classmethod
    def build(cls, model, x0: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor, *,
              step_candidates: list[int], variants: tuple[str, ...], adv_scale: float,
              generator: torch.Generator, tie: int = 1, negatives: bool = True,
              target: str = "noise", loss_space: str = "eps") -> "ForwardBatch":
        """(t, lam) drawn as in pretraining from the (steps, variants) the model was trained on; e_old from `model`
        as it is now (call before the batch's first optimiser step). tie = G: the G samples of a group (consecutive
        in x0) share their (t, lam) and noises, so the part of their losses' gradients that does not depend on the
        sample cancels in the advantage-weighted sum (sum_i (2 r_i - 1) = 0 in a group). target = conditional:
        xi is replaced by E[xi | x0, y] (pretrain.target), which leaves the minimiser above unchanged (r depends on
        the sample only) and removes the noise of how y's noise splits between x_t and xi. loss_space = x0 (needs
        target conditional): each pair's squared residuals are weighted by x0_loss_scale^2, so the loss is the
        implied clean images' squared error wherever x0 enters the target with weight k < 1, as in
        pretrain.loss_space=x0: the early, layout-deciding steps are no longer ~1/k^2 quieter than the late ones."""
        if loss_space == "x0" and target != "conditional":
            raise ValueError("loss_space=x0 needs target=conditional: only that target is k x0 + (a function of y)")
        schedule = VPSchedule()
        y, t, lam, xi = make_training_pairs(x0, schedule, step_candidates, generator, variants, tie, target)
        with torch.no_grad():
            eps_old = model(y, t, lam, tokens=tokens)
        weight = x0_loss_scale(t, lam, schedule).pow(2) if loss_space == "x0" else None
        return cls(y, t, lam, xi, tokens, eps_old, optimality(advantages, adv_scale, negatives).to(y.device), weight)


def forward_loss(model, batch: ForwardBatch, beta: float, reference=None,
                 anchor: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The split loss of `model` on `batch`; with a `reference` and anchor > 0, plus anchor x the mean squared eps
    difference to it on the same inputs (the per-step KL of the two policies up to a constant)."""
    eps = model(batch.y, batch.t, batch.lam, tokens=batch.tokens)
    loss = split_loss(eps, batch.eps_old, batch.xi, batch.r, beta, batch.weight)
    stats = {"forward_loss": loss.detach(), "forward_step": (eps.detach() - batch.eps_old).pow(2).mean()}
    if reference is not None and anchor > 0:
        with torch.no_grad():
            eps_ref = reference(batch.y, batch.t, batch.lam, tokens=batch.tokens)
        drift = (eps - eps_ref).pow(2).flatten(1).mean(dim=1)
        drift = (drift if batch.weight is None else batch.weight * drift).mean()  # in the loss's own space
        loss = loss + anchor * drift
        stats["anchor_mse"] = drift.detach()
    return loss, stats
