"""GRPO mode: the driver loop of the data flow in the README (the learner ranks are in learner/grpo_learner.py).

One iteration (`GrpoRun.step`), each phase timed under its name:
  rollout  draw P prompts; rollout actors sample G trajectories each with the stochastic prox sampler (tagged with
           the policy version), have them scored by reward actors and write finished groups to the Redis stream;
  update   the learner ranks read the groups, compute group-relative advantages and the loss (the clipped policy
           loss over the sampler steps, or the forward objective on the final samples), take the optimiser steps,
           and acknowledge the entries only after them;
  publish  the new weights go out (Ray object store, versioned) to the rollout actors;
then the metrics are logged, and every eval_every iterations the policy is evaluated: the rollout actors draw the
held-out samples with the weights they hold and the reward actors score them (the driver runs no sampler).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from actors.checkpoint import pack
from actors.reward import RewardActor, process_memory_mb
from actors.rollout import RolloutActor, eval_seed
from actors.stream import ExperienceStream, RedisAddress, StreamStalled, learner_group
from learner.cluster import ensure_resources, start_ray, stream_server, withdraw_request
from learner.config import RunConfig
from learner.bootstrap import bootstrap_ci, ci_metrics
from learner.faults import RunFailed, nonfinite_stop, rank_died, redis_lost, stream_stalled, wait_for
from learner.evaluation import save_grid, to_pil
from learner.grpo_learner import LearnerGroup
from learner.layout import LayoutProbe, split_threads
from learner.progress import steady_range
from learner.prompts import prompt_source
from learner.resume import (Resume, complete_states, config_fingerprint, json_bytes, merge_rank_files,
                            write_state)
from learner.signals import STOP, Interrupted
from learner.tracking import Tracker
from proxmodel.checkpoint import read_config, write_card
from proxmodel.lora import load_adapters, merged, with_lora
from proxmodel.model import load_model, save_state

EVAL_CHUNK = 32  # held-out prompts per evaluation call (a batch on one rollout actor's device)

@contextmanager
def timed(name: str, timing: dict[str, float]) -> Iterator[None]:
    """Record the wall time of the block as timing[f"{name}_s"]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[f"{name}_s"] = time.perf_counter() - start


def hacking_signs(checks: dict[str, np.ndarray], before: dict[str, np.ndarray], monitors: dict[str, float],
                  max_saturation: float, min_diversity: float) -> list[str]:
    """What says a policy gains reward without getting better: a held-out check significantly below its start (the
    95% interval of the paired difference [prompts, seeds] entirely under 0, over the prompts the start scored: one
    non-finite start made the interval NaN and turned the check off), the saturation or within-group diversity ratio
    to the base past its limit. Empty: no sign."""
    signs = []
    for name, scores in checks.items():
        broken = int((~np.isfinite(scores) & np.isfinite(before[name])).sum())
        if broken:  # a NaN would make the interval NaN and the sign silently absent
            signs.append(f"held-out check {name}: {broken} image(s) that scored at the start no longer do "
                         "(non-finite pixels)")
            continue
        difference = scores - before[name]
        scored = np.isfinite(difference).all(axis=1)  # a start that did not score has nothing to fall from
        if scored.sum() < 2:  # no interval from fewer prompts
            continue
        change = bootstrap_ci(difference[scored])
        if change.high < 0:
            signs.append(f"held-out check {name} fell by {-change.mean:.3f} [{-change.high:.3f}, {-change.low:.3f}]")
    if not (np.isfinite(monitors["saturation_ratio"]) and np.isfinite(monitors["diversity_ratio"])):
        signs.append("the saturation or diversity monitor is not finite (non-finite images)")
    if monitors["saturation_ratio"] > max_saturation:
        signs.append(f"saturation {monitors['saturation_ratio']:.2f}x the base's (limit {max_saturation})")
    if monitors["diversity_ratio"] < min_diversity:
        signs.append(f"within-group diversity {monitors['diversity_ratio']:.2f}x the base's (limit {min_diversity})")
    return signs


def run_grpo(cfg: RunConfig, run_dir: Path, tracker: Tracker, init_from: Path, resume: Optional[Resume] = None) -> dict:
    """The data flow: start Ray and the stream, start the actors, iterate, write the final checkpoint.
    Ray, its actors and the embedded redis-server stop with the run however it ends (a signal included)."""
    with STOP.deferred():  # a signal while Ray starts is acted on once it has (and can be stopped)
        ray, started_ray = start_ray(cfg)
    STOP.install()  # ray.init took SIGTERM
    redis_server, asked = None, False
    try:
        STOP.check()
        asked = ensure_resources(ray, cfg)  # first: a config the cluster cannot place fails before minutes of op building
        if started_ray:  # the learner ranks run here: build DeepSpeed's one-time op before they start, saying so
            from learner.engine import prepare_ops

            prepare_ops()
        address, redis_server = stream_server(cfg, on_cluster=not started_ray)
        run = GrpoRun(ray, cfg, run_dir, tracker, init_from, address, resume)
        return run.finish(run.iterate())
    except Exception as e:
        import redis

        cause = getattr(e, "cause", None) or e  # raised here, or in an actor (Ray's error holds it as `cause`)
        if isinstance(cause, (redis.ConnectionError, redis.TimeoutError)):
            raise redis_lost(cause, run_dir) from None
        if isinstance(cause, StreamStalled):
            raise stream_stalled(cause, run_dir) from None
        raise
    finally:
        if asked:  # the nodes it brought may go once idle
            withdraw_request()
        if started_ray:
            ray.shutdown()
        if redis_server is not None:
            redis_server.close()


def died(ray, ref):
    """The RayActorError of a call that ended because its actor's process died or is restarting; None if it did not
    (failed otherwise, still running, succeeded)."""
    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.RayActorError as e:
        return e
    except Exception:  # noqa: BLE001 (its own error, or not finished: the caller's wait says which)
        return None
    return None


BEST_PREFIX = "best-it"


def prune_best(run_dir: Path, best: Path) -> None:
    """Delete the exported best-it* folders that neither `best` (the loop's) nor any kept run state refers to: the
    superseded ones, and after a resume those of the abandoned tail (the replay exports them again)."""
    keep = {Path(best).resolve()}
    for state in complete_states(run_dir):
        try:
            keep.add(Path(json.loads((state / "run.json").read_text())["best"][2]).resolve())
        except (OSError, ValueError, KeyError, IndexError, TypeError):  # unreadable: keep everything
            return
    for folder in run_dir.glob(f"{BEST_PREFIX}*"):
        if folder.is_dir() and folder.resolve() not in keep:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class RolloutCall:
    """One call to a rollout actor in flight: the actor (its index), the method (rollout, evaluate, monitors) and its
    arguments, the result's ref, the actor's deaths before the call was made, and whether it is a call made again.
    The arguments fix the noise, so a call lost with its actor is made again as is."""

    actor: int
    args: tuple
    ref: object
    deaths: int
    again: bool = False
    method: str = "rollout"

    def task(self) -> str:
        if self.method == "rollout":  # args: prompts, prompt indices, iteration, seed
            return f"sampling iteration {self.args[2]}'s prompts {list(self.args[1])} again with the same seeds"
        return f"making its {self.method} call again with the same seeds"


@dataclass
class Progress:
    """What the loop has done: saved in every run state (run.json) and continued from by --resume."""

    iteration: int = 0  # iterations trained; the next one to run
    history: list[float] = field(default_factory=list)  # reward_mean of each trained iteration
    written: int = 0  # groups written to the stream
    dropped: int = 0  # groups dropped (non-finite rewards, or drained untrained)
    wall_time_s: float = 0.0  # GRPO loop time, earlier segments included
    eval_time_s: float = 0.0  # of it, the held-out evaluations every eval_every (not counted by time_limit_s)
    resumed_at: list[int] = field(default_factory=list)  # iterations at which the run was resumed
    layout: Optional[dict] = None  # async runs: the sync/async probe's times and choice (learner/layout.py)


def memory_metrics(reports: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """memory/<role>_<rss|gpu|gpu_reserved>_mb: the largest over each role's processes (learner ranks, rollout
    actors, ...), from their process_memory_mb reports. Logged every iteration, so a leak shows as a rising curve,
    not an OOM kill."""
    return {f"memory/{role}_{key}": max(r[key] for r in rs if key in r)
            for role, rs in reports.items() for key in sorted({k for r in rs for k in r})}


def unvarying_metrics(g, metrics: dict) -> set[str]:
    """The learner's metrics that cannot change under this run's settings, left out of the per-iteration log (the
    setting that fixes them is an MLflow param):
    - max_staleness 0 (sync): every group comes from the current policy, so its lags are 0 and none is stale;
    - updates_per_batch 1: the only pass is on-policy, its ratio is exactly 1 and nothing is clipped (any numerical
      gap between rollout and learner shows in first_pass_log_ratio_*, which stays);
    - acked: equal to groups (a shortfall stops the run);
    - nonfinite_*: while no optimiser step has been skipped they are 0 (logged from the first skip on)."""
    names = {"acked"}
    if g.max_staleness == 0:  # (and every actor keeps its thread count)
        names |= {"policy_lag_max", "policy_lag_trained_max", "groups_stale", "threads_rollout", "threads_learner"}
    if g.updates_per_batch == 1:
        names |= {"ratio_max_dev", "clip_frac"}
    if not metrics.get("nonfinite_updates"):
        names |= {"nonfinite_updates", "nonfinite_in_a_row"}
    return names


DURING = "held_out_during"  # run_dir's folder of the scheduled evaluations' scores


def evaluations_between(run_dir: Path, done: int) -> dict[str, dict]:
    """{step: {reward: scores [prompts][seeds]}} of the scheduled evaluations before step `done` (the final one is
    the "after"; a resumed run re-evaluates, and so overwrites, the steps past its restart)."""
    files = {int(f.stem.removeprefix("step")): f for f in (run_dir / DURING).glob("step*.json")}
    return {str(step): json.loads(files[step].read_text()) for step in sorted(files) if step < done}


class GrpoRun:
    """One GRPO run's actors, prompt stream and evaluation, driven from the driver process."""

    def __init__(self, ray, cfg: RunConfig, run_dir: Path, tracker: Tracker, init_from: Path, address: RedisAddress,
                 resume: Optional[Resume] = None):
        g, a = cfg.grpo, cfg.actors
        self.ray, self.cfg, self.run_dir, self.tracker = ray, cfg, run_dir, tracker
        self.init_from = init_from
        self.streams = [ExperienceStream(address, tracker.run_id, learner_group(r)) for r in range(a.learner.count)]
        if resume is not None:  # entries past the run state (a shared Redis) are sampled again, with the same seeds
            if stale := self.streams[0].length():
                tqdm.write(f"resume: {stale} stream entries written after the run state (in {self.streams[0].key}) "
                           f"are dropped; their groups are sampled again with the same seeds")
            self.streams[0].client.delete(self.streams[0].key)
        for stream in self.streams:
            stream.create()
        # The starting weights travel through the object store: actors on other nodes need no shared filesystem.
        # Held for the run: a rollout actor Ray restarts is built again from it (its constructor argument).
        self.packed = packed = ray.put(pack(init_from))
        # The trained rewards and the held-out checks (never trained on: scored only in evaluation).
        rewards_cfg = [r.model_dump() for r in cfg.rewards] + [{"name": name} for name in g.check_rewards]
        self.reward_actors = reward_actors = [  # held: a restarted rollout actor is given them again
            ray.remote(RewardActor).options(num_cpus=a.reward.num_cpus, num_gpus=a.reward.num_gpus,
                                            max_restarts=a.reward_restarts, max_task_retries=a.reward_restarts)
            .remote(rewards_cfg, a.reward.batch_size, a.torch_threads, address if a.reward.cache else None,
                    a.reward.cache_ttl_s)
            for _ in range(a.reward.count)
        ]
        self.learners = LearnerGroup(ray, cfg, packed, address, tracker.run_id, run_dir)
        weights = {r.name: r.weight for r in cfg.rewards}
        self.rollouts = [
            ray.remote(RolloutActor).options(num_cpus=a.rollout.num_cpus, num_gpus=a.rollout.num_gpus,
                                             max_restarts=a.rollout_restarts).remote(
                packed, g.steps, g.group_size, g.eta, g.guidance, reward_actors, weights,
                a.reward.timeout_s, a.reward.retries, address, tracker.run_id, a.torch_threads, cfg.deepspeed.bf16,
                keep_trajectory=g.objective != "forward", lora=g.lora.spec(), stochastic_steps=g.stochastic_steps,
                shared_start=g.shared_start, credit_block=g.credit_block,
            )
            for _ in range(a.rollout.count)
        ]
        self.prompts = prompt_source(cfg)
        self.eval_prompts = self.prompts.held_out(g.eval_prompts)
        tracker.text("\n".join(self.eval_prompts) + "\n", "eval_prompts.txt")
        # Evaluation runs on the actors (RolloutActor.evaluate, in the policy's own precision): the driver holds no
        # model, no reward model, and runs no sampler (a CPU-only head node in deploy/ stays light).
        self.model_cfg = read_config(init_from)
        # The loop's state: rollouts in flight (a rollout actor runs its calls in order, so new weights reach it
        # only between two whole batches), the last weight broadcast, the model evaluated every eval_every.
        self.in_flight: deque[list[RolloutCall]] = deque()
        self.deaths = [0] * len(self.rollouts)  # of each rollout actor (each restarted by Ray)
        self.weight_updates: list = []
        self.state = None
        self.version = 0  # of the weights the rollout actors have
        self.base_monitors: Optional[dict[str, float]] = None
        self.monitors: dict[str, float] = {}
        self.hacked: list[str] = []  # why the last evaluation looked like reward hacking (empty: it did not)
        self.last_evaluation: Optional[tuple[int, dict[str, np.ndarray]]] = None  # (step, scores) of the latest
        self.steady = True  # False while an update is under way: no run state can be taken then
        # Which layout the actors' torch threads are set for (all cores each: "sync"), and the rollout actors' counts
        # (given again to an actor Ray restarts). learner/layout.py chooses the layout of an async run.
        self.threads_layout, self.rollout_threads = "sync", [cfg.actors.torch_threads] * len(self.rollouts)
        self.saved_at: Optional[int] = None  # the iteration of the last run state written
        self.trimmed = 0  # stream entries deleted once every learner rank acknowledged them (since this start)
        self.duplicates = 0  # entries that repeated a group already trained (a rollout made again), since this start
        if resume is None or resume.files is None:
            self.progress = Progress()
            tqdm.write(f"evaluating the starting model on {len(self.eval_prompts)} held-out prompts x {g.eval_seeds} "
                       f"noise seeds while the actors start (grpo.eval_prompts, grpo.eval_seeds)")
            self.before = self.evaluate(0)
            # (step, held-out total, checkpoint) of the best evaluation that showed no sign of hacking: the start so far.
            self.best = (0, float(self.before["total"].mean()), init_from)
        else:
            self.restore(resume)

    def restore(self, resume: Resume) -> None:
        """Continue from a run state: learner engines, RNGs and PromptStats, the rollouts' weights and version, the
        loop's counters, and the 'before' evaluation (the start's, not the trained model's)."""
        from safetensors.numpy import load as load_arrays

        files = resume.files
        saved = json.loads(files["run.json"])
        self.progress = Progress(**saved["progress"])
        self.progress.resumed_at.append(self.progress.iteration)
        self.before = load_arrays(files["eval_before.safetensors"])
        self.base_monitors, self.monitors, self.hacked = saved["base_monitors"], saved["monitors"], saved["hacked"]
        step, total, path = saved["best"]
        self.best = (step, total, Path(path))
        prune_best(self.run_dir, self.best[2])  # bests exported after this state belong to the abandoned tail
        ranks = self.ray.put({k: v for k, v in files.items() if k.startswith(("engine/", "rank"))})
        self.from_learners(self.learners.call("load_state", ranks))
        published = self.learners.call("publish", num_returns=2)
        self.state, _ = published[0]
        self.version = self.from_learners([v for _, v in published])[0]
        self.weight_updates = [r.set_weights.remote(self.state, self.version) for r in self.rollouts]
        self.saved_at = self.progress.iteration

    def save(self) -> Path:
        """Write the run state after progress.iteration iterations (the learners must be between updates)."""
        from safetensors.numpy import save as save_arrays

        p = self.progress
        with STOP.deferred():
            files = merge_rank_files(self.from_learners(self.learners.call("save_state")))
            files["eval_before.safetensors"] = save_arrays({k: np.ascontiguousarray(v) for k, v in self.before.items()})
            files["run.json"] = json_bytes({
                "mode": "grpo", "iteration": p.iteration, "policy_version": self.version,
                "prompt_cursor": p.iteration * self.cfg.grpo.prompts_per_iteration, "mlflow_run_id": self.tracker.run_id,
                "config_fingerprint": config_fingerprint(self.cfg), "progress": asdict(p),
                "base_monitors": self.base_monitors, "monitors": self.monitors, "hacked": self.hacked,
                "best": [self.best[0], self.best[1], str(self.best[2])],
            })
            if self.state is not None:  # the same weights as a checkpoint, what a new run from here starts with
                save_state(self.plain_state(self.from_learners([self.state])[0]), self.model_cfg,  # (first: once the
                           self.run_dir / "checkpoint", card=self.card(p.iteration))  # state is there, so is it)
            path = write_state(self.run_dir, p.iteration, files, self.cfg.grpo.keep_checkpoints)
            prune_best(self.run_dir, self.best[2])
        self.saved_at = p.iteration
        return path

    def evaluate(self, step: int) -> dict[str, np.ndarray]:
        """Held-out rewards at `step` of the weights the rollout actors hold: the policy's sampler on eval_prompts x
        eval_seeds fixed noises, each reward and the weighted total with a 95% bootstrap interval; the
        probability-flow sampler's too where the model has one (a prox model pretrained on lam = gamma/2, or a score
        model's ODE); monitors; a grid. Returns the score matrices [prompts, seeds] of the policy's sampler."""
        g, cfg = self.cfg.grpo, self.model_cfg
        prox = cfg.kind == "prox"
        policy_sampler, flow = ("hybrid", "flow") if prox else ("sde", "ode")
        trained = [r.name for r in self.cfg.rewards]
        images, scores = self.held_out(policy_sampler, g.eta, trained + list(g.check_rewards))
        scores = self.with_total(scores)
        checks = {name: scores[name] for name in g.check_rewards}
        metrics = {**ci_metrics("eval_reward", {k: v for k, v in scores.items() if k not in checks}),
                   **ci_metrics("eval_check", checks)}
        if not prox or "flow" in (cfg.trained_variants or []):
            _, flow_scores = self.held_out(flow, 0.0, trained)
            metrics.update(ci_metrics("eval_flow_reward", self.with_total(flow_scores)))
        args = (self.eval_prompts[:4], g.steps, self.cfg.seed, g.eta, g.group_size, g.guidance)
        monitors = self.from_rollouts([self.call(0, "monitors", *args)])[0]
        # Between prompts: one image for every prompt (the collapse the ungated verifier was hacked with) drives it to 0.
        monitors["prompt_diversity"] = float(images.flatten(1).std(dim=0).mean())
        self.base_monitors = self.base_monitors or monitors
        for name in ("saturation", "diversity", "prompt_diversity"):  # against the start, same prompts and noise
            monitors[f"{name}_ratio"] = monitors[name] / max(self.base_monitors[name], 1e-8)
        self.monitors = monitors
        if step > 0:
            self.hacked = hacking_signs(checks, {k: self.before[k] for k in checks}, monitors,
                                        g.hacking_saturation, g.hacking_diversity)
            monitors["hacking"] = float(bool(self.hacked))
            if self.hacked:
                tqdm.write(f"step {step}: the policy looks hacked: {'; '.join(self.hacked)}")
        self.tracker.metrics({**metrics, **{f"monitor_{k}": v for k, v in monitors.items()},
                              **memory_metrics({"reward": self.reward_memory()})}, step=step)
        self.last_evaluation = (step, scores)
        grid = save_grid(images, self.run_dir / "samples" / f"step{step:05d}.png")
        self.tracker.image(grid, f"samples/step{step:05d}.png")
        # The grid's images with their captions and rewards (first noise seed), as a table the MLflow UI shows.
        self.tracker.table({"prompt": list(self.eval_prompts), "image": to_pil(images),
                            **{name: scores[name][:, 0].tolist() for name in scores}}, f"samples/step{step:05d}.json")
        return scores

    def reward_memory(self) -> list[dict[str, float]]:
        """The reward actors' memory (process_memory_mb), asked at each evaluation (they serve the rollout actors,
        not the driver, between them); an actor that does not answer within 10 s is left out, never waited for."""
        refs = [a.memory_mb.remote() for a in self.reward_actors]
        if not refs:
            return []
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=10)
        out = []
        for ref in ready:
            try:
                out.append(self.ray.get(ref))
            except self.ray.exceptions.RayError:  # being restarted: a monitor must not fail the run
                pass
        return out

    def held_out(self, sampler: str, eta: float, rewards: list[str]) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """(the first noise's images [prompts, C, H, W] in [0, 1], {reward: scores [prompts, eval_seeds]}): `sampler`
        on the held-out prompts, drawn and scored by the rollout actors with their current weights. The prompts go
        out in chunks of EVAL_CHUNK, shared round-robin; a chunk's noise is fixed by the run seed and its position,
        so the numbers do not depend on how many rollout actors there are."""
        g, prompts, k = self.cfg.grpo, self.eval_prompts, len(self.rollouts)
        calls = [self.call(c % k, "evaluate", prompts[start:start + EVAL_CHUNK], g.steps,
                           [eval_seed(self.cfg.seed, s, c) for s in range(g.eval_seeds)], eta, sampler, g.guidance,
                           rewards)
                 for c, start in enumerate(range(0, len(prompts), EVAL_CHUNK))]
        results = self.from_rollouts(calls)
        images = torch.cat([r["images"] for r in results]).float() / 255
        return images, {name: np.concatenate([r["scores"][name] for r in results]) for name in rewards}

    def call(self, i: int, method: str, *args) -> RolloutCall:
        """Call rollout actor `i`'s `method` (behind the calls already queued on it)."""
        return RolloutCall(i, args, getattr(self.rollouts[i], method).remote(*args), self.deaths[i], method=method)

    def keep_if_best(self, step: int, scores: dict[str, np.ndarray], state: dict | None = None,
                     saved: Path | None = None) -> None:
        """Remember the weights evaluated at `step` as the best if they beat every earlier clean evaluation: the
        checkpoint `saved`, or `state` exported as run_dir/best-itNNNNN (a folder per step, so a run state never
        refers to a folder a later evaluation overwrote: resumed from it, the summary named weights it did not hold)."""
        total = float(scores["total"].mean())
        if not self.hacked and total > self.best[1]:
            card = {**self.card(step), "held_out_reward_total": {"mean": total, "prompts": len(self.eval_prompts),
                                                                  "seeds": self.cfg.grpo.eval_seeds}}
            folder = self.run_dir / f"{BEST_PREFIX}{step:05d}"
            path = saved or save_state(self.plain_state(state), self.model_cfg, folder, card=card).resolve()
            self.best = (step, total, path)

    def card(self, iterations: int) -> dict:
        """What an exported checkpoint's README.md says about how it was made."""
        g = self.cfg.grpo
        return {"mode": "grpo", "base": str(self.init_from), "iterations": f"{iterations} of {g.iterations}",
                "objective": g.objective, "rewards": {r.name: r.weight for r in self.cfg.rewards},
                "sampler": f"hybrid prox policy, {g.steps} steps, eta {g.eta}, guidance {g.guidance}",
                "config_fingerprint": config_fingerprint(self.cfg), "mlflow_run_id": self.tracker.run_id}

    def plain_state(self, state: dict) -> dict:
        """A checkpoint's weights for published `state`: with LoRA, the adapters merged into the fp32 base (no peft
        needed to load it)."""
        lora = self.cfg.grpo.lora.spec()
        if not lora:
            return state
        model = with_lora(load_model(self.init_from), lora)
        load_adapters(model, state)
        return merged(model).state_dict()

    def with_total(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The per-reward matrices plus `total`, the weighted sum the policy is trained on."""
        return {**scores, "total": sum(r.weight * scores[r.name] for r in self.cfg.rewards)}

    def launch(self, it: int) -> list[RolloutCall]:
        """Start iteration `it`'s rollouts; each actor runs them after the calls already queued on it."""
        n = self.cfg.grpo.prompts_per_iteration
        prompts, indices = self.prompts.train(it * n, n), list(range(it * n, (it + 1) * n))
        k = len(self.rollouts)
        shards = [(prompts[i::k], indices[i::k], it, self.cfg.seed) for i in range(k)]
        return [self.call(i, "rollout", *args) for i, args in enumerate(shards) if args[0]]

    def again(self, call: RolloutCall, error) -> RolloutCall:
        """Make a call its actor died in again, on the actor Ray restarted (which starts from the first weights):
        the current weights first, then the same prompts with the same seeds. Groups the dead actor had already
        written are written twice; the learners train each group once (its idempotency key) and count the copy."""
        i, limit = call.actor, self.cfg.actors.rollout_restarts
        unavailable = isinstance(error, self.ray.exceptions.ActorUnavailableError)
        if unavailable:  # the actor is down or restarting: wait a little before calling it again
            time.sleep(1.0)
        # A new death, unless the call was already lost to this one: calls queued behind the lost one fail with it,
        # and a call made again while Ray restarts the actor is refused as unavailable. (A call in flight when the
        # process died can itself end as unavailable rather than died: that is the death.)
        if call.deaths == self.deaths[i] and not (unavailable and call.again):
            self.deaths[i] += 1
            tqdm.write(f"rollout actor {i} died; restarted by Ray ({self.deaths[i]} of actors.rollout_restarts="
                       f"{limit}), {call.task()}")
        if self.deaths[i] > limit:
            from learner.resume import resume_command

            raise RunFailed(
                f"rollout actor {i} died {self.deaths[i]} times (the limit actors.rollout_restarts is {limit}; last: "
                f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}). Its process keeps ending: look "
                f"for the OOM killer (dmesg) or a lost node, and its output in Ray's worker logs (/tmp/ray/session_latest/logs/worker-*). The run "
                f"stopped and its processes were ended; continue from the last run state with "
                f"`{resume_command(self.run_dir)}`."
            )
        actor = self.rollouts[i]
        if self.rollout_threads[i] != self.cfg.actors.torch_threads:  # (its constructor set torch_threads)
            actor.use_threads.remote(self.rollout_threads[i])
        if self.state is not None:  # (before the first update the restarted actor's weights are already current)
            self.weight_updates[i] = actor.set_weights.remote(self.state, self.version)
        return RolloutCall(i, call.args, getattr(actor, call.method).remote(*call.args), self.deaths[i], again=True,
                           method=call.method)

    def iterate(self) -> dict:
        """The iterations from progress.iteration on: rollouts launched up to max_staleness ahead (until
        time_limit_s), one step() each, a run state every checkpoint_every and at the end. On SIGINT/SIGTERM: a run
        state of the last whole iteration, then Interrupted."""
        g, p = self.cfg.grpo, self.progress
        start = time.time() - p.wall_time_s  # the time limit and the wall time count earlier segments too
        # time_limit_s counts training (rollouts, updates, publication), not the evaluations in between: policies whose
        # iterations cost differently get the same training time however often they are evaluated.
        deadline = start + g.time_limit_s if g.time_limit_s else float("inf")
        iterations = steady_range(p.iteration, g.iterations, desc="grpo", unit="it")  # ETA without the warm-up
        probe = LayoutProbe.plan(g.max_staleness, g.async_probe, p.iteration, g.iterations, p.layout)
        last = time.time()
        try:
            for it in iterations:
                if g.stop_on_hacking and self.hacked:  # (a resumed run that had stopped here)
                    break
                self.use_layout(probe.layout(it))
                while (len(self.in_flight) <= probe.staleness_at(it) and it + len(self.in_flight) < g.iterations
                       and (time.time() - p.eval_time_s < deadline or it + len(self.in_flight) == 0)):  # >= 1 it
                    self.in_flight.append(self.launch(it + len(self.in_flight)))
                if not self.in_flight:  # out of time, and every launched iteration has been trained
                    break
                with STOP.deferred():  # a first signal waits for the update (the rollout wait ends at once)
                    evaluated = p.eval_time_s
                    metrics = self.step(it)
                    now = time.time()
                    seconds = now - last - (p.eval_time_s - evaluated)  # (the evaluation every eval_every excluded)
                    trained = int(metrics["groups_trained"]) if metrics else 0
                    self.tracker.metrics({"iteration_s": seconds}, step=it)
                    if probe.record(it, seconds, trained) is not None:
                        self.report_layout(probe, it)
                    p.layout, last = probe.as_dict(), now
                    p.iteration, p.wall_time_s, self.steady = it + 1, time.time() - start, True
                    if metrics is not None:
                        p.history.append(metrics["reward_mean"])
                        iterations.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
                    if g.stop_on_hacking and self.hacked:
                        self.drain()
                        break
                    if STOP.requested or (g.checkpoint_every and p.iteration % g.checkpoint_every == 0):
                        self.save()
                STOP.check()
            if not p.history:
                raise RuntimeError(f"every group of every iteration was dropped ({p.dropped} groups): check the rewards")
            if self.saved_at != p.iteration:  # the end: finish() can be resumed too
                self.save()
        except Interrupted:
            if self.steady and self.saved_at != p.iteration:  # between updates: the state is whole
                self.save()
            raise
        return {"wall_time_s": p.wall_time_s, "eval_time_s": p.eval_time_s, "history": p.history, "written": p.written, "dropped": p.dropped,
                "iterations": p.iteration, "resumed_at": p.resumed_at}

    def use_layout(self, layout: str) -> None:
        """The actors' torch threads for a layout: all cores each while rollout and update take turns ("sync"), a
        node's cores split between the rollout actors and learner ranks on it while they overlap ("async"). A fixed
        actors.torch_threads stays as it is. A rollout actor applies it after the calls already queued on it."""
        if layout == self.threads_layout:
            return
        self.threads_layout = layout
        if self.cfg.actors.torch_threads:
            return
        actors = [*self.rollouts, *self.learners.ranks]
        if layout == "async":  # (only at a start or after a sync iteration: no rollout is queued on an actor)
            names = [f"rollout actor {i}" for i in range(len(self.rollouts))] + [
                f"learner rank {r}" for r in range(len(self.learners.ranks))]
            threads = split_threads(wait_for(self.ray, [a.node.remote() for a in actors], names,
                                             self.cfg.actors.learner_timeout_s, "actors.learner_timeout_s", self.run_dir))
        else:
            threads = [0] * len(actors)
        self.rollout_threads = threads[:len(self.rollouts)]
        refs = [a.use_threads.remote(n) for a, n in zip(actors, threads)]
        self.from_learners(refs[len(self.rollouts):])

    def report_layout(self, probe: LayoutProbe, it: int) -> None:
        """The probe's measurement and choice: one line, MLflow metrics at the iteration it was made, and a tag."""
        sync, overlapped = (probe.seconds_per_group(n) for n in ("sync", "async"))
        tqdm.write(f"layout: {sync:.2f} s per trained group synchronous, {overlapped:.2f} s overlapped (grpo.max_staleness="
                   f"{probe.staleness}; {probe.iterations} iterations each, grpo.async_probe): the rest of the run "
                   f"is {'overlapped' if probe.chosen == 'async' else 'synchronous'}")
        self.tracker.metrics({"layout_sync_s": sync, "layout_async_s": overlapped,
                              "layout_async": float(probe.chosen == "async")}, step=it)
        self.tracker.tag("layout", probe.chosen)

    def wait_rollouts(self, calls: list[RolloutCall]) -> list:
        """One iteration's rollouts, given up at once on SIGINT/SIGTERM (nothing is trained yet)."""
        return self.from_rollouts(calls, on_tick=STOP.check)

    def from_rollouts(self, calls: list[RolloutCall], on_tick=None) -> list:
        """The results of rollout calls, each bounded by actors.rollout_timeout_s; a call whose actor died is made
        again (again()) until it succeeds or the actor's restarts run out."""
        errors = self.ray.exceptions
        while True:
            names = [f"rollout actor {c.actor}" for c in calls]
            try:
                return wait_for(self.ray, [c.ref for c in calls], names, self.cfg.actors.rollout_timeout_s,
                                "actors.rollout_timeout_s", self.run_dir, on_tick)
            except errors.RayActorError:  # a call lost with its actor: made again (the others keep running)
                calls = [self.again(c, lost) if (lost := died(self.ray, c.ref)) else c for c in calls]

    def from_weight_updates(self) -> None:
        """Surface a failed weight update; one lost with its actor was sent again with the call made again."""
        for ref in self.weight_updates:
            if not died(self.ray, ref):
                wait_for(self.ray, [ref], ["a rollout actor"], self.cfg.actors.rollout_timeout_s,
                         "actors.rollout_timeout_s", self.run_dir)

    def from_learners(self, refs: list) -> list:
        """The results of one call per learner rank (refs[r] from rank r), bounded by actors.learner_timeout_s."""
        names = [f"learner rank {r}" for r in range(len(refs))]
        try:
            return wait_for(self.ray, refs, names, self.cfg.actors.learner_timeout_s, "actors.learner_timeout_s",
                            self.run_dir)
        except self.ray.exceptions.RayActorError as e:
            if getattr(e, "actor_init_failed", False):  # its constructor raised: that error, with its traceback
                raise
            raise rank_died([name for name, ref in zip(names, refs) if died(self.ray, ref)] or names,
                            self.run_dir) from None

    def drain(self) -> None:
        """Stop early: wait for the rollouts in flight and acknowledge their groups untrained (counted as dropped)."""
        total = 0
        for calls in self.in_flight:
            groups = sum(r["groups"] for r in self.from_rollouts(calls))
            self.progress.written += groups
            self.progress.dropped += groups
            total += groups
        for stream in self.streams:
            stream.discard(total, self.cfg.actors.stream_read_timeout_s)
        self.in_flight.clear()
        self.trimmed += self.streams[0].trim()

    def step(self, it: int) -> Optional[dict]:
        """Iteration `it` of the data flow; its metrics, or None when every group was dropped."""
        g, timing = self.cfg.grpo, {}
        with timed("rollout", timing):  # sampled, scored and streamed by the actors (launched earlier)
            results = self.wait_rollouts(self.in_flight.popleft())
            self.from_weight_updates()  # (done before the rollouts were)
        groups, dropped = sum(r["groups"] for r in results), sum(r["dropped"] for r in results)
        self.progress.written += groups
        self.progress.dropped += dropped
        if groups == 0:
            self.tracker.metrics({"groups_dropped": dropped}, step=it)
            self.scheduled_evaluation(it + 1)  # the schedule holds whether or not this iteration trained
            return None
        self.steady = False  # until the loop has counted this iteration
        with timed("update", timing):  # advantages, clipped loss, one optimiser step, entries acknowledged
            ranks = self.from_learners(self.learners.call("train", it, groups))
            metrics = ranks[0]
            self.duplicates += metrics.pop("stream_duplicates")  # (not a metric: a fault-free run has none)
            self.trimmed += self.streams[0].trim()  # every rank has acknowledged them: the stream keeps what is in flight
        with timed("publish", timing):  # new weights to the rollout actors, picked up before their next batch
            published = self.learners.call("publish", num_returns=2)
            self.state, version = published[0]  # every rank gathers (ZeRO-3); rank 0's copy is broadcast
            self.weight_updates = [r.set_weights.remote(self.state, version) for r in self.rollouts]
            self.version = version = self.from_learners([v for _, v in published])[0]
        metrics.update(
            **timing, groups_dropped=dropped, policy_version=version,
            samples_per_s=groups * g.group_size / sum(timing.values()),
            sample_s=max(r["sample_s"] for r in results), reward_s=max(r["reward_s"] for r in results),
            threads_rollout=min(r["threads"] for r in results),
            **memory_metrics({"learner": [m.pop("memory") for m in ranks], "rollout": [r["memory"] for r in results],
                              "driver": [process_memory_mb()]}),
        )
        if (redis_mb := self.streams[0].server_memory_mb()) is not None:
            metrics["memory/redis_used_mb"] = redis_mb
        self.tracker.metrics({k: v for k, v in metrics.items() if k not in unvarying_metrics(g, metrics)}, step=it)
        if metrics["nonfinite_in_a_row"] >= g.max_nonfinite_updates:  # each was skipped: no run state is written
            raise nonfinite_stop(self.run_dir, metrics["nonfinite_in_a_row"], "grpo.max_nonfinite_updates", "grpo.lr")
        self.scheduled_evaluation(it + 1)
        return metrics

    def scheduled_evaluation(self, step: int) -> None:
        """The held-out evaluation every grpo.eval_every iterations (the last one is finish()'s)."""
        g = self.cfg.grpo
        if not g.eval_every or step % g.eval_every or step >= g.iterations:
            return
        started = time.time()
        scores = self.evaluate(step)  # (the rollout actors have the weights last published)
        if g.stop_on_hacking and self.state is not None:  # None: no update yet, the weights are the start's (best)
            self.keep_if_best(step, scores, state=self.from_learners([self.state])[0])  # (rank 0's)
        # Its scores, every prompt under every noise, in the run dir (so a resumed run keeps them): finish() adds them
        # to held_out_scores.json, and the runs' changes at this step pair and pool (gain_by_objects.py --step).
        during = self.run_dir / DURING / f"step{step:05d}.json"
        during.parent.mkdir(parents=True, exist_ok=True)
        during.write_text(json.dumps({name: m.tolist() for name, m in scores.items()}) + "\n")
        self.progress.eval_time_s += time.time() - started
        self.tracker.metrics({"eval_s": time.time() - started}, step=step)

    def finish(self, loop: dict) -> dict:
        """Write the final checkpoint from the gathered weights (no learner node needs run_dir) and evaluate it."""
        g = self.cfg.grpo
        final = self.learners.call("publish", num_returns=2)
        done = loop["iterations"]
        checkpoint = save_state(self.plain_state(self.from_learners([final[0][0]])[0]), self.model_cfg,
                                self.run_dir / "checkpoint", card=self.card(done)).resolve()
        self.from_learners([v for _, v in final])
        # Entries written since this start: those still in the stream and those trimmed once acknowledged.
        entries, pending = self.streams[0].length() + self.trimmed, sum(s.pending() for s in self.streams)
        if pending:
            raise RuntimeError(f"{pending} stream entries were never acknowledged")
        self.use_layout("sync")  # nothing overlaps any more: every actor may use all its cores
        tqdm.write(f"evaluating the final model on the {len(self.eval_prompts)} held-out prompts")
        if self.last_evaluation is not None and self.last_evaluation[0] == done:  # stopped right after evaluating
            after = self.last_evaluation[1]  # (the same weights, prompts and noise: the same scores)
        else:
            after = self.evaluate(done)  # the rollout actors hold the last published weights, the checkpoint's
        if g.stop_on_hacking:
            self.keep_if_best(done, after, saved=checkpoint)
        shutil.copyfile(self.run_dir / "samples" / f"step{done:05d}.png", self.run_dir / "samples.png")
        self.tracker.artifact(self.run_dir / "samples.png")
        history, wall = loop["history"], loop["wall_time_s"]
        window = max(1, len(history) // 5)  # single iterations are noisy: first and last fifth of the run
        held_out = {name: {"before": bootstrap_ci(self.before[name]).as_dict(),
                           "after": bootstrap_ci(after[name]).as_dict(),
                           "difference": bootstrap_ci(after[name] - self.before[name]).as_dict()}
                    for name in after}
        checks = {name: held_out.pop(name) for name in g.check_rewards}
        # Every prompt's scores under every noise seed, before, after and at every evaluation between (by step): what
        # paired comparisons of runs that share the held-out prompts and seeds bootstrap (gain_by_objects.py).
        scores_path = self.run_dir / "held_out_scores.json"
        scores_path.write_text(json.dumps({
            "prompts": list(self.eval_prompts), "seeds": g.eval_seeds, "layout": "[prompt][noise seed]",
            "before": {name: m.tolist() for name, m in self.before.items()},
            "after": {name: m.tolist() for name, m in after.items()},
            "during": evaluations_between(self.run_dir, done)}) + "\n")
        self.tracker.artifact(scores_path)
        write_card(checkpoint, self.model_cfg, {
            **self.card(done), "held_out": {"prompts": len(self.eval_prompts), "seeds": g.eval_seeds,
                                            **{name: {"before": v["before"]["mean"], "after": v["after"]["mean"],
                                                      "difference_ci95": [v["difference"]["ci_low"],
                                                                          v["difference"]["ci_high"]]}
                                               for name, v in {**held_out, **checks}.items()}},
            "hacking_signs": self.hacked or "none"})
        self.tracker.folder(checkpoint, "checkpoint")
        # The checkpoint to use: with stop_on_hacking, the best evaluation that showed no sign of hacking.
        best_step, best_total, best_path = self.best if g.stop_on_hacking else (done, None, checkpoint)
        self.tracker.metrics(ci_metrics("eval_reward_gain", {k: after[k] - self.before[k] for k in after}), step=done)
        return {
            "iterations": done,
            "wall_time_s": wall,
            "eval_time_s": loop["eval_time_s"],  # (of wall_time_s, the evaluations every eval_every)
            "samples_per_s": loop["written"] * g.group_size / (wall - loop["eval_time_s"]),
            "checkpoint": str(best_path),
            "last_checkpoint": str(checkpoint),
            "best": {"step": best_step, "eval_reward_total": best_total},
            "hacking": self.hacked,
            "reward_first": history[0],
            "reward_last": history[-1],
            "reward_first_window": float(np.mean(history[:window])),
            "reward_last_window": float(np.mean(history[-window:])),
            "eval_reward_before": {name: float(m.mean()) for name, m in self.before.items()},
            "eval_reward_after": {name: float(m.mean()) for name, m in after.items()},
            "eval": {"prompts": len(self.eval_prompts), "seeds": g.eval_seeds, "level": 0.95, "rewards": held_out,
                     "checks": checks},
            "held_out_scores": str(scores_path.resolve()),
            "monitors": {"before": self.base_monitors, "after": self.monitors},
            "groups_written": loop["written"],
            "groups_dropped": loop["dropped"],
            "resumed_at": loop["resumed_at"],
            "layout": self.progress.layout,
            "stream": {"key": self.streams[0].key, "entries": entries, "pending": pending,
                       "duplicates": self.duplicates},
            "devices": self.devices(),
        }

    def devices(self) -> dict[str, list[str]]:
        """Where each actor computes, chosen from what Ray gave it: the first thing to check on a GPU cluster."""
        ray = self.ray
        return {"rollout": ray.get([r.placement.remote() for r in self.rollouts]),
                "reward": ray.get([r.placement.remote() for r in self.reward_actors]),
                "learner": self.from_learners(self.learners.call("placement"))}
