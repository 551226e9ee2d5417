"""The forward-process RL objective for prox models: proximal matching on the policy's own samples, reward-tilted.

Derivation (docs/forward_objective.md): the KL-regularised reward objective max_p E_p[r] - tau KL(p || p_old) is
maximised by the tilted distribution p*(x | c) ~ p_old(x | c) exp(r(x, c) / tau). Pretraining on samples of q
makes the learned prox that of q's noisy marginals, so pretraining on p* is what we want; a group of G samples of
p_old with self-normalised weights w_i = G softmax_i(beta A_i) is an importance-sampled batch of p*, with tau the
group's reward std over beta (A is the group-relative advantage). The loss is the pretraining loss itself, on the
same (t, lam) pairs the samplers query, weighted per sample; an optional anchor ||eps_theta - eps_ref||^2 on the same
inputs (the closed-form per-step KL of the two policies, up to lam / (2 gamma)) keeps the model near the reference.
No trajectories or log-probs are needed: any sampler may draw the images.
"""

from __future__ import annotations

import torch

from proxmodel.losses import make_training_pairs


def tilt_weights(advantages: torch.Tensor, beta: float) -> torch.Tensor:
    """w = G softmax(beta A) within each group (rows of [P, G]): mean 1 per group, all ones at beta = 0."""
    return advantages.shape[-1] * torch.softmax(beta * advantages.float(), dim=-1)


def weighted_matching_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                           zeta: float) -> torch.Tensor:
    """mean_i w_i [1 - exp(-||pred_i - target_i||^2 / (d zeta^2))]: proximal matching, sample i weighted by w_i."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (weights * (1.0 - torch.exp(-mse / (zeta * zeta)))).mean()


def forward_loss(model, x0: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, *, step_candidates: list[int],
                 variants: tuple[str, ...], zeta: float, generator: torch.Generator, reference=None,
                 anchor: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted proximal-matching loss of `model` (a ProxT2I or its engine) on clean samples x0 [B, ...].

    Pairs (y, t, lam, xi) are drawn exactly as in pretraining (proxmodel/losses.py) from `generator`; with a
    `reference` and anchor > 0 the mean squared eps difference to it on the same inputs is added.
    """
    from proxmodel.schedule import VPSchedule

    y, t, lam, xi = make_training_pairs(x0, VPSchedule(), step_candidates, generator, variants)
    eps = model(y, t, lam, tokens=tokens)
    loss = weighted_matching_loss(eps, xi, weights.to(eps.device), zeta)
    stats = {"forward_pm": loss.detach()}
    if reference is not None and anchor > 0:
        with torch.no_grad():
            eps_ref = reference(y, t, lam, tokens=tokens)
        drift = (eps - eps_ref).pow(2).flatten(1).mean(dim=1).mean()
        loss = loss + anchor * drift
        stats["anchor_mse"] = drift.detach()
    return loss, stats
