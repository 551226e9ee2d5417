"""GRPO mode: the driver loop of DESIGN.md's data flow, and the learner that runs inside a Ray actor.

One iteration:
  1. draw P prompts; rollout actors sample G trajectories each with the stochastic prox sampler (tagged with the
     policy version), have them scored by reward actors and write finished groups to the Redis stream;
  2. the learner reads the groups, computes group-relative advantages and the clipped policy loss over the
     sampler steps, takes one optimiser step, and acknowledges the entries only after the step;
  3. the new weights are published (Ray object store, versioned) to the rollout actors.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections import deque
from pathlib import Path

import torch
from tqdm import tqdm

from actors.checkpoint import load_checkpoint, pack
from actors.reward import RewardActor, set_threads
from actors.rollout import RolloutActor
from actors.stream import ExperienceStream, RedisAddress, learner_group
from learner.config import RunConfig
from learner.cluster import ensure_resources, start_ray, stream_server
from learner.evaluation import evaluate, hacking_monitors, save_grid
from learner.policy_loss import PromptStats, clipped_policy_loss, compute_advantages, select_train_steps
from learner.prompts import prompt_source
from learner.tracking import Tracker
from proxmodel.model import load_model, save_state
from proxmodel.policy import Policy
from proxmodel.sampler import gaussian_kl
from rewards import build as build_reward


class GrpoLearner:
    """One DeepSpeed rank of the policy learner (a Ray actor).

    Every rank reads the whole batch through its own consumer group, computes the same advantages, and trains its
    shard of the groups (rank r takes groups r, r + world, ...). Each rank's loss is scaled so DeepSpeed's gradient
    average equals the mean over all trajectories: the update does not depend on the number of ranks.
    """

    def __init__(self, checkpoint: str | dict[str, bytes], cfg_json: str, stream_address: RedisAddress, run_id: str,
                 rank: int = 0, world_size: int = 1, master: tuple[str, int] | None = None):
        from learner.engine import build_engine, init_distributed

        self.cfg = RunConfig.model_validate_json(cfg_json)
        g = self.cfg.grpo
        set_threads(self.cfg.actors.torch_threads)
        init_distributed(rank, world_size, *(master or ()))
        self.rank, self.world = rank, world_size
        self.model = load_checkpoint(checkpoint)
        self.policy = Policy.of(self.model, g.steps, g.eta, g.guidance)
        self.step_rng = torch.Generator().manual_seed(self.cfg.seed)
        n_train = len(select_train_steps(g.steps - 1, g.train_step_window, g.train_step_fraction, torch.Generator()))
        # One micro-batch per trained sampler transition: one optimiser step per pass over the batch.
        self.engine = build_engine(
            self.model, lr=g.lr, weight_decay=g.weight_decay, grad_clip=g.grad_clip,
            zero_stage=self.cfg.deepspeed.zero_stage, bf16=self.cfg.deepspeed.bf16, grad_accum=n_train,
        )
        self.stream = ExperienceStream(stream_address, run_id, group=learner_group(rank))
        self.version = 0
        self.weights = {r.name: r.weight for r in self.cfg.rewards}
        self.prompt_stats = PromptStats(g.prompt_stats_buffer, g.prompt_stats_min_count)
        # The frozen starting policy, for the KL term (kept only when it is used).
        self.reference = load_checkpoint(checkpoint).eval().requires_grad_(False) if g.kl_coef > 0 else None

    def train(self, iteration: int, n_groups: int) -> dict:
        g = self.cfg.grpo
        entries = self.stream.read(consumer=f"rank{self.rank}", count=n_groups)
        ids = [entry_id for entry_id, _, _ in entries]
        metas = [meta for _, meta, _ in entries]
        mine = {"kind": self.policy.kind, "steps": g.steps, "eta": g.eta, "guidance": g.guidance}
        for meta in metas:
            theirs = {key: meta.get(key) for key in mine}
            if theirs != mine:
                raise RuntimeError(f"stream entry from a sampler with {theirs}; this learner trains {mine}")
        prompts = [m["prompt"] for m in metas]
        rewards = {name: torch.stack([t[f"reward/{name}"] for _, _, t in entries]) for name in self.weights}
        total = torch.stack([t["reward"] for _, _, t in entries])  # [P, G]
        advantages = compute_advantages(
            rewards, self.weights, prompts, aggregation=g.reward_aggregation, std=g.advantage_std,
            eps=g.adv_eps, clip=g.adv_clip, prompt_stats=self.prompt_stats,
        )
        lags = [self.version - m["policy_version"] for m in metas]
        kept = [i for i, lag in enumerate(lags) if lag <= g.max_staleness]  # the staleness bound
        if g.drop_zero_std_groups:
            informative = [i for i in kept if float(total[i].std()) > 0]
            kept = informative if len(informative) >= self.world else kept  # every rank needs a group
        if len(kept) < self.world:  # too little fresh data for every rank: no update this time
            self.stream.ack(ids)
            return {"groups": len(ids), "groups_trained": 0, "groups_stale": len(ids) - len(kept),
                    "policy_lag_max": max(lags), "reward_mean": float(total.mean())}
        shard = kept[self.rank :: self.world]
        n_total = sum(entries[i][2]["states"].shape[0] for i in kept)
        batch = [
            (self.model.tokenize([prompts[i]] * entries[i][2]["states"].shape[0]), entries[i][2]["states"],
             entries[i][2]["log_probs"], advantages[i])
            for i in shard
        ]

        self.engine.train()
        sums: dict[str, list[float]] = {}
        for _ in range(g.updates_per_batch):
            for j in select_train_steps(g.steps - 1, g.train_step_window, g.train_step_fraction, self.step_rng):
                loss, stats = self._transition_loss(batch, j, n_total)
                self.engine.backward(loss)
                self.engine.step()
                for name, value in {"loss": loss.detach(), **stats}.items():
                    sums.setdefault(name, []).append(float(value))
        acked = self.stream.ack(ids)
        if acked != len(ids):
            raise RuntimeError(f"acknowledged {acked} of {len(ids)} stream entries")
        self.version += 1
        out = {name: (max(v) if name == "ratio_max_dev" else sum(v) / len(v)) for name, v in sums.items()}
        out.update(
            reward_mean=float(total.mean()),
            reward_std=float(total.std(unbiased=False)),
            grad_norm=float(self.engine.get_global_grad_norm() or 0.0),
            groups=len(ids),
            groups_trained=len(kept),
            groups_stale=sum(lag > g.max_staleness for lag in lags),
            acked=acked,
            policy_lag_max=max(lags),
            policy_lag_trained_max=max(lags[i] for i in kept),
            **{f"reward_{name}": float(r.mean()) for name, r in rewards.items()},
        )
        return out

    def _transition_loss(self, batch, j: int, n_total: int) -> tuple[torch.Tensor, dict]:
        """Clipped policy loss (+ KL) of transition j (0 = the noisiest) over this rank's groups, scaled for ranks.

        Log-probs are recomputed group by group, in the rollout's batch shapes, so the first on-policy ratio is
        exactly 1.
        """
        g = self.cfg.grpo
        steps = [self.policy.transition(self.engine, {"tokens": tok}, s, j) for tok, s, _, _ in batch]
        log_probs = torch.cat([st.log_prob for st in steps])
        old = torch.cat([lp[:, j] for _, _, lp, _ in batch])
        adv = torch.cat([a for _, _, _, a in batch])
        loss, stats = clipped_policy_loss(log_probs, old, adv, g.clip_range)
        if self.reference is not None:
            with torch.no_grad():
                ref = [self.policy.transition(self.reference, {"tokens": tok}, s, j).mean for tok, s, _, _ in batch]
            kl = torch.cat([gaussian_kl(st.mean, r, st.var) for st, r in zip(steps, ref)]).mean()
            loss = loss + g.kl_coef * kl
            stats["kl"] = kl.detach()
        # clipped_policy_loss averages over this shard; DeepSpeed averages over ranks: rescale to the global mean.
        return loss * (len(adv) * self.world / n_total), stats

    def publish(self) -> tuple[dict[str, torch.Tensor], int]:
        """Full weights and version (every rank must call it: ZeRO-3 gathers collectively)."""
        from learner.engine import full_state_dict

        return full_state_dict(self.engine), self.version


def _rendezvous_address() -> tuple[str, int]:
    import ray

    from learner.engine import free_port

    ip = ray.util.get_node_ip_address()
    return ip, free_port(ip)


class LearnerGroup:
    """The learner ranks: Ray actors in one placement group (packed where the cluster allows)."""

    def __init__(self, ray, cfg: RunConfig, checkpoint: str | dict[str, bytes], address: RedisAddress, run_id: str):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ray = ray
        spec = cfg.actors.learner
        bundle = {"CPU": spec.num_cpus, **({"GPU": spec.num_gpus} if spec.num_gpus else {})}
        self.placement = placement_group([bundle] * spec.count, strategy="PACK")
        ray.get(self.placement.ready(), timeout=600)

        def in_bundle(r: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=r)

        # Rank 0's node hosts the process-group rendezvous: its cluster IP and a port free there.
        master = ray.get(ray.remote(_rendezvous_address).options(num_cpus=0, scheduling_strategy=in_bundle(0)).remote())
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


def run_grpo(cfg: RunConfig, run_dir: Path, tracker: Tracker, init_from: Path) -> dict:
    """DESIGN.md's data flow: start Ray and the stream, start the actors, iterate, write the final checkpoint."""
    ray, started_ray = start_ray(cfg)
    redis_server = None
    try:
        ensure_resources(ray, cfg)
        address, redis_server = stream_server(cfg, on_cluster=not started_ray)
        run = GrpoRun(ray, cfg, run_dir, tracker, init_from, address)
        return run.finish(run.iterate())
    finally:
        if started_ray:
            ray.shutdown()
        if redis_server is not None:
            redis_server.close()


class GrpoRun:
    """One GRPO run's actors, prompt stream and evaluation, driven from the driver process."""

    def __init__(self, ray, cfg: RunConfig, run_dir: Path, tracker: Tracker, init_from: Path, address: RedisAddress):
        g, a = cfg.grpo, cfg.actors
        self.ray, self.cfg, self.run_dir, self.tracker = ray, cfg, run_dir, tracker
        self.streams = [ExperienceStream(address, tracker.run_id, learner_group(r)) for r in range(a.learner.count)]
        for stream in self.streams:
            stream.create()
        # The starting weights travel through the object store: actors on other nodes need no shared filesystem.
        packed = ray.put(pack(init_from))
        rewards_cfg = [r.model_dump() for r in cfg.rewards]
        reward_actors = [
            ray.remote(RewardActor).options(num_cpus=a.reward.num_cpus, num_gpus=a.reward.num_gpus)
            .remote(rewards_cfg, a.reward.batch_size, a.torch_threads, address if a.reward.cache else None,
                    a.reward.cache_ttl_s)
            for _ in range(a.reward.count)
        ]
        self.learners = LearnerGroup(ray, cfg, packed, address, tracker.run_id)
        weights = {r.name: r.weight for r in cfg.rewards}
        self.rollouts = [
            ray.remote(RolloutActor).options(num_cpus=a.rollout.num_cpus, num_gpus=a.rollout.num_gpus).remote(
                packed, g.steps, g.group_size, g.eta, g.guidance, reward_actors, weights,
                a.reward.timeout_s, a.reward.retries, address, tracker.run_id, a.torch_threads,
            )
            for _ in range(a.rollout.count)
        ]
        self.prompts = prompt_source(cfg)
        self.eval_prompts = self.prompts.held_out(g.eval_prompts)
        self.eval_rewards = {r.name: build_reward(r.name, **r.options) for r in cfg.rewards}
        self.reference = load_model(init_from)
        self.before = self.evaluate(self.reference, 0)

    def evaluate(self, model, step: int) -> dict[str, float]:
        """Held-out rewards (fixed noise, and the deterministic sampler), monitors and a grid, at `step`."""
        g, seed, prompts = self.cfg.grpo, self.cfg.seed, self.eval_prompts
        # The policy's own sampler with fixed noise, and its deterministic twin (the prox sampler at zero noise;
        # for a score model the probability-flow ODE).
        stochastic, deterministic = ("hybrid", "hybrid") if model.cfg.kind == "prox" else ("sde", "ode")
        images, scores = evaluate(model, prompts, g.steps, seed, self.eval_rewards, g.eta, stochastic, g.guidance)
        _, det = evaluate(model, prompts, g.steps, seed, self.eval_rewards, 0.0, deterministic, g.guidance)
        monitors = hacking_monitors(model, self.reference, prompts[:4], g.steps, seed, g.eta, g.group_size, g.guidance)
        self.tracker.metrics({**{f"eval_reward_{k}": v for k, v in scores.items()},
                              **{f"eval_det_reward_{k}": v for k, v in det.items()},
                              **{f"monitor_{k}": v for k, v in monitors.items()}}, step=step)
        grid = save_grid(images, self.run_dir / "samples" / f"step{step:05d}.png")
        self.tracker.image(grid, f"samples/step{step:05d}.png")
        return scores

    def launch(self, it: int) -> list:
        """Start iteration `it`'s rollouts; each actor runs them after the calls already queued on it."""
        n = self.cfg.grpo.prompts_per_iteration
        prompts, indices = self.prompts.train(it * n, n), list(range(it * n, (it + 1) * n))
        k = len(self.rollouts)
        shards = [(prompts[i::k], indices[i::k]) for i in range(k)]
        return [r.rollout.remote(p, idx, it, self.cfg.seed) for r, (p, idx) in zip(self.rollouts, shards) if p]

    def iterate(self) -> dict:
        """The iterations: rollouts (up to max_staleness ahead), one update per batch, weights out, evaluations."""
        ray, g, tracker = self.ray, self.cfg.grpo, self.tracker
        # A rollout actor runs its calls in order, so new weights reach it only between two whole batches.
        in_flight: deque[list] = deque()
        weight_updates: list = []
        current = None  # the model evaluated every eval_every iterations
        history, written, dropped_total = [], 0, 0
        start = time.time()
        deadline = start + g.time_limit_s if g.time_limit_s else float("inf")
        done = 0
        bar = tqdm(range(g.iterations), desc="grpo", unit="it", dynamic_ncols=True)
        for it in bar:
            t0 = time.time()
            while (len(in_flight) <= g.max_staleness and it + len(in_flight) < g.iterations
                   and (t0 < deadline or it + len(in_flight) == 0)):  # at least one iteration, whatever the limit
                in_flight.append(self.launch(it + len(in_flight)))
            if not in_flight:  # out of time, and every launched iteration has been trained
                break
            done = it + 1
            results = ray.get(in_flight.popleft())
            ray.get(weight_updates)  # surface a failed weight update; these finished before the rollouts did
            groups = sum(r["groups"] for r in results)
            dropped = sum(r["dropped"] for r in results)
            written, dropped_total = written + groups, dropped_total + dropped
            t1 = time.time()
            if groups == 0:
                tracker.metrics({"groups_dropped": dropped}, step=it)
                continue
            metrics = ray.get(self.learners.call("train", it, groups))[0]
            published = self.learners.call("publish", num_returns=2)
            state, version = published[0]  # every rank gathers (ZeRO-3); rank 0's copy is broadcast
            weight_updates = [r.set_weights.remote(state, version) for r in self.rollouts]
            version = ray.get([v for _, v in published])[0]
            t2 = time.time()
            metrics.update(
                groups_dropped=dropped, rollout_s=t1 - t0, update_s=t2 - t1,
                samples_per_s=groups * g.group_size / (t2 - t0), policy_version=version,
                sample_s=max(r["sample_s"] for r in results), reward_s=max(r["reward_s"] for r in results),
            )
            tracker.metrics(metrics, step=it)
            if g.eval_every and (it + 1) % g.eval_every == 0 and it + 1 < g.iterations:
                current = current or copy.deepcopy(self.reference)
                current.load_state_dict(ray.get(state))
                self.evaluate(current, it + 1)
            history.append(metrics["reward_mean"])
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
        if not history:
            raise RuntimeError(f"every group of every iteration was dropped ({dropped_total} groups): check the rewards")
        return {"wall_time_s": time.time() - start, "history": history, "written": written, "dropped": dropped_total,
                "iterations": done}

    def finish(self, loop: dict) -> dict:
        """Write the final checkpoint from the gathered weights (no learner node needs run_dir) and evaluate it."""
        g = self.cfg.grpo
        final = self.learners.call("publish", num_returns=2)
        checkpoint = save_state(self.ray.get(final[0][0]), self.reference.cfg, self.run_dir / "checkpoint").resolve()
        self.ray.get([v for _, v in final])
        entries, pending = self.streams[0].length(), sum(s.pending() for s in self.streams)
        if pending:
            raise RuntimeError(f"{pending} stream entries were never acknowledged")
        done = loop["iterations"]
        after = self.evaluate(load_model(checkpoint), done)
        shutil.copyfile(self.run_dir / "samples" / f"step{done:05d}.png", self.run_dir / "samples.png")
        self.tracker.artifact(self.run_dir / "samples.png")
        history, wall = loop["history"], loop["wall_time_s"]
        return {
            "iterations": done,
            "wall_time_s": wall,
            "samples_per_s": loop["written"] * g.group_size / wall,
            "checkpoint": str(checkpoint),
            "reward_first": history[0],
            "reward_last": history[-1],
            "eval_reward_before": self.before,
            "eval_reward_after": after,
            "groups_written": loop["written"],
            "groups_dropped": loop["dropped"],
            "stream": {"key": self.streams[0].key, "entries": entries, "pending": pending},
        }
