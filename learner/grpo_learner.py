"""The GRPO learner: one DeepSpeed rank per Ray actor (GrpoLearner), and the ranks as a group (LearnerGroup).

A rank reads groups from the stream (on the CPU), computes group-relative advantages there, moves its shard of the
batch to the engine's device, and takes one optimiser step per pass over the batch with the clipped policy loss
(+ the KL to the frozen reference, which lives on the same device), or, with grpo.objective=forward, with the
advantage-split pretraining loss on the groups' final samples (learner/forward_objective.py), or, with
grpo.objective=direct, with a differentiable reward backpropagated through the replayed last sampler steps
(learner/direct_objective.py). Weights leave on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from actors.checkpoint import load_checkpoint
from actors.experience import Group, SamplerSpec
from actors.net import rendezvous_address
from actors.reward import Threaded, process_memory_mb, set_threads
from actors.stream import ExperienceStream, RedisAddress, learner_group
from learner.anchor import DataAnchor
from learner.config import RunConfig
from learner.direct_objective import check_policy, direct_loss
from learner.ema import make_ema, update_ema
from learner.forward_objective import ForwardBatch, forward_loss
from learner.policy_loss import PromptStats, clipped_policy_loss, compute_advantages, select_train_steps
from proxmodel.lora import BaseOf, adapter_state, train_only, with_lora
from proxmodel.model import ProxT2I, empty_condition
from proxmodel.policy import Policy
from proxmodel.sampler import gaussian_kl
from rewards import build as build_reward


@dataclass(frozen=True)
class TrainGroup:
    """One group as a rank trains it, on the rank's device."""

    tokens: torch.Tensor  # [G, L] caption tokens
    samples: torch.Tensor  # [G, C, H, W] the final samples (model space)
    states: Optional[torch.Tensor]  # [G, N, C, H, W] as recorded by the rollout (policy gradient only)
    log_probs: Optional[torch.Tensor]  # [G, N-1] as recorded by the rollout (the "old" policy)
    advantages: torch.Tensor  # [G]
    context: Optional[torch.Tensor] = None  # [G, L, D] the encoded captions, when the text encoder is frozen

    @classmethod
    def of(cls, group: Group, advantages: torch.Tensor, model: ProxT2I, device: torch.device) -> "TrainGroup":
        on = group.to(device)
        tokens = model.tokenize([group.prompt] * group.size, device)
        context = None
        text = list(model.text.parameters())
        # Under ZeRO-3 this rank holds shards of the text weights (ds_id): the engine's forward gathers them, a call
        # here would not, and a gather here would be a collective over ranks with unequal numbers of groups.
        if not any(p.requires_grad or hasattr(p, "ds_id") for p in text):
            # Encoded once instead of twice per transition (policy and reference): the same frozen weights give the
            # same context, and a pretrained encoder (MiniLM) costs as much per call as the U-Net
            with torch.no_grad():
                context = model.encode_text(tokens)
        return cls(tokens, on.samples, on.states, on.log_probs, advantages.to(device), context)

    @property
    def condition(self) -> dict[str, torch.Tensor]:
        """What the network reads the captions from: the cached context, else the tokens."""
        return {"tokens": self.tokens} if self.context is None else {"context": self.context}

    @classmethod
    def merged(cls, groups: list["TrainGroup"]) -> "TrainGroup":
        """The groups as one batch (their images in order): one network call per transition instead of one per group."""
        def cat(name: str) -> Optional[torch.Tensor]:
            parts = [getattr(g, name) for g in groups]
            return None if parts[0] is None else torch.cat(parts)
        return cls(*(cat(f.name) for f in fields(cls)))


def transition_loss(model: nn.Module, reference: Optional[nn.Module], policy: Policy, batch: list[TrainGroup],
                    j: int, clip_range: float, kl_coef: float,
                    caption_contrast: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss (+ kl_coef x KL to `reference`) of transition j (0 = the noisiest), mean over `batch`.

    Log-probs are recomputed with one network call per entry of `batch`: groups in the rollout's batch shapes keep
    the first on-policy ratio exactly 1; one merged entry (TrainGroup.merged, grpo.recompute=batch) is faster and
    differs from 1 by kernel rounding only. Statistics stay tensors (on the model's device).

    caption_contrast lam: minus lam x the same advantage-weighted log-likelihood of the actions under the empty
    caption, so the objective is E[A (log pi(a | s, c) - lam log pi(a | s, empty))]: at lam = 1 whatever an update
    would change for every caption alike (a brighter, bigger, more saturated look) cancels, and only how the policy
    depends on its caption is trained. Its gradient is taken at the current weights (exp(l - l.detach()) has value 1
    and gradient grad l), with no clipping: it is off-policy only after the batch's first optimiser step.
    """
    steps = [policy.transition(model, b.condition, b.states, j) for b in batch]
    log_probs = torch.cat([st.log_prob for st in steps])
    old = torch.cat([b.log_probs[:, j] for b in batch])
    advantages = torch.cat([b.advantages for b in batch])
    loss, stats = clipped_policy_loss(log_probs, old, advantages, clip_range)
    if caption_contrast:
        empty = torch.cat([policy.transition(model, empty_condition(model, b.condition), b.states, j).log_prob
                           for b in batch]).float()
        loss = loss + caption_contrast * (advantages * torch.exp(empty - empty.detach())).mean()
        stats["caption_log_ratio"] = (log_probs.float() - empty).mean().detach()  # log pi(a|c) - log pi(a|empty)
    if reference is not None:
        with torch.no_grad():
            ref = [policy.transition(reference, b.condition, b.states, j).mean for b in batch]
        kl = torch.cat([gaussian_kl(st.mean, r, st.var) for st, r in zip(steps, ref)]).mean()
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """A generator of rank `rank`'s own noise: ranks train different groups and data, and noise drawn from one
    shared stream would be the same on every rank, correlating what should be independent estimates."""
    return torch.Generator().manual_seed((seed * 1_000_003 + 7919 * (rank + 1)) % 2**63)


MAX_STATS = ("ratio_max_dev", "log_ratio_abs_max", "first_pass_log_ratio_max")  # reported as the max, not the mean


def collect(sums: dict[str, list[torch.Tensor]], stats: dict) -> None:
    """Append one micro-step's statistics, left on their device: reading each on the host would wait for the GPU
    at every micro-step."""
    for name, value in stats.items():
        sums.setdefault(name, []).append(torch.as_tensor(value).detach().float().reshape(()))


def reduce_stats(sums: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """The collected statistics as floats in one transfer: the max of those in MAX_STATS, the mean of the rest."""
    names = list(sums)
    if not names:
        return {}
    reduced = [torch.stack(sums[n]).max() if n in MAX_STATS else torch.stack(sums[n]).mean() for n in names]
    return dict(zip(names, torch.stack([r.to(reduced[0].device) for r in reduced]).cpu().tolist()))


class GrpoLearner(Threaded):
    """One DeepSpeed rank of the policy learner (a Ray actor).

    Every rank reads the whole batch through its own consumer group, computes the same advantages, and trains its
    shard of the groups (rank r takes groups r, r + world, ...). Each rank's loss is scaled so DeepSpeed's gradient
    average equals the mean over all trajectories: the update does not depend on the number of ranks.
    """

    def __init__(self, checkpoint: str | dict[str, bytes], cfg_json: str, stream_address: RedisAddress, run_id: str,
                 rank: int = 0, world_size: int = 1, master: tuple[str, int] | None = None):
        from learner.engine import NonFiniteSteps, build_engine, init_distributed

        self.cfg = RunConfig.model_validate_json(cfg_json)
        g = self.cfg.grpo
        set_threads(self.cfg.actors.torch_threads)
        init_distributed(rank, world_size, *(master or ()))
        self.rank, self.world = rank, world_size
        self.lora = g.lora.spec()  # with LoRA only the adapters train and travel; the base stays as loaded
        self.model = with_lora(load_checkpoint(checkpoint), self.lora)
        if not self.lora and not g.train_text:  # out of the optimiser; the weights still travel with the rest
            self.model.text.requires_grad_(False)
        if g.train_modules:
            train_only(self.model, g.train_modules)
        # objective forward with ema_decay: rollouts sample from (and e_old is) an EMA of the trained weights, as
        # DiffusionNFT's soft-updated sampling policy; a full copy made before DeepSpeed partitions the model.
        self.ema = make_ema(self.model, g.ema_decay, warmup=False)
        self.policy = Policy.of(self.model, g.steps, g.eta, g.guidance, stochastic_steps=g.stochastic_steps,
                                credit_block=g.credit_block)
        self.step_rng = torch.Generator().manual_seed(self.cfg.seed)  # which transitions train: alike on every rank
        self.noise_rng = rank_generator(self.cfg.seed, rank)  # the forward pairs' and the data anchor's noise
        n_train = len(select_train_steps(self.policy.transitions, g.train_step_window, g.train_step_fraction,
                                         torch.Generator()))
        n_train = n_train if g.objective == "policy_gradient" else 1
        # One micro-batch per trained sampler transition (forward, direct: one per batch): one optimiser step per pass.
        self.engine = build_engine(
            self.model, lr=g.lr, weight_decay=g.weight_decay, grad_clip=g.grad_clip,
            zero_stage=self.cfg.deepspeed.zero_stage, bf16=self.cfg.deepspeed.bf16, grad_accum=n_train,
            adam_eps=g.adam_eps,
        )
        self.device = self.engine.device  # DeepSpeed put the module on the GPU Ray gave this rank, or the CPU
        if self.ema is not None:
            self.ema.to(self.device)
        self.anchor = DataAnchor(self.cfg, self.model, rank, world_size) if g.data_anchor > 0 else None
        self.stream = ExperienceStream(stream_address, run_id, group=learner_group(rank))
        self.version = 0
        self.nonfinite = NonFiniteSteps(g.max_nonfinite_updates)
        self.weights = {r.name: r.weight for r in self.cfg.rewards}
        self.direct_reward = build_reward(g.direct_reward) if g.objective == "direct" else None
        if self.direct_reward is not None:
            check_policy(self.policy)  # before the first batch, not at it
        self.prompt_stats = PromptStats(g.prompt_stats_buffer, g.prompt_stats_min_count)
        # The frozen starting policy for the KL term (kept only when it is used), in the engine's precision; with
        # LoRA the trained network itself with its adapters off.
        dtype = torch.bfloat16 if self.cfg.deepspeed.bf16 else torch.float32
        if g.kl_coef == 0:
            self.reference = None
        elif self.lora:
            self.reference = BaseOf(self.engine.module)
        else:
            self.reference = load_checkpoint(checkpoint).eval().requires_grad_(False).to(self.device, dtype)

    def check_source(self, groups: list[Group]) -> None:
        """Train only on groups from this learner's sampler and reward mix."""
        mine = SamplerSpec.of(self.policy)
        for group in groups:
            if group.sampler != mine:
                raise RuntimeError(f"stream entry from a sampler with {asdict(group.sampler)}; this learner "
                                   f"trains {asdict(mine)}")
            if group.weights != self.weights:
                raise RuntimeError(f"stream entry with reward weights {group.weights}; this learner uses {self.weights}")
            if self.cfg.grpo.objective != "forward" and not group.has_trajectory:
                raise RuntimeError(f"stream entry without its trajectory: objective {self.cfg.grpo.objective} "
                                   "replays the recorded transitions (was it written for grpo.objective=forward?)")

    def train(self, iteration: int, n_groups: int) -> dict:
        g = self.cfg.grpo
        duplicates = self.stream.duplicates
        entries = self.stream.read(consumer=f"rank{self.rank}", count=n_groups,
                                   timeout_s=self.cfg.actors.stream_read_timeout_s, iteration=iteration)
        duplicates = self.stream.duplicates - duplicates  # copies of groups already trained, acknowledged unread
        # Actors finish in whatever order the machine lets them; the batch must not (float sums follow its order).
        entries.sort(key=lambda entry: (entry[1].iteration, entry[1].prompt_index))
        ids, groups = [entry_id for entry_id, _ in entries], [group for _, group in entries]
        self.check_source(groups)
        rewards = {name: torch.stack([gr.scores[name] for gr in groups]) for name in self.weights}  # [P, G] each
        total = torch.stack([gr.reward for gr in groups])  # [P, G]
        advantages = compute_advantages(
            rewards, self.weights, [gr.prompt for gr in groups], aggregation=g.reward_aggregation,
            std=g.advantage_std, eps=g.adv_eps, clip=g.adv_clip, prompt_stats=self.prompt_stats,
        )
        lags = [self.version - gr.policy_version for gr in groups]
        kept = [i for i, lag in enumerate(lags) if lag <= g.max_staleness]  # the staleness bound
        if g.drop_zero_std_groups and g.objective != "direct":  # direct: every image has a reward gradient
            informative = [i for i in kept if float(total[i].std()) > 0]
            kept = informative if len(informative) >= self.world else kept  # every rank needs a group
        if len(kept) < self.world:  # too little fresh data for every rank: no update this time
            self.stream.ack(ids)
            return {"groups": len(ids), "groups_trained": 0, "groups_stale": len(ids) - len(kept),
                    "policy_lag_max": max(lags), "reward_mean": float(total.mean()),
                    "nonfinite_updates": self.nonfinite.total, "nonfinite_in_a_row": self.nonfinite.in_a_row,
                    "stream_duplicates": duplicates, "memory": process_memory_mb()}
        batch = [TrainGroup.of(groups[i], advantages[i], self.model, self.device) for i in kept[self.rank :: self.world]]
        # Each loss averages over this shard; DeepSpeed averages over ranks: rescale to the global mean.
        scale = sum(b.advantages.numel() for b in batch) * self.world / sum(groups[i].size for i in kept)
        # Eval mode: the policy is scored as the rollouts sampled it (eval mode, no dropout); a text encoder
        # pretrained with model.text.train keeps its dropout live in train mode, and the first ratio left 1.
        self.engine.eval()
        if g.objective == "forward":
            out = self._forward_updates(batch, scale)
        elif g.objective == "direct":
            prompts = [groups[i].prompt for i in kept[self.rank :: self.world] for _ in range(groups[i].size)]
            out = self._direct_updates(TrainGroup.merged(batch), prompts, scale)
        else:
            # Under ZeRO-3 every network call gathers the weights from all ranks, so every rank must make as many:
            # per-group calls with shards of unequal size (kept % world) would hang; one merged call per transition.
            uneven = self.cfg.deepspeed.zero_stage == 3 and len(kept) % self.world != 0
            out = self._policy_gradient_updates(batch, scale, merge=g.recompute == "batch" or uneven)
        acked = self.stream.ack(ids)
        if acked != len(ids):
            raise RuntimeError(f"acknowledged {acked} of {len(ids)} stream entries")
        self.version += 1
        out.update(
            reward_mean=float(total.mean()),
            reward_std=float(total.std(unbiased=False)),
            grad_norm=float(self.engine.get_global_grad_norm() or 0.0),
            nonfinite_updates=self.nonfinite.total,  # optimiser steps skipped so far (weights left as they were)
            nonfinite_in_a_row=self.nonfinite.in_a_row,
            groups=len(ids),
            groups_trained=len(kept),
            groups_stale=sum(lag > g.max_staleness for lag in lags),
            acked=acked,
            stream_duplicates=duplicates,
            policy_lag_max=max(lags),
            policy_lag_trained_max=max(lags[i] for i in kept),
            threads_learner=torch.get_num_threads(),  # set by the driver's layout (learner/layout.py)
            memory=process_memory_mb(),  # (the driver logs the largest rank's)
            **{f"reward_{name}": float(r.mean()) for name, r in rewards.items()},
        )
        return out

    def _policy_gradient_updates(self, batch: list[TrainGroup], scale: float, merge: bool) -> dict[str, float]:
        """updates_per_batch passes of the clipped policy loss over the trained transitions (one step per pass);
        merge: re-score the groups in one network call per transition instead of one per group."""
        from learner.engine import train_step  # DeepSpeed: imported in the rank's process only
        g = self.cfg.grpo
        if merge:
            batch = [TrainGroup.merged(batch)]
        sums: dict[str, list[torch.Tensor]] = {}
        for update in range(g.updates_per_batch):
            trained = select_train_steps(self.policy.transitions, g.train_step_window, g.train_step_fraction,
                                         self.step_rng)
            for i, j in enumerate(trained):
                loss, stats = transition_loss(self.engine, self.reference, self.policy, batch, j, g.clip_range,
                                              g.kl_coef, g.caption_contrast)
                last = i == len(trained) - 1  # once-per-optimiser-step terms go here, times len(trained): DeepSpeed
                if last and self.flow_kl_steps:  # divides each micro-step's loss by their number
                    drift = self._flow_drift(batch)
                    loss = loss + g.kl_coef * len(trained) * len(self.flow_kl_steps) / self.policy.transitions * drift
                    stats["kl_flow"] = drift.detach()
                loss = loss * scale
                if self.anchor is not None and last:
                    anchor = self._anchor_loss(update)
                    loss = loss + len(trained) * anchor
                    stats["anchor_loss"] = anchor.detach() / g.data_anchor
                train_step(self.engine, loss)
                if update == 0:  # before any optimiser step: how far the learner's function is from the rollout's
                    collect(sums, {"first_pass_log_ratio_max": stats["log_ratio_abs_max"],
                                   "first_pass_log_ratio_mean": stats["log_ratio_abs_mean"]})
                collect(sums, {"loss": loss.detach(), **stats})
            self.nonfinite.record(self.engine.was_step_applied())  # the pass's last micro-step was the optimiser step
        return reduce_stats(sums)

    @property
    def flow_kl_steps(self) -> list[int]:
        """The probability-flow transitions the KL term covers (none without a reference or grpo.kl_flow_steps)."""
        p = self.policy
        if self.reference is None or not self.cfg.grpo.kl_flow_steps or p.stochastic_steps is None:
            return []
        return list(range(p.stochastic_steps, p.steps - 1))

    def _flow_drift(self, batch: list[TrainGroup]) -> torch.Tensor:
        """The KL-style drift of one probability-flow transition, drawn uniformly, mean over the batch: with weight
        (N-1-K) / K next to the K trained transitions' mean it estimates the whole chain's per-transition KL."""
        steps = self.flow_kl_steps
        j = steps[int(torch.randint(len(steps), (1,), generator=self.step_rng))]
        return torch.cat([self.policy.flow_drift(self.engine, self.reference, b.condition, b.states, j)
                          for b in batch]).mean()

    def _forward_updates(self, batch: list[TrainGroup], scale: float) -> dict[str, float]:
        """updates_per_batch optimiser steps of the forward objective on the groups' samples, each on fresh (t, lam,
        noise) pairs (one per image, drawn from what the model was pretrained on): one pair per image is a very noisy
        estimate of the image's loss, so every step sees new ones. All e_old are the sampling policy's, computed
        before the first step."""
        g, cfg = self.cfg.grpo, self.model.cfg
        k = g.forward_pairs  # each image k times in a step, with its own pairs: one step, k times less noise
        x0 = torch.cat([b.samples for b in batch]).repeat(k, 1, 1, 1)
        tokens = torch.cat([b.tokens for b in batch]).repeat(k, 1)
        advantages = torch.cat([b.advantages for b in batch]).repeat(k)
        sampler = self.ema.module if self.ema is not None else self.engine  # the weights that drew the batch
        pairs = [ForwardBatch.build(sampler, x0, tokens, advantages, step_candidates=cfg.trained_steps or [g.steps],
                                    variants=tuple(cfg.trained_variants or ["hybrid"]),
                                    adv_scale=g.forward_adv_scale or math.sqrt(g.group_size - 1),
                                    generator=self.noise_rng, tie=g.group_size if g.forward_shared_noise else 1,
                                    negatives=g.forward_negatives, target=self.cfg.pretrain.target,
                                    loss_space=g.forward_loss_space)
                 for _ in range(g.updates_per_batch)]
        sums: dict[str, list[torch.Tensor]] = {}
        for u, update in enumerate(pairs):
            loss, stats = forward_loss(self.engine, update, g.forward_beta, self.reference, g.kl_coef)
            if self._optimiser_step(loss * scale, stats, u, sums) and self.ema is not None:
                update_ema(self.ema, self.engine)
        return reduce_stats(sums)

    def _direct_updates(self, batch: TrainGroup, prompts: list[str], scale: float) -> dict[str, float]:
        """updates_per_batch optimiser steps of the direct objective on the batch's recorded trajectories."""
        g = self.cfg.grpo
        sums: dict[str, list[torch.Tensor]] = {}
        for update in range(g.updates_per_batch):
            trained = None  # steps whose network keeps its graph: a random fraction, if asked, of the replayed ones
            if g.train_step_fraction < 1.0:
                trained = [g.direct_steps - i for i in select_train_steps(g.direct_steps, None, g.train_step_fraction,
                                                                          self.step_rng)]
            loss, stats = direct_loss(self.engine, self.reference, self.policy, batch.tokens, batch.states, prompts,
                                      self.direct_reward, g.direct_steps, g.kl_coef, g.direct_detach_inputs, trained)
            self._optimiser_step(loss * scale, stats, update, sums)
        return reduce_stats(sums)

    def _optimiser_step(self, loss: torch.Tensor, stats: dict, update: int,
                        sums: dict[str, list[torch.Tensor]]) -> bool:
        """One whole optimiser step on `loss` (+ the data anchor's, step `update` of the batch), its statistics
        appended to `sums`; whether it was applied (a non-finite one is skipped)."""
        from learner.engine import train_step  # DeepSpeed: imported in the rank's process only
        if self.anchor is not None:
            anchor = self._anchor_loss(update)
            loss = loss + anchor
            stats["anchor_loss"] = anchor.detach() / self.cfg.grpo.data_anchor
        train_step(self.engine, loss)
        applied = self.engine.was_step_applied()
        self.nonfinite.record(applied)
        collect(sums, {"loss": loss.detach(), **stats})
        return applied

    def _anchor_loss(self, update: int) -> torch.Tensor:
        """The data anchor's weighted loss for optimiser step `update` of this batch (the step index in the run
        follows from the policy version, so a resumed run takes the same data)."""
        step = self.version * self.cfg.grpo.updates_per_batch + update
        return self.anchor.loss(self.engine, self.model, step, self.noise_rng, self.device)

    def save_state(self) -> dict[str, bytes]:
        """This rank's part of a run state: DeepSpeed's engine files (weights, optimizer, ZeRO partitions), the
        policy version, PromptStats, the RNGs the updates draw from and the sampling EMA if any. Every rank must call it (a collective save)."""
        from learner.resume import engine_files, json_bytes, tensor_bytes

        files = {f"engine/{name}": data for name, data in engine_files(self.engine).items()}
        files[f"rank{self.rank}.json"] = json_bytes({"version": self.version, "prompt_stats": self.prompt_stats.state(),
                                                     "nonfinite": [self.nonfinite.total, self.nonfinite.in_a_row]})
        files[f"rank{self.rank}.safetensors"] = tensor_bytes({"step_rng": self.step_rng.get_state(),
                                                              "noise_rng": self.noise_rng.get_state(),
                                                              "torch_rng": torch.get_rng_state()})
        if self.ema is not None:  # the sampling policy (objective forward with grpo.ema_decay)
            files[f"rank{self.rank}-ema.safetensors"] = tensor_bytes(self.ema.state_dict())
        return files

    def load_state(self, files: dict[str, bytes]) -> int:
        """Continue from a run state (every rank's save_state merged); returns the policy version."""
        import json

        from learner.resume import load_engine_files, tensors_from

        load_engine_files(self.engine, {k.removeprefix("engine/"): v for k, v in files.items() if k.startswith("engine/")})
        mine = json.loads(files[f"rank{self.rank}.json"])
        self.version = mine["version"]
        self.nonfinite.total, self.nonfinite.in_a_row = mine.get("nonfinite", (0, 0))
        self.prompt_stats = PromptStats(self.prompt_stats.buffer, self.prompt_stats.min_count, mine["prompt_stats"])
        rng = tensors_from(files[f"rank{self.rank}.safetensors"])
        self.step_rng.set_state(rng["step_rng"])
        if "noise_rng" in rng:  # a state saved before the ranks drew their own noise goes on from a fresh stream
            self.noise_rng.set_state(rng["noise_rng"])
        torch.set_rng_state(rng["torch_rng"])
        if self.ema is not None:
            ema = tensors_from(files[f"rank{self.rank}-ema.safetensors"])
            self.ema.load_state_dict({k: v.to(self.device) for k, v in ema.items()})
        return self.version

    def placement(self) -> str:
        """The device this rank trains on (summary.json's `devices`)."""
        return str(self.device)

    def publish(self) -> tuple[Optional[dict[str, torch.Tensor]], int]:
        """The sampling policy's fp32 weights on the CPU (the EMA if there is one; only the adapters with LoRA), and
        the version. Every rank must call it (ZeRO-3 gathers collectively); only rank 0's weights are read, so the
        others return None instead of another copy of the model."""
        from learner.engine import full_state_dict

        if self.rank != 0:
            if self.ema is None:
                full_state_dict(self.engine, keep=False)  # the ZeRO-3 gather needs every rank
            return None, self.version
        if self.ema is not None:
            state = {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()}
        else:
            state = full_state_dict(self.engine)
        return (adapter_state(state) if self.lora else state), self.version


class LearnerGroup:
    """The learner ranks: Ray actors in one placement group (packed where the cluster allows)."""

    def __init__(self, ray, cfg: RunConfig, checkpoint: str | dict[str, bytes], address: RedisAddress, run_id: str,
                 run_dir: Path):
        """Bounded by actors.learner_timeout_s: a cluster that cannot place the ranks is a message naming it."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from learner.faults import wait_for

        self.ray = ray
        spec = cfg.actors.learner
        bundle = {"CPU": spec.num_cpus, **({"GPU": spec.num_gpus} if spec.num_gpus else {})}
        self.placement = placement_group([bundle] * spec.count, strategy="PACK")
        timeout, key = cfg.actors.learner_timeout_s, "actors.learner_timeout_s"
        wait_for(ray, [self.placement.ready()], [f"the placement of the learner ranks ({spec.count} x {bundle})"],
                 timeout, key, run_dir)

        def in_bundle(r: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=r)

        # Rank 0's node hosts the process-group rendezvous: its cluster IP and a port free there, passed to the
        # ranks as a reference (Ray resolves it before their constructors run): the driver goes on starting the other
        # actors meanwhile, their processes' start-up overlapping the ranks'.
        master = ray.remote(rendezvous_address).options(num_cpus=0, scheduling_strategy=in_bundle(0)).remote()
        self.ranks = [
            ray.remote(GrpoLearner).options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, scheduling_strategy=in_bundle(r))
            .remote(checkpoint, cfg.model_dump_json(), address, run_id, r, spec.count, master)
            for r in range(spec.count)
        ]

    def call(self, method: str, *args, num_returns: int = 1) -> list:
        """Call `method` on every rank (collectives need all of them); one result (ref) per rank."""
        return [getattr(rank, method).options(num_returns=num_returns).remote(*args) for rank in self.ranks]

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for rank in self.ranks:
            self.ray.kill(rank)
        remove_placement_group(self.placement)
