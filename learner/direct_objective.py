"""The direct objective (grpo.objective direct): a differentiable reward backpropagated through the last K steps of
the prox sampler (DRaFT-K, ReFL), replayed on the rollouts' recorded trajectories.

A recorded trajectory y_N..y_1 fixes the noise of every transition: the policy that drew it put
y_{k-1} = mu_theta(y_k) + sigma_{k-1} z_{k-1}. Replaying the last K steps from the recorded y_K with the current
weights and that noise,

    y_{k-1} = mu_theta(y_k) + sg(y_{k-1}^rec - mu_theta(y_k)),      x_0 = prox_theta(y_1; 0, gamma_1, c)

(sg = stop-gradient) has the recorded values on policy and the reparameterised gradient: d y_{k-1} / d theta flows
through mu_theta and, through y_k, through every replayed step before it. The loss is -R(x_0, c) for a reward that
is differentiable in the pixels (`rewards.base.RewardModel.differentiable`), so the policy gets the reward's exact
pixel gradient per image instead of one scalar per image; no advantages, no likelihood ratios. After the first
optimiser step of a batch the recorded states stay the path and the noise is what makes them so under the moved
weights (the replay is then off-policy, like the policy gradient's later passes).

With `detach_inputs` (DRTune, Wu et al. 2024) every replayed network call sees its input with the gradient stopped,
prox(y) -> prox(sg y) + (y - sg y): the values are unchanged and the gradient reaches each step's output only along
the sampler's linear path (d y_{k-1} / d y_k = the scale of the half-step), not through the Jacobians of the later
networks. Each step then gets the reward's pixel gradient at roughly its own size, the early steps, where a scene's
layout is decided, as much as the last; through the full chain their gradient is the product of up to N network
Jacobians (measured: at lr 3e-4 the 10-step chain collapsed the policy to blank images). Detached, the steps'
gradients are separate terms, so a random subset of them (grpo.train_step_fraction) can be trained per batch at the
cost of its backward passes only, scaled to estimate the whole sum without bias.

The KL to the frozen reference, as in the policy gradient: ||mu_theta - mu_ref||^2 / (2 var) per replayed
transition, and for the final prox the same with the variance of the noise in y_1 (the last transition's), mean
over dimensions and steps.
"""

from __future__ import annotations

from typing import Collection, Optional, Sequence

import torch
from torch import nn

from proxmodel.model import prox_fn
from proxmodel.policy import Policy
from proxmodel.sampler import gaussian_kl, hybrid_step
from rewards.base import RewardModel


def check_policy(policy: Policy) -> None:
    if policy.kind != "prox":
        raise ValueError("grpo.objective direct replays the prox sampler; this checkpoint is a score model (use "
                         "grpo.objective policy_gradient for it)")


def replay(model: nn.Module, policy: Policy, tokens: torch.Tensor, states: torch.Tensor, last_steps: int,
           detach_inputs: bool = False,
           trained: Optional[Collection[int]] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The last `last_steps` sampler steps re-run from the recorded y_K (states [B, N, ...], index 0 = y_N) under
    `model`, with the recorded noise: returns x_0 and the policy means of the replayed transitions (y_{K-1}..y_1).
    `detach_inputs`: the networks' inputs carry no gradient; it flows between steps along the sampler's linear path
    only. `trained` (with detach_inputs): the steps k whose network call keeps its graph, their gradient scaled by
    last_steps / len(trained) so a random subset estimates the whole gradient without bias; the others keep none."""
    n = policy.steps
    check_policy(policy)
    if not 1 <= last_steps <= n:
        raise ValueError(f"grpo.direct_steps={last_steps}: between 1 and grpo.steps={n}")
    if trained is not None and not (detach_inputs and trained and set(trained) <= set(range(1, last_steps + 1))):
        raise ValueError(f"trained steps {sorted(trained)}: a non-empty subset of 1..{last_steps}, and only with "
                         "detached inputs (through the full chain a step without its graph would cut the gradient)")
    network_prox = prox_fn(model, policy.guidance, tokens=tokens)
    weight = last_steps / len(trained) if trained else 1.0

    def step_prox(k: int):
        def prox(y: torch.Tensor, t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
            if not detach_inputs:
                return network_prox(y, t, lam)
            frozen, keep = y.detach(), trained is None or k in trained
            with torch.set_grad_enabled(torch.is_grad_enabled() and keep):
                x = network_prox(frozen, t, lam)
            if keep and weight != 1.0:
                x = weight * x - (weight - 1.0) * x.detach()  # the same value, weight x the gradient
            return x + (y - frozen)

        return prox

    y, means = states[:, n - last_steps], []
    for k in range(last_steps, 0, -1):
        recorded = states[:, n - k + 1] if k > 1 else None
        out = hybrid_step(step_prox(k), y, policy.grid, k, eta=policy.eta, y_next=recorded, variant=policy.variant)
        if k == 1:
            return out.x, means
        means.append(out.mean)
        y = out.mean + (recorded - out.mean).detach()
    raise AssertionError("unreachable: the loop returns at k = 1")


def direct_loss(model: nn.Module, reference: Optional[nn.Module], policy: Policy, tokens: torch.Tensor,
                states: torch.Tensor, prompts: Sequence[str], reward: RewardModel, last_steps: int,
                kl_coef: float = 0.0, detach_inputs: bool = False,
                trained: Optional[Collection[int]] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-mean reward of the replayed x_0 (+ kl_coef x the KL to `reference` on the same inputs). Trajectories with a
    non-finite recorded state are left out before the network sees them (a NaN row in a batched call makes every
    weight's gradient NaN, 0 x NaN); a reward that is still not finite makes the loss NaN, and the step is skipped."""
    finite = torch.isfinite(states.flatten(1)).all(dim=1)
    keep = finite.nonzero().squeeze(1)
    tokens, states, prompts = tokens[keep], states[keep], [prompts[int(i)] for i in keep]
    x0, means = replay(model, policy, tokens, states, last_steps, detach_inputs, trained)
    network = getattr(model, "module", model)
    images = network.to_images(x0, clamp=False)  # a clamp would stop the gradient of every pixel past [0, 1]
    rewards = reward.score(images, prompts).to(x0.device)
    loss = -rewards.mean()
    stats = {"direct_reward": rewards.detach().mean(), "direct_images_dropped": (~finite).sum().float()}
    if reference is not None and kl_coef > 0:
        with torch.no_grad():
            ref_x0, ref_means = replay(reference, policy, tokens, states, last_steps)
        variances = [policy.variance(policy.steps - k) for k in range(last_steps, 1, -1)]
        variances.append(policy.variance(policy.steps - 2))
        pairs = list(zip(means + [x0], ref_means + [ref_x0], variances))
        kl = torch.stack([gaussian_kl(m, r, v).mean() for m, r, v in pairs]).mean()
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats
