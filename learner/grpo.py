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
import time
from pathlib import Path

import torch
from tqdm import tqdm

from actors.reward import RewardActor, set_threads
from actors.rollout import RolloutActor
from actors.stream import EmbeddedRedis, ExperienceStream, RedisAddress
from learner.config import ConfigError, RunConfig
from learner.evaluation import evaluate, save_grid
from learner.policy_loss import clipped_policy_loss, group_advantages
from learner.pretrain import EVAL_SEED_OFFSET
from learner.tracking import Tracker
from proxmodel.model import load_model, prox_fn, save_model
from proxmodel.sampler import gaussian_kl, hybrid_step
from proxmodel.schedule import VPSchedule
from rewards import build as build_reward
from rewards.scenes import scene_prompts

# Environment every actor needs: offline hubs, no telemetry, CPU DeepSpeed where there is no GPU.
ACTOR_ENV_KEYS = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "MLFLOW_DISABLE_TELEMETRY",
    "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR",
)


class GrpoLearner:
    """One DeepSpeed rank of the policy learner (a Ray actor)."""

    def __init__(self, checkpoint: str, cfg_json: str, stream_address: RedisAddress, run_id: str):
        from learner.engine import build_engine, init_distributed

        self.cfg = RunConfig.model_validate_json(cfg_json)
        g = self.cfg.grpo
        set_threads(self.cfg.actors.torch_threads)
        init_distributed()
        self.model = load_model(checkpoint)
        self.grid = VPSchedule().grid(g.steps)
        # One micro-batch per sampler step with a log-prob: the optimiser steps once per iteration.
        self.engine = build_engine(
            self.model, lr=g.lr, weight_decay=g.weight_decay, grad_clip=g.grad_clip,
            zero_stage=self.cfg.deepspeed.zero_stage, bf16=self.cfg.deepspeed.bf16, grad_accum=g.steps - 1,
        )
        self.stream = ExperienceStream(stream_address, run_id)
        self.version = 0
        # The frozen starting policy, for the KL term (kept only when it is used).
        self.reference = load_model(checkpoint).eval().requires_grad_(False) if g.kl_coef > 0 else None

    def train(self, iteration: int, n_groups: int) -> dict:
        g = self.cfg.grpo
        entries = self.stream.read(consumer="rank0", count=n_groups)
        ids = [entry_id for entry_id, _, _ in entries]
        metas = [meta for _, meta, _ in entries]
        for meta in metas:
            if meta["steps"] != self.grid.steps or meta["eta"] != g.eta:
                raise RuntimeError(f"stream entry from a sampler with steps={meta['steps']}, eta={meta['eta']}; "
                                   f"this learner trains steps={self.grid.steps}, eta={g.eta}")
        states = [t["states"] for _, _, t in entries]  # each [G, N, C, H, W]
        old_log_probs = torch.cat([t["log_probs"] for _, _, t in entries])  # [P*G, N-1]
        rewards = torch.stack([t["reward"] for _, _, t in entries])  # [P, G]
        advantages = group_advantages(rewards, g.adv_eps).flatten()
        tokens = [self.model.tokenize([m["prompt"]] * s.shape[0]) for m, s in zip(metas, states)]

        self.engine.train()
        totals: dict[str, float] = {}
        for j, k in enumerate(range(self.grid.steps, 1, -1)):
            # Recompute log pi(y_{k-1} | y_k) group by group: the same batch shapes as the rollout, so the
            # first on-policy ratio is exactly 1.
            steps = [
                hybrid_step(prox_fn(self.engine, tokens=tok), s[:, j], self.grid, k, eta=g.eta, y_next=s[:, j + 1])
                for tok, s in zip(tokens, states)
            ]
            log_probs = torch.cat([st.log_prob for st in steps])
            loss, stats = clipped_policy_loss(log_probs, old_log_probs[:, j], advantages, g.clip_range)
            if self.reference is not None:
                with torch.no_grad():
                    ref_means = [
                        hybrid_step(prox_fn(self.reference, tokens=tok), s[:, j], self.grid, k, eta=g.eta, y_next=s[:, j + 1]).mean
                        for tok, s in zip(tokens, states)
                    ]
                var = g.eta**2 * self.grid.gamma_at(k - 1)
                kl = torch.cat([gaussian_kl(st.mean, ref, var) for st, ref in zip(steps, ref_means)]).mean()
                loss = loss + g.kl_coef * kl
                stats["kl"] = kl.detach()
            self.engine.backward(loss)
            self.engine.step()
            for name, value in {"loss": loss.detach(), **stats}.items():
                v = float(value)
                totals[name] = max(totals.get(name, v), v) if name == "ratio_max_dev" else totals.get(name, 0.0) + v / (self.grid.steps - 1)
        acked = self.stream.ack(ids)
        if acked != len(ids):
            raise RuntimeError(f"acknowledged {acked} of {len(ids)} stream entries")
        lags = [self.version - m["policy_version"] for m in metas]
        self.version += 1
        out = {
            **totals,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "groups": len(ids),
            "acked": acked,
            "policy_lag_max": max(lags),
        }
        for name in [k[len("reward/"):] for k in entries[0][2] if k.startswith("reward/")]:
            out[f"reward_{name}"] = float(torch.stack([t[f"reward/{name}"] for _, _, t in entries]).mean())
        return out

    def publish(self) -> tuple[dict[str, torch.Tensor], int]:
        from learner.engine import full_state_dict

        return full_state_dict(self.engine), self.version

    def save(self, directory: str) -> str:
        return str(save_model(self.engine.module, directory).resolve())


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
    needed = a.rollout.count * a.rollout.num_cpus + a.reward.count * a.reward.num_cpus + a.learner.num_cpus
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
        stream = ExperienceStream(address, tracker.run_id)
        stream.create()
        ray, started_ray = _start_ray(cfg)
        reward_actors = [
            ray.remote(RewardActor).options(num_cpus=a.reward.num_cpus, num_gpus=a.reward.num_gpus)
            .remote(rewards_cfg, a.reward.batch_size, a.torch_threads)
            for _ in range(a.reward.count)
        ]
        learner = ray.remote(GrpoLearner).options(num_cpus=a.learner.num_cpus, num_gpus=a.learner.num_gpus).remote(
            str(init_from), cfg.model_dump_json(), address, tracker.run_id
        )
        rollouts = [
            ray.remote(RolloutActor).options(num_cpus=a.rollout.num_cpus, num_gpus=a.rollout.num_gpus).remote(
                str(init_from), g.steps, g.group_size, g.eta, reward_actors, weights,
                a.reward.timeout_s, a.reward.retries, address, tracker.run_id, a.torch_threads,
            )
            for _ in range(a.rollout.count)
        ]

        eval_prompts = scene_prompts(g.prompt_seed, EVAL_SEED_OFFSET, g.eval_prompts, cfg.data.omit_prob)
        eval_rewards = {r.name: build_reward(r.name, **r.options) for r in cfg.rewards}
        _, before = evaluate(load_model(init_from), eval_prompts, g.steps, cfg.seed, eval_rewards, g.eta)
        tracker.metrics({f"eval_reward_{k}": v for k, v in before.items()}, step=0)

        history, written_total, dropped_total = [], 0, 0
        start = time.time()
        bar = tqdm(range(g.iterations), desc="grpo", unit="it", dynamic_ncols=True)
        for it in bar:
            t0 = time.time()
            first = it * g.prompts_per_iteration
            prompts = scene_prompts(g.prompt_seed, first, g.prompts_per_iteration, cfg.data.omit_prob)
            indices = list(range(first, first + g.prompts_per_iteration))
            shards = [(prompts[i :: len(rollouts)], indices[i :: len(rollouts)]) for i in range(len(rollouts))]
            results = ray.get([r.rollout.remote(p, idx, it, cfg.seed) for r, (p, idx) in zip(rollouts, shards) if p])
            groups = sum(r["groups"] for r in results)
            dropped = sum(r["dropped"] for r in results)
            written_total, dropped_total = written_total + groups, dropped_total + dropped
            t1 = time.time()
            if groups == 0:
                tracker.metrics({"groups_dropped": dropped}, step=it)
                continue
            metrics = ray.get(learner.train.remote(it, groups))
            state, version = learner.publish.options(num_returns=2).remote()
            version = ray.get([r.set_weights.remote(state, version) for r in rollouts])[0]
            t2 = time.time()
            images = groups * g.group_size
            metrics.update(
                groups_dropped=dropped, rollout_s=t1 - t0, update_s=t2 - t1,
                samples_per_s=images / (t2 - t0), policy_version=version,
                sample_s=max(r["sample_s"] for r in results), reward_s=max(r["reward_s"] for r in results),
            )
            tracker.metrics(metrics, step=it)
            history.append(metrics["reward_mean"])
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
        wall = time.time() - start

        checkpoint = Path(ray.get(learner.save.remote(str(run_dir / "checkpoint"))))
        stream_entries, stream_pending = stream.length(), stream.pending()
        if stream_pending:
            raise RuntimeError(f"{stream_pending} stream entries were never acknowledged")
        images, after = evaluate(load_model(checkpoint), eval_prompts, g.steps, cfg.seed, eval_rewards, g.eta)
        tracker.metrics({f"eval_reward_{k}": v for k, v in after.items()}, step=g.iterations)
        tracker.image(save_grid(images, run_dir / "samples.png"), "samples.png")
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
            "stream": {"key": stream.key, "entries": stream_entries, "pending": stream_pending},
        }
    finally:
        if ray is not None and started_ray:
            ray.shutdown()
        if redis_server is not None:
            redis_server.close()

