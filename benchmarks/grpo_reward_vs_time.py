"""Prox policy gradient vs prox forward objective vs score-GRPO: held-out reward against time and images, on equal terms.

    python benchmarks/grpo_reward_vs_time.py [--models DIR] [--seeds 0 1 2] [--budget-s 300] [--quick]

1. Bases: a prox and a score model of the same backbone, data, seed, iterations and batch size, pretrained here
   (`--pretrain-iterations`, `python -m learner.main --mode pretrain`) or reused from `--models DIR`
   (DIR/scenes/prox and DIR/scenes/score, as `quality_vs_steps.py --keep-models` or this script's `--keep-models`
   write them). From scratch by default; with `--warm-start CKPT` both start from one prox checkpoint's network
   (the score one re-read as kind score) and continue the same steps on the same scenes with their own loss, so
   the score base has read as many captions as the prox one. Session 30's bases (docs/results.md):
       --warm-start builtin:scenes-minilm-x0-4200 --pretrain-iterations 1200 --pretrain-set pretrain.loss_space=x0
       pretrain.l1_warmup_frac=0 data.cursor=294400 --budget-s 240 --eval-every 10 --eval-prompts 128
2. Reward-fine-tunes each policy with GRPO on the same reward (the config's: the scene verifier's strict setting
   since session 45; sessions 30-31 ran the lenient one: --config a copy of configs/default.yaml with `rewards:
   [{name: compositional}]` and `check_rewards: [compositional_strict, compositional_count]`), prompts, group
   size and sampler steps, for the same training budget (`grpo.time_limit_s`, evaluations not counted), once per seed:
       prox-pg       the prox model, per-step policy gradient on its stochastic hybrid sampler (the default)
       prox-forward  the prox model, the forward-process objective on its samples (`grpo.objective=forward`)
       score-pg      the score model, Euler-Maruyama with its final denoising step (DDPO-style)
   Every `--eval-every` iterations the run evaluates the held-out prompts (the same prompts and noise for all).
3. Reads rewards, timings and held-out evaluations from MLflow; prints a markdown table (final held-out reward with
   its 95% interval, per seed and mean; seconds and images to reach score-pg's final held-out reward; each policy's
   gain and each pair's difference of gains, paired per prompt and noise seed from the runs' held_out_scores.json,
   kept under --out/kept); plots the
   held-out reward with its interval band against GRPO seconds (rollouts + updates + weight publication, evaluation
   excluded) and against images sampled.
The goal it reports on: prox (either objective) reaches score-GRPO's final held-out reward in <= 0.5x its time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("prox", "score")
POLICIES = {  # name -> (base model kind, overrides)
    # sessions 30-31 ran these under the policy-gradient default's stochastic_steps 3 (the default since 46 is null):
    # main() adds grpo.stochastic_steps=min(3, steps - 1) to the prox policies
    "prox-pg": ("prox", ["grpo.objective=policy_gradient"]),
    "prox-forward": ("prox", ["grpo.objective=forward"]),
    "score-pg": ("score", ["grpo.objective=policy_gradient", "grpo.stochastic_steps=null"]),  # its full SDE chain
}
COLORS = {"prox-pg": "#2a7", "prox-forward": "#27c", "score-pg": "#c44"}


def cli(mode: str, config: Path, run_dir: Path, uri: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "learner.main", "--mode", mode, "--config", str(config), f"run_dir={run_dir}",
           f"mlflow.tracking_uri={uri}",
           "mlflow.experiment=benchmark-grpo-vs-time", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())


def curve(summary: dict, uri: str, images_per_iteration: int) -> dict[str, np.ndarray]:
    """Per iteration: cumulative GRPO seconds (rollouts + updates + weight publication), images, training reward; and
    the held-out evaluations (step 0 = the base) at the seconds and images of their step, with their intervals."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)

    def series(key: str) -> tuple[np.ndarray, np.ndarray]:
        ms = sorted(client.get_metric_history(summary["mlflow_run_id"], key), key=lambda m: m.step)
        return np.array([m.step for m in ms]), np.array([m.value for m in ms])

    _, reward = series("reward_mean")
    seconds = np.cumsum(series("rollout_s")[1] + series("update_s")[1] + series("publish_s")[1])
    images = np.arange(1, len(reward) + 1) * images_per_iteration
    steps, held = series("eval_reward_total")
    at = np.concatenate([[0.0], seconds])  # seconds after `step` iterations
    return {"seconds": seconds, "images": images, "reward": reward, "eval_step": steps, "eval": held,
            "eval_low": series("eval_reward_total_ci_low")[1], "eval_high": series("eval_reward_total_ci_high")[1],
            "eval_seconds": at[np.minimum(steps, len(seconds))].astype(float),
            "eval_images": steps * images_per_iteration}


def once_per_step(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The held-out evaluations with one per step (a run ending on an eval_every step evaluates it twice)."""
    last = np.array([i for i, step in enumerate(c["eval_step"]) if i + 1 == len(c["eval_step"])
                     or c["eval_step"][i + 1] != step])
    return {k: (v[last] if k.startswith("eval") else v) for k, v in c.items()}


def reach(c: dict[str, np.ndarray], target: float) -> tuple[float, float] | None:
    """(seconds, images) at the first held-out evaluation at or above `target`; None if none is."""
    hit = np.nonzero(c["eval"] >= target)[0]
    return (float(c["eval_seconds"][hit[0]]), float(c["eval_images"][hit[0]])) if len(hit) else None


def median_reach(hits: list[tuple[float, float] | None]) -> tuple[float, float]:
    """Median (seconds, images) over seeds to reach a target; a seed that never does counts as infinitely late
    (censored), so the median is finite when most seeds reach it."""
    times = [(np.inf, np.inf) if h is None else h for h in hits]
    return float(np.median([t[0] for t in times])), float(np.median([t[1] for t in times]))


def score_twin(prox_checkpoint: str, directory: Path) -> Path:
    """A prox checkpoint's network (U-Net and text encoder) as a score model's starting point: a score base that
    has read as many captions as the prox base it is compared with."""
    from learner.main import resolve_checkpoint
    from proxmodel.model import ProxT2I, load_model, save_model

    prox = load_model(resolve_checkpoint(prox_checkpoint))
    if prox.cfg.kind != "prox":
        raise SystemExit(f"--warm-start {prox_checkpoint} is a {prox.cfg.kind} model; give a prox checkpoint")
    twin = ProxT2I(prox.cfg.model_copy(update={"kind": "score", "trained_steps": None, "trained_variants": None}))
    twin.load_state_dict(prox.state_dict())
    save_model(twin, directory)
    return directory


def bases(args, scratch: Path, uri: str) -> dict[str, str]:
    """kind -> checkpoint: reused from --models, or pretrained here (and kept with --keep-models): from scratch, or
    with --warm-start both from one prox checkpoint's network, each continued with its own loss."""
    if args.models:
        return {kind: str(args.models / "scenes" / kind) for kind in KINDS}
    out = {}
    iterations = args.pretrain_iterations or (300 if args.quick else 2000)
    for kind in KINDS:
        overrides = [f"pretrain.iterations={iterations}", *args.pretrain_set]
        if args.warm_start is None:
            overrides.append(f"model.kind={kind}")
        elif kind == "prox":
            overrides.append(f"init_from={args.warm_start}")
        else:  # a shorter EMA: the prox weights it starts from are no score model, and 0.999^N would keep them
            overrides += [f"init_from={score_twin(args.warm_start, scratch / 'score-init')}", "pretrain.ema_decay=0.995"]
        pre = cli("pretrain", args.config, scratch / f"pretrain-{kind}", uri, overrides)
        out[kind] = pre["checkpoint"]
        if args.keep_models:
            shutil.copytree(pre["checkpoint"], args.keep_models / "scenes" / kind, dirs_exist_ok=True)
            (args.keep_models / "scenes" / "pretrain.json").write_text(json.dumps(
                {"iterations": iterations, "warm_start": args.warm_start, "overrides": args.pretrain_set}) + "\n")
    return out


def paired_gains(scores: dict[str, dict[int, dict]]) -> list[str]:
    """Markdown rows: each policy's held-out gain (after - before), and each pair's difference of gains, paired per
    prompt and noise seed over the seeds both ran (all runs share the held-out prompts; a run seed fixes the noise),
    with a 95% bootstrap interval over prompts. Between a prox and a score policy this is a difference of
    differences: their starts differ, their prompts and noise indices do not."""
    from learner.bootstrap import bootstrap_ci

    def gain(s: dict) -> np.ndarray:
        return np.asarray(s["after"]["total"]) - np.asarray(s["before"]["total"])

    names = [n for n in POLICIES if scores.get(n)]
    if not names:
        return []
    lines = ["", "Held-out gain (after - before), paired per prompt and noise seed, 95% interval over prompts:", "",
             "| policy or pair | seeds | gain |", "|---|---|---|"]
    for n in names:
        seeds = sorted(scores[n])
        lines.append(f"| {n} | {len(seeds)} | {bootstrap_ci(np.concatenate([gain(scores[n][s]) for s in seeds], 1))} |")
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            seeds = sorted(set(scores[a]) & set(scores[b]))
            if not seeds:
                continue
            for s in seeds:
                if scores[a][s]["prompts"] != scores[b][s]["prompts"]:
                    raise SystemExit(f"{a} and {b} (seed {s}) were evaluated on other prompts: not a pair")
            diff = np.concatenate([gain(scores[a][s]) - gain(scores[b][s]) for s in seeds], 1)
            lines.append(f"| {a} - {b} | {len(seeds)} | {bootstrap_ci(diff)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small budgets (a smoke check of the pipeline)")
    parser.add_argument("--models", type=Path, default=None, help="reuse DIR/scenes/prox and DIR/scenes/score")
    parser.add_argument("--pretrain-iterations", type=int, default=None, help="without --models: default 2000 (quick: 300)")
    parser.add_argument("--warm-start", default=None, help="without --models: start both bases from this prox "
                        "checkpoint's network (the score one as kind score, EMA decay 0.995) instead of from scratch")
    parser.add_argument("--pretrain-set", nargs="*", default=[], help="overrides for both bases' pretraining, e.g. "
                        "pretrain.loss_space=x0 data.cursor=294400")
    parser.add_argument("--keep-models", type=Path, default=None, help="copy the pretrained bases to DIR/scenes/<kind>")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-s", type=float, default=None, help="GRPO seconds per run; default 300 (quick: 60)")
    parser.add_argument("--eval-every", type=int, default=5, help="iterations between held-out evaluations")
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--eval-seeds", type=int, default=2)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml",
                        help="the run config every policy uses (configs/smoke.yaml checks the script in minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grpo_vs_time")
    args = parser.parse_args()
    budget = args.budget_s or (60.0 if args.quick else 300.0)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="proxrl-bench-"))
    uri = f"sqlite:///{scratch / 'mlflow.db'}"

    from learner.config import load_config

    g = load_config(args.config).grpo
    images = g.prompts_per_iteration * g.group_size
    checkpoints = bases(args, scratch, uri)
    curves: dict[str, list[dict]] = {}
    scores: dict[str, dict[int, dict]] = {}  # policy -> seed -> its held_out_scores.json
    for seed in args.seeds:  # seed by seed: a run stopped part-way has every policy on the same seeds
        for name in args.policies:
            kind, overrides = POLICIES[name]
            if kind == "prox":  # the early transitions stochastic, the rest the flow ODE, as sessions 30-31 ran
                overrides = [*overrides, f"grpo.stochastic_steps={min(3, g.steps - 1)}"]
            # Each finished run's curves are kept under --out/kept, so the benchmark can be stopped and continued
            # (e.g. one seed per session); a kept run is used only if it was made with the same settings.
            kept = args.out / "kept" / f"{name}-seed{seed}.json"
            settings = {"bases": checkpoints, "budget_s": budget, "eval": [args.eval_every, args.eval_prompts,
                        args.eval_seeds], "config": str(args.config), "overrides": overrides,
                        "time_limit": "training only"}  # (runs before evaluations were excluded from it: not reused)
            kept_scores = kept.with_name(f"{name}-seed{seed}-scores.json")  # every held-out score, before and after
            if kept.exists() and json.loads(kept.read_text())["settings"] == settings:
                curves.setdefault(name, []).append(once_per_step({k: np.asarray(v) for k, v in
                                                                  json.loads(kept.read_text())["curve"].items()}))
                if kept_scores.exists():
                    scores.setdefault(name, {})[seed] = json.loads(kept_scores.read_text())
                continue
            summary = cli("grpo", args.config, scratch / f"grpo-{name}-{seed}", uri, [
                f"init_from={checkpoints[kind]}", f"seed={seed}", f"grpo.time_limit_s={budget}",
                "grpo.iterations=100000", f"grpo.eval_every={args.eval_every}", f"grpo.eval_prompts={args.eval_prompts}",
                f"grpo.eval_seeds={args.eval_seeds}", *overrides])
            curves.setdefault(name, []).append(once_per_step(curve(summary, uri, images)))
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps({"settings": settings, "curve": {k: v.tolist() for k, v in
                                                                         curves[name][-1].items()}}) + "\n")
            shutil.copyfile(summary["held_out_scores"], kept_scores)
            scores.setdefault(name, {})[seed] = json.loads(kept_scores.read_text())
    shutil.rmtree(scratch, ignore_errors=True)

    final = {n: [float(c["eval"][-1]) for c in cs] for n, cs in curves.items()}
    target = float(np.mean(final["score-pg"])) if "score-pg" in final else None
    lines = [f"Same bases, reward and budget ({budget:.0f} s of GRPO per run, {g.prompts_per_iteration} prompts x "
             f"{g.group_size} images, {g.steps} steps); held-out: {args.eval_prompts} prompts x {args.eval_seeds} "
             f"noise seeds every {args.eval_every} iterations, mean [95% interval]; seeds {args.seeds}.", "",
             "| policy | iterations per run | held-out before | held-out after, per seed | mean after | "
             "seconds / images to reach score-pg's final (median over seeds) |", "|---|---|---|---|---|---|"]
    reached = {}
    for name, cs in curves.items():
        per_seed = "; ".join(f"{c['eval'][-1]:.3f} [{c['eval_low'][-1]:.3f}, {c['eval_high'][-1]:.3f}]" for c in cs)
        hits = [reach(c, target) for c in cs] if target is not None else []
        reached[name] = median_reach(hits) if hits else None
        seconds, images = reached[name] or (None, None)
        when = ("-" if seconds is None else "not reached by most seeds" if np.isinf(seconds)
                else "at its start" if seconds == 0.0 else f"{seconds:.0f} s / {images:.0f}")
        lines.append(f"| {name} | {np.mean([len(c['reward']) for c in cs]):.0f} | {np.mean([c['eval'][0] for c in cs]):.3f} | "
                     f"{per_seed} | {np.mean(final[name]):.3f} | {when} |")
    if target is not None and reached.get("score-pg"):
        score_base = float(np.mean([c["eval"][0] for c in curves["score-pg"]]))
        best = min((reached[n][0] for n in ("prox-pg", "prox-forward")
                    if reached.get(n) and np.isfinite(reached[n][0])), default=None)
        if best == 0.0 and reached["score-pg"][0] > 0.0:  # prox starts where score-GRPO ends: 0 <= 0.5 x any time
            late = reached["score-pg"][0]
            verdict = (f"met (prox at its start is at or above score-pg's final; score-pg "
                       f"{'does not reach it on most seeds' if np.isinf(late) else f'takes {late:.0f} s'})")
        elif np.isinf(reached["score-pg"][0]):  # its mean final is above where most of its own seeds end
            verdict = (f"not measurable: most score-pg seeds never reach their mean final held-out reward "
                       f"{target:.3f} at an evaluation, so it has no time to beat")
        elif reached["score-pg"][0] == 0.0:  # no time to beat: score-GRPO ended where (or below where) it started
            verdict = (f"not measurable: score-pg's final held-out reward {target:.3f} is not above its base's "
                       f"{score_base:.3f}, so there is no time to reach it in")
        else:
            ok = best is not None and best <= 0.5 * reached["score-pg"][0]
            verdict = (f"{'met' if ok else 'not met'} (prox {'never' if best is None else f'{best:.0f} s'} vs "
                       f"score-pg {reached['score-pg'][0]:.0f} s)")
        lines += ["", f"Goal (prox reaches score-pg's final held-out reward {target:.3f} in <= 0.5x its time): {verdict}."]
    lines += paired_gains(scores)
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for name, cs in curves.items():
        for i, c in enumerate(cs):
            for ax, x in zip(axes, (c["eval_seconds"], c["eval_images"])):
                ax.plot(x, c["eval"], color=COLORS[name], marker="o", ms=3, label=name if i == 0 else None)
                ax.fill_between(x, c["eval_low"], c["eval_high"], color=COLORS[name], alpha=0.12)
    if target is not None:
        for ax in axes:
            ax.axhline(target, color="grey", lw=0.8, ls="--")
    axes[0].set_xlabel("GRPO seconds (rollouts + updates + publication)")
    axes[1].set_xlabel("images sampled")
    axes[0].set_ylabel("held-out reward (95% interval)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "reward_vs_time.png", dpi=120)
    print(f"wrote {args.out / 'table.md'} and {args.out / 'reward_vs_time.png'}")


if __name__ == "__main__":
    main()
