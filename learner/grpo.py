"""GRPO mode: the driver loop of DESIGN.md's data flow, and the learner that runs inside a Ray actor.

One iteration:
  1. draw P prompts; rollout actors sample G trajectories each with the stochastic prox sampler (tagged with the
     policy version), have them scored by reward actors and write finished groups to the Redis stream;
  2. the learner reads the groups, computes group-relative advantages and the clipped policy loss over the
     sampler steps, takes one optimiser step, and acknowledges the entries only after the step;
  3. the new weights are published (Ray object store, versioned) to the rollout actors.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from pathlib import Path

import torch
from tqdm import tqdm

from actors.reward import RewardActor, set_threads
from actors.rollout import RolloutActor
from actors.stream import EmbeddedRedis, ExperienceStream, RedisAddress, learner_group
from learner.config import ConfigError, RunConfig
from learner.env import OFFLINE_ENV
from learner.evaluation import evaluate, hacking_monitors, save_grid
from learner.policy_loss import PromptStats, clipped_policy_loss, compute_advantages, select_train_steps
from learner.pretrain import EVAL_SEED_OFFSET
from learner.tracking import Tracker
from proxmodel.model import load_model, prox_fn, save_state
from proxmodel.sampler import gaussian_kl, hybrid_step
from proxmodel.schedule import VPSchedule
from rewards import build as build_reward
from rewards.scenes import scene_prompts

# Environment every actor needs: offline hubs, no telemetry, CPU DeepSpeed where there is no GPU.
ACTOR_ENV_KEYS = (*OFFLINE_ENV, "DS_ACCELERATOR")


class GrpoLearner:
    """One DeepSpeed rank of the policy learner (a Ray actor).

    Every rank reads the whole batch through its own consumer group, computes the same advantages, and trains its
    shard of the groups (rank r takes groups r, r + world, ...). Each rank's loss is scaled so DeepSpeed's gradient
    average equals the mean over all trajectories: the update does not depend on the number of ranks.
    """

    def __init__(self, checkpoint: str, cfg_json: str, stream_address: RedisAddress, run_id: str,
                 rank: int = 0, world_size: int = 1, master_port: int | None = None):
        from learner.engine import build_engine, init_distributed

        self.cfg = RunConfig.model_validate_json(cfg_json)
        g = self.cfg.grpo
        set_threads(self.cfg.actors.torch_threads)
        init_distributed(rank, world_size, master_port=master_port)
        self.rank, self.world = rank, world_size
        self.model = load_model(checkpoint)
        self.grid = VPSchedule().grid(g.steps)
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
        self.reference = load_model(checkpoint).eval().requires_grad_(False) if g.kl_coef > 0 else None

    def train(self, iteration: int, n_groups: int) -> dict:
        g = self.cfg.grpo
        entries = self.stream.read(consumer=f"rank{self.rank}", count=n_groups)
        ids = [entry_id for entry_id, _, _ in entries]
        metas = [meta for _, meta, _ in entries]
        for meta in metas:
            if meta["steps"] != self.grid.steps or meta["eta"] != g.eta:
                raise RuntimeError(f"stream entry from a sampler with steps={meta['steps']}, eta={meta['eta']}; "
                                   f"this learner trains steps={self.grid.steps}, eta={g.eta}")
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
        """Clipped policy loss (+ KL) of transition j (step k = N - j) over this rank's groups, scaled for ranks.

        Log-probs are recomputed group by group, in the rollout's batch shapes, so the first on-policy ratio is
        exactly 1.
        """
        g, k = self.cfg.grpo, self.grid.steps - j
        steps = [
            hybrid_step(prox_fn(self.engine, tokens=tok), s[:, j], self.grid, k, eta=g.eta, y_next=s[:, j + 1])
            for tok, s, _, _ in batch
        ]
        log_probs = torch.cat([st.log_prob for st in steps])
        old = torch.cat([lp[:, j] for _, _, lp, _ in batch])
        adv = torch.cat([a for _, _, _, a in batch])
        loss, stats = clipped_policy_loss(log_probs, old, adv, g.clip_range)
        if self.reference is not None:
            with torch.no_grad():
                ref = [
                    hybrid_step(prox_fn(self.reference, tokens=tok), s[:, j], self.grid, k, eta=g.eta, y_next=s[:, j + 1]).mean
                    for tok, s, _, _ in batch
                ]
            var = g.eta**2 * self.grid.gamma_at(k - 1)
            kl = torch.cat([gaussian_kl(st.mean, r, var) for st, r in zip(steps, ref)]).mean()
            loss = loss + g.kl_coef * kl
            stats["kl"] = kl.detach()
        # clipped_policy_loss averages over this shard; DeepSpeed averages over ranks: rescale to the global mean.
        return loss * (len(adv) * self.world / n_total), stats

    def publish(self) -> tuple[dict[str, torch.Tensor], int]:
        """Full weights and version (every rank must call it: ZeRO-3 gathers collectively)."""
        from learner.engine import full_state_dict

        return full_state_dict(self.engine), self.version

    def save(self, directory: str) -> str | None:
        """Rank 0 writes the checkpoint (every rank must call it under ZeRO-3)."""
        from learner.engine import full_state_dict

        state = full_state_dict(self.engine)
        return str(save_state(state, self.model.cfg, directory).resolve()) if self.rank == 0 else None


class LearnerGroup:
    """The learner ranks: Ray actors in one placement group (packed where the cluster allows)."""

    def __init__(self, ray, cfg: RunConfig, checkpoint: str, address: RedisAddress, run_id: str):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from learner.engine import free_port

        self.ray = ray
        spec = cfg.actors.learner
        bundle = {"CPU": spec.num_cpus, **({"GPU": spec.num_gpus} if spec.num_gpus else {})}
        self.placement = placement_group([bundle] * spec.count, strategy="PACK")
        ray.get(self.placement.ready(), timeout=600)
        port = free_port()
        self.ranks = [
            ray.remote(GrpoLearner).options(
                num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=r),
            ).remote(checkpoint, cfg.model_dump_json(), address, run_id, r, spec.count, port)
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


def _start_ray(cfg: RunConfig):
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {k: os.environ[k] for k in ACTOR_ENV_KEYS if k in os.environ}
    if address:
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        except Exception as e:  # noqa: BLE001 - any failure to connect gets the same advice
            raise ConfigError(
                f"cannot join the Ray cluster at {address!r} ({type(e).__name__}: {e}). Start it with `ray start "
                f"--head` or `ray up deploy/cluster.yaml`, or unset RAY_ADDRESS / ray.address to run locally."
            ) from e
        return ray, False
    a = cfg.actors
    needed = a.rollout.count * a.rollout.num_cpus + a.reward.count * a.reward.num_cpus + a.learner.count * a.learner.num_cpus
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    return ray, True


def run_grpo(cfg: RunConfig, run_dir: Path, tracker: Tracker, init_from: Path) -> dict:
    g, a = cfg.grpo, cfg.actors
    rewards_cfg = [r.model_dump() for r in cfg.rewards]
    weights = {r.name: r.weight for r in cfg.rewards}

    if cfg.redis.url:
        redis_server = None
        address = RedisAddress(url=cfg.redis.url, password=os.environ.get(cfg.redis.password_env))
    else:
        redis_server = EmbeddedRedis()
        address = redis_server.address
    ray, started_ray = None, False
    try:
        streams = [ExperienceStream(address, tracker.run_id, learner_group(r)) for r in range(a.learner.count)]
        for stream in streams:
            stream.create()
        ray, started_ray = _start_ray(cfg)
        reward_actors = [
            ray.remote(RewardActor).options(num_cpus=a.reward.num_cpus, num_gpus=a.reward.num_gpus)
            .remote(rewards_cfg, a.reward.batch_size, a.torch_threads, address if a.reward.cache else None,
                    a.reward.cache_ttl_s)
            for _ in range(a.reward.count)
        ]
        learners = LearnerGroup(ray, cfg, str(init_from), address, tracker.run_id)
        rollouts = [
            ray.remote(RolloutActor).options(num_cpus=a.rollout.num_cpus, num_gpus=a.rollout.num_gpus).remote(
                str(init_from), g.steps, g.group_size, g.eta, reward_actors, weights,
                a.reward.timeout_s, a.reward.retries, address, tracker.run_id, a.torch_threads,
            )
            for _ in range(a.rollout.count)
        ]

        eval_prompts = scene_prompts(g.prompt_seed, EVAL_SEED_OFFSET, g.eval_prompts, cfg.data.omit_prob)
        eval_rewards = {r.name: build_reward(r.name, **r.options) for r in cfg.rewards}
        reference = load_model(init_from)

        def run_eval(model, step: int) -> dict[str, float]:
            """Held-out rewards (fixed noise, and the deterministic sampler), monitors and a grid, at `step`."""
            images, scores = evaluate(model, eval_prompts, g.steps, cfg.seed, eval_rewards, g.eta)
            _, det = evaluate(model, eval_prompts, g.steps, cfg.seed, eval_rewards, eta=0.0)
            monitors = hacking_monitors(model, reference, eval_prompts[:4], g.steps, cfg.seed, g.eta, g.group_size)
            tracker.metrics({**{f"eval_reward_{k}": v for k, v in scores.items()},
                             **{f"eval_det_reward_{k}": v for k, v in det.items()},
                             **{f"monitor_{k}": v for k, v in monitors.items()}}, step=step)
            tracker.image(save_grid(images, run_dir / "samples" / f"step{step:05d}.png"), f"samples/step{step:05d}.png")
            return scores

        before = run_eval(reference, 0)

        def launch(it: int) -> list:
            """Start iteration `it`'s rollouts; each actor runs them after the calls already queued on it."""
            first = it * g.prompts_per_iteration
            prompts = scene_prompts(g.prompt_seed, first, g.prompts_per_iteration, cfg.data.omit_prob)
            indices = list(range(first, first + g.prompts_per_iteration))
            shards = [(prompts[i :: len(rollouts)], indices[i :: len(rollouts)]) for i in range(len(rollouts))]
            return [r.rollout.remote(p, idx, it, cfg.seed) for r, (p, idx) in zip(rollouts, shards) if p]

        # Async mode: up to max_staleness iterations of rollouts run ahead of the learner. A rollout actor runs
        # its calls in order, so new weights reach it only between two whole batches, never inside a group.
        in_flight: deque[list] = deque()
        weight_updates: list = []
        current = None  # the model evaluated every eval_every iterations
        history, written_total, dropped_total = [], 0, 0
        start = time.time()
        bar = tqdm(range(g.iterations), desc="grpo", unit="it", dynamic_ncols=True)
        for it in bar:
            t0 = time.time()
            while len(in_flight) <= g.max_staleness and it + len(in_flight) < g.iterations:
                in_flight.append(launch(it + len(in_flight)))
            results = ray.get(in_flight.popleft())
            ray.get(weight_updates)  # surface a failed weight update; these finished before the rollouts did
            groups = sum(r["groups"] for r in results)
            dropped = sum(r["dropped"] for r in results)
            written_total, dropped_total = written_total + groups, dropped_total + dropped
            t1 = time.time()
            if groups == 0:
                tracker.metrics({"groups_dropped": dropped}, step=it)
                continue
            metrics = ray.get(learners.call("train", it, groups))[0]
            published = learners.call("publish", num_returns=2)
            state, version = published[0]  # every rank gathers (ZeRO-3); rank 0's copy is broadcast
            weight_updates = [r.set_weights.remote(state, version) for r in rollouts]
            version = ray.get([v for _, v in published])[0]
            t2 = time.time()
            images = groups * g.group_size
            metrics.update(
                groups_dropped=dropped, rollout_s=t1 - t0, update_s=t2 - t1,
                samples_per_s=images / (t2 - t0), policy_version=version,
                sample_s=max(r["sample_s"] for r in results), reward_s=max(r["reward_s"] for r in results),
            )
            tracker.metrics(metrics, step=it)
            if g.eval_every and (it + 1) % g.eval_every == 0 and it + 1 < g.iterations:
                current = current or load_model(init_from)
                current.load_state_dict(ray.get(state))
                run_eval(current, it + 1)
            history.append(metrics["reward_mean"])
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
        wall = time.time() - start

        checkpoint = Path(ray.get(learners.call("save", str(run_dir / "checkpoint")))[0])
        stream_entries, stream_pending = streams[0].length(), sum(s.pending() for s in streams)
        if stream_pending:
            raise RuntimeError(f"{stream_pending} stream entries were never acknowledged")
        after = run_eval(load_model(checkpoint), g.iterations)
        shutil.copyfile(run_dir / "samples" / f"step{g.iterations:05d}.png", run_dir / "samples.png")
        tracker.artifact(run_dir / "samples.png")
        if not history:
            raise RuntimeError(f"every group of every iteration was dropped ({dropped_total} groups): check the rewards")
        return {
            "iterations": g.iterations,
            "wall_time_s": wall,
            "samples_per_s": written_total * g.group_size / wall,
            "checkpoint": str(checkpoint),
            "reward_first": history[0],
            "reward_last": history[-1],
            "eval_reward_before": before,
            "eval_reward_after": after,
            "groups_written": written_total,
            "groups_dropped": dropped_total,
            "stream": {"key": streams[0].key, "entries": stream_entries, "pending": stream_pending},
        }
    finally:
        if ray is not None and started_ray:
            ray.shutdown()
        if redis_server is not None:
            redis_server.close()

