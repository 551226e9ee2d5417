"""Prox-GRPO vs score-GRPO: reward against wall-clock time and against sampler calls, on equal terms.

    python benchmarks/grpo_reward_vs_time.py [--quick] [--out benchmarks/results/grpo_vs_time]

1. Pretrains a prox model and a score model (`model.kind: score`, eps-MSE) of the same backbone, data, seed,
   iterations and batch size (`--pretrain-iterations`), with `python -m learner.main --mode pretrain`.
2. Reward-fine-tunes each with GRPO on the same reward (the default config's compositional verifier), the same
   prompts, group size and sampler steps, for the same wall-clock budget (`grpo.time_limit_s`): the prox model's
   policy is its hybrid sampler, the score model's is Euler-Maruyama with its final denoising step (DDPO-style).
3. Reads the per-iteration reward and timings from MLflow, prints a markdown table, writes the curves as a plot.
The goal it reports on: prox-GRPO reaches score-GRPO's final reward in half the time or less.
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


def cli(mode: str, config: Path, run_dir: Path, uri: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "learner.main", "--mode", mode, "--config", str(config), f"run_dir={run_dir}",
           f"mlflow.tracking_uri={uri}",
           "mlflow.experiment=benchmark-grpo-vs-time", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())


def curve(summary: dict, uri: str, images_per_iteration: int, steps: int) -> dict[str, np.ndarray]:
    """Per iteration: cumulative GRPO time (rollouts + updates + weight publication), cumulative sampler network calls, mean reward."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)

    def series(key: str) -> np.ndarray:
        return np.array([m.value for m in sorted(client.get_metric_history(summary["mlflow_run_id"], key), key=lambda m: m.step)])

    reward = series("reward_mean")
    seconds = np.cumsum(series("rollout_s") + series("update_s") + series("publish_s"))
    calls = np.arange(1, len(reward) + 1) * images_per_iteration * steps
    return {"seconds": seconds, "calls": calls, "reward": reward}


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` iterations (the per-iteration reward of 48 images is noisy)."""
    return np.array([x[max(0, i - window + 1): i + 1].mean() for i in range(len(x))])


def time_to_reach(c: dict[str, np.ndarray], target: float, window: int) -> float | None:
    hit = np.nonzero(smooth(c["reward"], window) >= target)[0]
    return float(c["seconds"][hit[0]]) if len(hit) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small budgets (about 15 minutes on 2 cores)")
    parser.add_argument("--pretrain-iterations", type=int, default=None, help="default 2000 (quick: 300)")
    parser.add_argument("--budget-s", type=float, default=None, help="GRPO seconds per model; default 900 (quick: 120)")
    parser.add_argument("--window", type=int, default=5, help="iterations averaged for the final reward")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml",
                        help="the run config both models use (configs/smoke.yaml checks the script in a minute)")
    parser.add_argument("--keep-models", type=Path, default=None,
                        help="copy the two pretrained checkpoints to DIR/scenes/prox and DIR/scenes/score "
                        "(quality_vs_steps.py --models DIR --datasets scenes)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grpo_vs_time")
    args = parser.parse_args()
    pretrain_its = args.pretrain_iterations or (300 if args.quick else 2000)
    budget = args.budget_s or (120.0 if args.quick else 900.0)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="proxrl-bench-"))
    uri = f"sqlite:///{scratch / 'mlflow.db'}"

    from learner.config import load_config

    g = load_config(args.config).grpo
    images = g.prompts_per_iteration * g.group_size
    curves, summaries = {}, {}
    for kind in KINDS:
        pre = cli("pretrain", args.config, scratch / f"pretrain-{kind}", uri,
                  [f"model.kind={kind}", f"pretrain.iterations={pretrain_its}"])
        summaries[kind] = cli("grpo", args.config, scratch / f"grpo-{kind}", uri, [
            f"init_from={pre['checkpoint']}", f"grpo.time_limit_s={budget}", "grpo.iterations=100000",
            "grpo.eval_every=0",
        ])
        summaries[kind]["pretrain_loss_final"] = pre.get("loss_final")
        if args.keep_models:
            shutil.copytree(pre["checkpoint"], args.keep_models / "scenes" / kind, dirs_exist_ok=True)
            (args.keep_models / "scenes" / "pretrain.json").write_text(json.dumps({"iterations": pretrain_its}) + "\n")
        curves[kind] = curve(summaries[kind], uri, images, g.steps)

    w = args.window
    final = {k: float(c["reward"][-w:].mean()) for k, c in curves.items()}
    target = final["score"]
    reach = {k: time_to_reach(c, target, w) for k, c in curves.items()}
    lines = [
        f"| policy ({pretrain_its} pretraining iterations each, GRPO budget {budget:.0f} s, {g.prompts_per_iteration} "
        f"prompts x {g.group_size} images, {g.steps} steps) | iterations | reward, first {w} | reward, last {w} | "
        f"held-out reward before -> after | seconds to reach score-GRPO's final reward |",
        "|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        s, c = summaries[kind], curves[kind]
        before = ", ".join(f"{v:.3f}" for v in s["eval_reward_before"].values())
        after = ", ".join(f"{v:.3f}" for v in s["eval_reward_after"].values())
        t = "-" if reach[kind] is None else f"{reach[kind]:.0f}"
        lines.append(f"| {kind}-GRPO | {s['iterations']} | {c['reward'][:w].mean():.3f} | {final[kind]:.3f} | "
                     f"{before} -> {after} | {t} |")
    ok = reach["prox"] is not None and reach["prox"] <= 0.5 * reach["score"]
    verdict = (f"Goal (prox-GRPO reaches score-GRPO's final reward {target:.3f} in half the time or less): "
               f"{'met' if ok else 'not met'}; prox {reach['prox'] if reach['prox'] is not None else 'never'} s vs "
               f"score {reach['score']:.0f} s.")
    table = "\n".join(lines) + "\n\n" + verdict
    print(table)
    (args.out / "table.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for kind, color in zip(KINDS, ("#2a7", "#c44")):
        c = curves[kind]
        for ax, x in zip(axes, (c["seconds"], c["calls"])):
            ax.plot(x, c["reward"], color=color, alpha=0.25)
            ax.plot(x, smooth(c["reward"], w), color=color, label=f"{kind}-GRPO")
    axes[0].set_xlabel("GRPO wall-clock seconds (rollouts + updates)")
    axes[1].set_xlabel("sampler network calls in rollouts")
    axes[0].set_ylabel("mean training reward")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out / "reward_vs_time.png", dpi=120)
    print(f"wrote {args.out / 'table.md'} and {args.out / 'reward_vs_time.png'}")


if __name__ == "__main__":
    main()
