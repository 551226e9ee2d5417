"""A model's stochastic sampler seen as an RL policy: a chain of Gaussian transitions between recorded states.

- kind prox: the hybrid (or fully backward) prox sampler over its auxiliary states y_N..y_1 (docs/method.md sec. 3);
  the image is prox(y_1; 0, gamma_1), deterministic given y_1.
- kind score: Euler-Maruyama over x at tau_{N-1} = 1, ..., tau_0 = t_min (the DDPO / Flow-GRPO view of a score
  model); the image is the final denoising step from x at tau_0.

Either way a trajectory has N states ([B, N, ...]), N-1 transitions with Gaussian log-probs ([B, N-1], means over
dimensions, float32) and N network evaluations; with `stochastic_steps` K (prox) only the first K transitions are
stochastic and have log-probs ([B, K]), the rest follow the probability-flow ODE. Rollouts, the learner's
recomputation and evaluation all call `Policy.sample` / `Policy.transition`, so they can never disagree; classifier-free guidance (`guidance` w) is part of
the policy, so a guided rollout is scored under the same guided network by the learner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from proxmodel.model import prox_fn
from proxmodel.sampler import Trajectory, Variant, gaussian_kl, half_step, hybrid_step, made_by, sample_hybrid
from proxmodel.schedule import VPSchedule
from proxmodel.score import eps_fn, sample_score, score_times, sde_step

Kind = Literal["prox", "score"]


@dataclass(frozen=True)
class Transition:
    mean: torch.Tensor  # the policy's mean of the next state
    log_prob: torch.Tensor  # [B] log-density of the recorded next state, mean over dimensions, float32
    var: float  # the transition's variance per dimension (for the closed-form KL)


@dataclass(frozen=True)
class Policy:
    kind: Kind
    steps: int
    eta: float = 1.0
    guidance: float = 1.0
    variant: Variant = "hybrid"  # prox only: hybrid or fully backward
    # prox only: the first K transitions are the policy, the rest probability-flow steps (None: all N-1 are)
    stochastic_steps: Optional[int] = None
    # the rows of one sample() call (a GRPO group) start from the same noise: rewards then differ by the policy's
    # own actions alone (the start is independent of theta, so the log-probs and the learner do not change)
    shared_start: bool = False
    # s > 1: a transition's log-prob scores the s x s block means of its noise only (gaussian_log_prob). The rest of
    # the noise, fine detail the reward barely sees, then adds no variance to the policy gradient; the mean's fine
    # detail is trained by nothing but the KL (docs/credit_block.md)
    credit_block: int = 1

    def __post_init__(self) -> None:
        if self.stochastic_steps is not None:
            if self.kind != "prox":
                raise ValueError("stochastic_steps (stochastic early transitions, then the probability-flow ODE) is "
                                 "for prox models; a score model's policy has every transition stochastic")
            if not 1 <= self.stochastic_steps <= self.steps - 1:
                raise ValueError(f"stochastic_steps={self.stochastic_steps}: a {self.steps}-step sampler has "
                                 f"{self.steps - 1} transitions; use 1..{self.steps - 1}, or null for all of them")
        if self.credit_block < 1:
            raise ValueError(f"credit_block={self.credit_block}: use 1 (every dimension) or a block size > 1")

    @classmethod
    def of(cls, model: nn.Module, steps: int, eta: float = 1.0, guidance: float = 1.0,
           variant: Variant = "hybrid", stochastic_steps: Optional[int] = None,
           shared_start: bool = False, credit_block: int = 1) -> "Policy":
        """The policy of `model` (a ProxT2I, or a DeepSpeed engine around one)."""
        return cls(getattr(model, "module", model).cfg.kind, steps, eta, guidance, variant, stochastic_steps,
                   shared_start, credit_block)

    @property
    def transitions(self) -> int:
        """How many transitions a trajectory has log-probs for (0 = the noisiest)."""
        return self.steps - 1 if self.stochastic_steps is None else self.stochastic_steps

    @property
    def grid(self):
        return VPSchedule().grid(self.steps)

    @torch.no_grad()
    def sample(self, model: nn.Module, condition: dict[str, torch.Tensor], shape: tuple[int, ...],
               generator: Optional[torch.Generator] = None, device: torch.device | str = "cpu") -> Trajectory:
        """One trajectory per row of `condition` (`tokens=` or `context=`), with noise from `generator`."""
        if self.kind == "prox":
            return sample_hybrid(prox_fn(model, self.guidance, **condition), shape, self.grid, eta=self.eta,
                                 generator=generator, device=device, variant=self.variant,
                                 stochastic_steps=self.stochastic_steps, shared_start=self.shared_start,
                                 block=self.credit_block)
        out = sample_score(eps_fn(model, self.guidance, **condition), shape, self.steps, method="sde", eta=self.eta,
                           generator=generator, device=device, shared_start=self.shared_start,
                           block=self.credit_block)
        return Trajectory(states=out.states, images=out.images, log_probs=out.log_probs)

    def variance(self, j: int) -> float:
        """The noise variance of prox transition j (0 = the noisiest) when it is stochastic: (eta * noise_std)^2 of
        the half-step that draws it (sqrt(gamma) for hybrid, sqrt(gamma) / shrink for backward)."""
        return (self.eta * half_step(self.grid, self.steps - j - 1, self.variant).noise_std) ** 2

    def transition(self, model: nn.Module, condition: dict[str, torch.Tensor], states: torch.Tensor,
                   j: int) -> Transition:
        """Transition j (0 = the noisiest) of recorded `states` [B, N, ...] re-scored under `model` (with grad)."""
        if not 0 <= j < self.transitions:
            raise IndexError(f"transition {j} of a {self.steps}-step policy (it has {self.transitions})")
        if self.kind == "prox":
            k = self.steps - j
            out = hybrid_step(prox_fn(model, self.guidance, **condition), states[:, j], self.grid, k, eta=self.eta,
                              y_next=states[:, j + 1], variant=self.variant, block=self.credit_block)
            return Transition(out.mean, out.log_prob, self.variance(j))
        times = score_times(self.steps).tolist()
        t, t_next = times[self.steps - 1 - j], times[self.steps - 2 - j]
        out = sde_step(eps_fn(model, self.guidance, **condition), states[:, j], t, t_next, eta=self.eta,
                       x_next=states[:, j + 1], block=self.credit_block)
        var = self.eta**2 * float(VPSchedule().beta(t)) * (t - t_next)
        return Transition(out.mean, out.log_prob, var)

    def flow_step(self, model: nn.Module, condition: dict[str, torch.Tensor], states: torch.Tensor,
                  j: int) -> torch.Tensor:
        """The next state of probability-flow transition j (K <= j < N-1: deterministic, no log-prob) from recorded
        `states` [B, N, ...] under `model`."""
        if self.stochastic_steps is None or not self.stochastic_steps <= j < self.steps - 1:
            raise IndexError(f"transition {j} is not a probability-flow step of a {self.steps}-step policy with "
                             f"stochastic_steps={self.stochastic_steps}")
        k = self.steps - j
        return hybrid_step(prox_fn(model, self.guidance, **condition), states[:, j], self.grid, k, eta=0.0,
                           variant=made_by(self.steps, k, self.variant, self.stochastic_steps), next_variant="flow").y

    def flow_drift(self, model: nn.Module, reference: nn.Module, condition: dict[str, torch.Tensor],
                   states: torch.Tensor, j: int) -> torch.Tensor:
        """[B] how far `model` has moved probability-flow transition j from `reference`: the closed-form KL the
        trained stochastic step there would have between the two next states (squared difference over 2 eta^2
        gamma, mean over dimensions). The ODE steps carry no log-prob, so without this the KL to the reference binds
        on the first K transitions only, and the rest of the chain, the same network at other inputs, drifts
        unpenalised. Gradient through `model` only."""
        with torch.no_grad():
            target = self.flow_step(reference, condition, states, j)
        return gaussian_kl(self.flow_step(model, condition, states, j), target, self.variance(j))
