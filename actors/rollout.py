"""RolloutActor: a policy copy that samples groups with the stochastic prox sampler and streams finished groups."""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch

from actors.checkpoint import load_checkpoint
from actors.reward import RewardClient, set_threads
from actors.stream import ExperienceStream, RedisAddress
from proxmodel.policy import Policy
from proxmodel.sampler import Trajectory
from rewards import weighted_sum


def group_seed(seed: int, iteration: int, prompt_index: int) -> int:
    """A distinct, reproducible noise seed per (run seed, iteration, prompt)."""
    return int(np.random.SeedSequence([seed, iteration, prompt_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def group_entry(prompt: str, prompt_index: int, iteration: int, version: int, policy: Policy, traj: Trajectory,
                per_model: dict[str, torch.Tensor], total: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    """The stream entry of one finished group: JSON metadata and the tensors the learner needs."""
    meta = {
        "prompt": prompt,
        "prompt_index": int(prompt_index),
        "iteration": int(iteration),
        "policy_version": int(version),
        "kind": policy.kind,
        "steps": int(traj.states.shape[1]),
        "eta": policy.eta,
        "guidance": policy.guidance,
    }
    tensors = {"states": traj.states, "log_probs": traj.log_probs, "reward": total}
    tensors.update({f"reward/{name}": v for name, v in per_model.items()})
    return meta, tensors


class RolloutActor:
    """Samples G trajectories per prompt, has them scored, and writes each finished group to the stream."""

    def __init__(
        self,
        checkpoint: str | dict[str, bytes],
        steps: int,
        group_size: int,
        eta: float,
        guidance: float,
        reward_actors: list,
        reward_weights: dict[str, float],
        reward_timeout_s: float,
        reward_retries: int,
        stream_address: RedisAddress,
        run_id: str,
        torch_threads: int = 0,
    ):
        set_threads(torch_threads)
        self.model = load_checkpoint(checkpoint).eval()
        self.policy = Policy.of(self.model, steps, eta, guidance)
        self.group_size = group_size
        self.rewards = RewardClient(reward_actors, reward_timeout_s, reward_retries)
        self.weights = reward_weights
        self.stream = ExperienceStream(stream_address, run_id)
        self.version = 0

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        self.model.load_state_dict(state)
        self.version = version
        return version

    @torch.no_grad()
    def rollout(self, prompts: Sequence[str], prompt_indices: Sequence[int], iteration: int, seed: int) -> dict:
        """Sample, score and stream one group per prompt. Groups with a non-finite reward are dropped, and counted."""
        t0 = time.perf_counter()
        shape = self.model.sample_shape(self.group_size)
        trajectories = []
        for prompt, index in zip(prompts, prompt_indices):
            tokens = self.model.tokenize([prompt] * self.group_size)
            context = self.model.encode_text(tokens)
            gen = torch.Generator().manual_seed(group_seed(seed, iteration, index))
            trajectories.append(self.policy.sample(self.model, {"context": context}, shape, gen))
        t1 = time.perf_counter()

        images = torch.cat([self.model.to_images(tr.images) for tr in trajectories])
        texts = [p for p in prompts for _ in range(self.group_size)]
        scores = self.rewards.score(images, texts)
        t2 = time.perf_counter()

        written, dropped = [], 0
        for g, (prompt, index, traj) in enumerate(zip(prompts, prompt_indices, trajectories)):
            rows = slice(g * self.group_size, (g + 1) * self.group_size)
            per_model = {name: scores[name][rows] for name in self.weights}
            total = weighted_sum(per_model, self.weights)
            if not all(math.isfinite(v) for v in total.tolist()):
                dropped += 1
                continue
            meta, tensors = group_entry(prompt, index, iteration, self.version, self.policy, traj, per_model, total)
            written.append(self.stream.add(meta, tensors))
        return {
            "groups": len(written),
            "dropped": dropped,
            "entry_ids": written,
            "sample_s": t1 - t0,
            "reward_s": t2 - t1,
            "policy_version": self.version,
        }
