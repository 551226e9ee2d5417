"""The one experience type: a finished Group of G trajectories of one prompt.

A rollout actor makes it, the experience stream carries it (safetensors bytes + JSON, never pickle) and the learner
trains on it. The total reward exists in one place only, `Group.reward`: the weighted sum of the per-reward scores
the group carries, so the rollout (dropping non-finite groups) and the learner (advantages, logging) cannot disagree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rewards import weighted_sum

if TYPE_CHECKING:  # (only named in a signature: the reward actor, which imports this module, never loads the model)
    from proxmodel.policy import Policy

SCORE_PREFIX = "score/"


@dataclass(frozen=True)
class SamplerSpec:
    """Which sampler made the trajectories: the learner re-scores them only under the same one."""

    kind: str  # prox | score
    steps: int  # N: a trajectory has N states and N-1 transitions
    eta: float
    guidance: float
    stochastic_steps: Optional[int] = None  # only the first K transitions stochastic (and logged), the rest the ODE
    credit_block: int = 1  # the log-probs score s x s block means of the actions (Policy.credit_block)

    @classmethod
    def of(cls, policy: Policy) -> "SamplerSpec":
        return cls(policy.kind, policy.steps, policy.eta, policy.guidance, policy.stochastic_steps,
                   policy.credit_block)

    @property
    def transitions(self) -> int:
        return self.steps - 1 if self.stochastic_steps is None else self.stochastic_steps


@dataclass(frozen=True)
class Group:
    prompt: str
    prompt_index: int  # position in the run's prompt stream (seeds the group's noise)
    iteration: int
    policy_version: int  # the weights version that sampled it
    sampler: SamplerSpec
    scores: dict[str, torch.Tensor]  # reward name -> [G] float32
    weights: dict[str, float]  # reward name -> its weight in the total
    samples: torch.Tensor  # [G, C, H, W]: the final samples x_0 in model space (what the forward objective trains on)
    # The trajectory, for the policy-gradient objective (None when the learner trains the forward objective):
    states: Optional[torch.Tensor] = None  # [G, N, C, H, W]: y_N..y_1 (prox) or x at tau_{N-1}..tau_0 (score)
    log_probs: Optional[torch.Tensor] = None  # [G, N-1]: log pi of each recorded transition, mean over dims, float32

    def __post_init__(self) -> None:
        g = self.samples.shape[0]
        if (self.states is None) != (self.log_probs is None):
            raise ValueError("a group carries both states and log_probs (policy gradient) or neither (forward)")
        if self.states is not None:
            n = self.states.shape[1]
            if (self.states.shape[0] != g or n != self.sampler.steps
                    or tuple(self.log_probs.shape) != (g, self.sampler.transitions)):
                raise ValueError(f"a {self.sampler.steps}-step group of {g} needs states [{g}, {self.sampler.steps}, "
                                 f"...] and log_probs [{g}, {self.sampler.transitions}]; got "
                                 f"{tuple(self.states.shape)} and {tuple(self.log_probs.shape)}")
        if set(self.scores) != set(self.weights) or any(s.shape != (g,) for s in self.scores.values()):
            raise ValueError(f"scores {({k: tuple(v.shape) for k, v in self.scores.items()})} must be [{g}] for "
                             f"each weighted reward {sorted(self.weights)}")

    @property
    def size(self) -> int:
        return self.samples.shape[0]

    @property
    def key(self) -> str:
        """Its idempotency key: (iteration, prompt index) is unique in a run, and the same for a write repeated after a
        lost reply or a rollout sampled again, so the reader can train each group once."""
        return f"{self.iteration}:{self.prompt_index}"

    @property
    def has_trajectory(self) -> bool:
        return self.states is not None

    @property
    def reward(self) -> torch.Tensor:
        """[G] the total reward: the weighted sum of the scores (the only place it is computed)."""
        return weighted_sum(self.scores, self.weights)

    def to(self, device: torch.device | str) -> "Group":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device)

        return replace(self, samples=self.samples.to(device), states=move(self.states),
                       log_probs=move(self.log_probs), scores={k: v.to(device) for k, v in self.scores.items()})

    def to_wire(self) -> dict[str, bytes]:
        meta = {"prompt": self.prompt, "prompt_index": self.prompt_index, "iteration": self.iteration,
                "policy_version": self.policy_version, "sampler": asdict(self.sampler), "weights": self.weights}
        trajectory = {"states": self.states, "log_probs": self.log_probs} if self.has_trajectory else {}
        tensors = {"samples": self.samples, **trajectory, **{SCORE_PREFIX + k: v for k, v in self.scores.items()}}
        # clone: safetensors refuses tensors that share storage (rows of one rollout batch)
        return {"meta": json.dumps(meta).encode(),
                "tensors": st_save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()})}

    @classmethod
    def from_wire(cls, fields: dict[bytes, bytes]) -> "Group":
        meta, tensors = json.loads(fields[b"meta"]), st_load(fields[b"tensors"])
        scores = {k.removeprefix(SCORE_PREFIX): v for k, v in tensors.items() if k.startswith(SCORE_PREFIX)}
        return cls(prompt=meta["prompt"], prompt_index=meta["prompt_index"], iteration=meta["iteration"],
                   policy_version=meta["policy_version"], sampler=SamplerSpec(**meta["sampler"]), scores=scores,
                   weights=meta["weights"], samples=tensors["samples"], states=tensors.get("states"),
                   log_probs=tensors.get("log_probs"))
