"""The variance-preserving forward process and the step grids the proximal sampler walks (docs/method.md sec. 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VPSchedule:
    """dX = -1/2 beta(t) X dt + sqrt(beta(t)) dW with beta(t) linear on t in [0, 1]."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t: torch.Tensor | float) -> torch.Tensor | float:
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def beta_integral(self, a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor | float:
        """Exact int_a^b beta(s) ds (the step size gamma of the step from a to b)."""
        return self.beta_min * (b - a) + 0.5 * (self.beta_max - self.beta_min) * (b * b - a * a)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha(t) = exp(-int_0^t beta): the signal power left at time t."""
        return torch.exp(-self.beta_integral(torch.zeros_like(t), t))

    def grid(self, steps: int) -> "StepGrid":
        """The uniform grid t_k = k / steps: the one every sampler here walks and the prox is trained on."""
        if steps < 1:
            raise ValueError(f"a sampler needs at least 1 step, got steps={steps}")
        return self.grid_at(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64))

    def grid_at(self, points) -> "StepGrid":
        """The grid through `points` (0 = t_0 < ... < t_N = 1), e.g. coarse where a sample's outcome is not decided.

        The prox knows only the (t, lam) of the uniform grids it was trained on (pretrain.step_candidates): a grid
        stitched from their steps (e.g. 0, 0.2, 0.3, ..., 0.8, 1 from the 5- and 10-step grids) asks nothing new.
        """
        t = torch.as_tensor(points, dtype=torch.float64)
        if t.dim() != 1 or len(t) < 2 or float(t[0]) != 0.0 or float(t[-1]) != 1.0 or not bool((t[1:] > t[:-1]).all()):
            raise ValueError(f"grid points must rise strictly from 0 to 1, e.g. [0, 0.2, 0.6, 1]; got {t.tolist()}")
        return StepGrid(t=t, gamma=self.beta_integral(t[:-1], t[1:]), schedule=self)

    def min_steps_below(self, bound: float, limit: int = 100_000) -> int:
        """The smallest N whose uniform grid has every gamma_k < bound (the last step, near t = 1, is the largest)."""
        for n in range(1, limit + 1):
            if self.beta_integral(1.0 - 1.0 / n, 1.0) < bound:
                return n
        raise ValueError(f"no grid of at most {limit} steps has every gamma_k < {bound}")


@dataclass(frozen=True)
class StepGrid:
    """A grid 0 = t_0 < ... < t_N = 1 with gamma[k-1] = int_{t_{k-1}}^{t_k} beta (float64, indexed k-1)."""

    t: torch.Tensor
    gamma: torch.Tensor
    schedule: VPSchedule = VPSchedule()

    @property
    def steps(self) -> int:
        return len(self.gamma)

    def t_at(self, k: int) -> float:
        return float(self.t[k])

    def gamma_at(self, k: int) -> float:
        """gamma_k for k in 1..N."""
        return float(self.gamma[k - 1])


def sample_train_pairs(
    schedule: VPSchedule,
    step_candidates: list[int],
    batch: int,
    generator: torch.Generator | None = None,
    variants: tuple[str, ...] = ("hybrid",),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (t, lam) exactly as the prox samplers will query them (docs/method.md sec. 5).

    N ~ candidates with weights N^(1/3); t uniform on {0, 1/N, ..., 1 - 1/N}; gamma = int_t^{t + 1/N} beta. Each pair
    picks one of `variants` uniformly: lam = gamma (hybrid), gamma / 2 (flow: the probability-flow sampler) or
    gamma / (1 - gamma/2) (backward, only for step counts whose every gamma < 2; other N keep the hybrid lam).
    """
    cands = torch.tensor(step_candidates, dtype=torch.float64)
    weights = cands ** (1.0 / 3.0)
    n = cands[torch.multinomial(weights / weights.sum(), batch, replacement=True, generator=generator)]
    k = torch.floor(torch.rand(batch, generator=generator, dtype=torch.float64) * n)
    t = k / n
    lam = schedule.beta_integral(t, t + 1.0 / n)
    # One variant draws nothing, so a hybrid-only run's random stream is what it always was.
    pick = torch.randint(len(variants), (batch,), generator=generator) if len(variants) > 1 else torch.zeros(batch)
    if "backward" in variants:
        backward = (pick == variants.index("backward")) & (n >= schedule.min_steps_below(2.0))
        lam = torch.where(backward, lam / (1.0 - lam / 2.0), lam)
    if "flow" in variants:
        lam = torch.where(pick == variants.index("flow"), lam / 2.0, lam)
    return t.float(), lam.float()

