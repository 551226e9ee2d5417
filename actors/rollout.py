"""RolloutActor: a policy copy that samples groups with the stochastic prox sampler and streams finished groups; it
also draws and scores GRPO's held-out evaluation, so the driver runs no sampler and holds no reward model."""

from __future__ import annotations

import copy
import time
from typing import Optional, Sequence

import numpy as np
import torch

from actors.checkpoint import load_checkpoint
from actors.device import actor_device
from actors.experience import Group, SamplerSpec
from actors.reward import RewardClient, Threaded, process_memory_mb, set_threads
from actors.stream import ExperienceStream, RedisAddress
from proxmodel.generate import generate, hacking_monitors
from proxmodel.lora import BaseOf, LoraSpec, load_published, with_lora
from proxmodel.policy import Policy
from proxmodel.sampler import Trajectory


def group_seed(seed: int, iteration: int, prompt_index: int) -> int:
    """A distinct, reproducible noise seed per (run seed, iteration, prompt)."""
    return int(np.random.SeedSequence([seed, iteration, prompt_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def eval_seed(seed: int, noise: int, chunk: int) -> int:
    """The seed of the `noise`-th noise draw of held-out chunk `chunk`: reproducible, and apart from every group_seed."""
    return int(np.random.SeedSequence([seed, noise, chunk], spawn_key=(1,)).generate_state(1, dtype=np.uint64)[0] >> 1)


class RolloutActor(Threaded):
    """Samples G trajectories per prompt, has them scored, and writes each finished group to the stream.

    It samples on its device (the GPU Ray gave it, else the CPU), in bfloat16 when `bf16` (the learner's precision
    under deepspeed.bf16, so both compute the same function); images for the reward actors and stream entries leave
    on the CPU. Noise is drawn on the CPU and moved, so a group's noise is the same on any device.
    """

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
        bf16: bool = False,
        device: Optional[str] = None,
        keep_trajectory: bool = True,
        lora: Optional[LoraSpec] = None,
        stochastic_steps: Optional[int] = None,
        shared_start: bool = False,
        credit_block: int = 1,
    ):
        set_threads(torch_threads)
        self.device = actor_device(device)
        dtype = torch.bfloat16 if bf16 else torch.float32
        # (with LoRA the learner publishes only the adapters' weights)
        self.model = with_lora(load_checkpoint(checkpoint), lora).eval().to(self.device, dtype)
        self.lora = lora
        # The starting policy, for the drift monitor: the base with its adapters off under LoRA (no second copy),
        # else a frozen copy taken before any published weights arrive (a restarted actor starts from it too).
        self.reference = BaseOf(self.model) if lora else copy.deepcopy(self.model).requires_grad_(False)
        self.policy = Policy.of(self.model, steps, eta, guidance, stochastic_steps=stochastic_steps,
                                shared_start=shared_start, credit_block=credit_block)
        self.sampler = SamplerSpec.of(self.policy)
        self.group_size = group_size
        self.rewards = RewardClient(reward_actors, reward_timeout_s, reward_retries)
        self.weights = reward_weights
        self.stream = ExperienceStream(stream_address, run_id)
        self.version = 0
        self.keep_trajectory = keep_trajectory  # the policy-gradient learner needs it; the forward objective does not

    def placement(self) -> str:
        """The device this actor samples on (summary.json's `devices`)."""
        return str(self.device)

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        load_published(self.model, state, self.lora)  # copied into the model's own device and dtype
        self.version = version
        return version

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], prompt_indices: Sequence[int], iteration: int,
               seed: int) -> list[Trajectory]:
        """One group of trajectories per prompt, on this actor's device, with the noise of (seed, iteration, prompt)."""
        shape = self.model.sample_shape(self.group_size)
        out = []
        for prompt, index in zip(prompts, prompt_indices):
            context = self.model.encode_text(self.model.tokenize([prompt] * self.group_size, self.device))
            gen = torch.Generator().manual_seed(group_seed(seed, iteration, index))
            out.append(self.policy.sample(self.model, {"context": context}, shape, gen, self.device))
        return out

    def rollout(self, prompts: Sequence[str], prompt_indices: Sequence[int], iteration: int, seed: int) -> dict:
        """Sample, score and stream one group per prompt. Groups with a non-finite reward are dropped, and counted."""
        t0 = time.perf_counter()
        trajectories = self.sample(prompts, prompt_indices, iteration, seed)
        t1 = time.perf_counter()

        with torch.no_grad():
            images = torch.cat([self.model.to_images(tr.images) for tr in trajectories]).cpu()
        texts = [p for p in prompts for _ in range(self.group_size)]
        scores = self.rewards.score(images, texts, list(self.weights))
        t2 = time.perf_counter()

        written, dropped = [], 0
        for g, (prompt, index, traj) in enumerate(zip(prompts, prompt_indices, trajectories)):
            rows = slice(g * self.group_size, (g + 1) * self.group_size)
            trajectory = dict(states=traj.states.cpu(), log_probs=traj.log_probs.cpu()) if self.keep_trajectory else {}
            group = Group(prompt, index, iteration, self.version, self.sampler,
                          scores={name: scores[name][rows] for name in self.weights}, weights=self.weights,
                          samples=traj.images.float().cpu(), **trajectory)
            if not bool(torch.isfinite(group.reward).all()):
                dropped += 1
                continue
            written.append(self.stream.add(group))
        return {
            "groups": len(written),
            "dropped": dropped,
            "entry_ids": written,
            "sample_s": t1 - t0,
            "reward_s": t2 - t1,
            "policy_version": self.version,
            "threads": torch.get_num_threads(),
            "memory": process_memory_mb(),
        }

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str], steps: int, seeds: Sequence[int], eta: float, sampler: str,
                 guidance: float, rewards: Sequence[str]) -> dict:
        """Held-out evaluation with the current weights: `sampler`'s images of `prompts` with the noise of each of
        `seeds`, scored by the reward actors' `rewards`.

        Returns {"scores": {reward: float64 [prompts, seeds]}, "images": the first seed's images as uint8
        [prompts, C, H, W] on the CPU (for grids and the between-prompt diversity), "policy_version"}."""
        first, columns = None, {name: [] for name in rewards}
        for seed in seeds:
            images = generate(self.model, prompts, steps, seed, eta, sampler, guidance).float()
            first = images if first is None else first
            for name, scores in self.rewards.score(images, list(prompts), list(rewards)).items():
                columns[name].append(scores.double().numpy())
        return {"scores": {name: np.stack(cols, axis=1) for name, cols in columns.items()},
                "images": (first * 255).round().to(torch.uint8), "policy_version": self.version}

    @torch.no_grad()
    def monitors(self, prompts: Sequence[str], steps: int, seed: int, eta: float, group: int,
                 guidance: float) -> dict[str, float]:
        """The reward-hacking monitors (proxmodel.generate.hacking_monitors) of the current weights against the
        starting policy, on this actor's device."""
        return hacking_monitors(self.model, self.reference, prompts, steps, seed, eta, group, guidance)
