"""Does any process's memory grow over a GRPO run? The default config for many iterations, every process kind's
memory read from the run's own MLflow metrics (memory/*, logged each iteration; the reward actors at evaluations).

    python benchmarks/memory_over_run.py [--iterations 150] [--eval-every 50] [--out benchmarks/results/memory]
                                         [--set key=value ...]

Prints and writes a markdown table (per process: MB after the warm-up, at the middle and at the end, and the slope
per 100 iterations over the second half, with a 95% moving-block bootstrap interval), the curves (curves.json) and
their plot. The first tenth of the run is the warm-up (allocator pools, first kernels); the first run states and
evaluations still raise a process's high-water mark in steps, so a leak is what the second half's slope shows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SERIES = ["driver_rss_mb", "rollout_rss_mb", "learner_rss_mb", "reward_rss_mb", "redis_used_mb"]


def block_bootstrap_slope(x: np.ndarray, y: np.ndarray, block: int = 10, draws: int = 2000,
                          seed: int = 0) -> tuple[float, float, float]:
    """OLS slope of y on x and its 95% interval from a moving-block bootstrap (consecutive iterations' memory is
    autocorrelated, which an i.i.d. bootstrap or OLS's own standard error would ignore: too narrow). Written here:
    scipy has no block bootstrap, and one function does not justify another dependency."""
    slope = float(np.polyfit(x, y, 1)[0])
    n = len(x)
    if n < 2 * block:
        return slope, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - block + 1, size=(draws, -(-n // block)))
    idx = (starts[:, :, None] + np.arange(block)).reshape(draws, -1)[:, :n]
    slopes = [np.polyfit(x[i], y[i], 1)[0] if np.ptp(x[i]) > 0 else np.nan for i in idx]
    low, high = np.nanpercentile(slopes, [2.5, 97.5])
    return slope, float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory")
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as scratch:
        uri = f"sqlite:///{scratch}/mlflow.db"
        cmd = [sys.executable, "-m", "learner.main", "--mode", "grpo", f"run_dir={scratch}/run",
               f"mlflow.tracking_uri={uri}", f"grpo.iterations={args.iterations}",
               f"grpo.eval_every={args.eval_every}", *args.set]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the run failed:\n{proc.stderr[-3000:]}")
        summary = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
        client = MlflowClient(uri)
        curves = {}
        for name in SERIES:
            history = sorted((m.step, m.value) for m in client.get_metric_history(summary["mlflow_run_id"],
                                                                                   f"memory/{name}"))
            if history:
                curves[name] = np.array(history, dtype=float)

    warm, half = max(1, args.iterations // 10), args.iterations // 2
    settings = " ".join([f"grpo.iterations={args.iterations}", f"grpo.eval_every={args.eval_every}", *args.set])
    lines = [f"`python -m learner.main --mode grpo {settings}` (the default config otherwise): "
             f"{summary['iterations']} iterations in {summary['wall_time_s'] / 60:.1f} min; memory in MB, the largest "
             f"process of each kind",
             "",
             f"| process | after warm-up (it {warm}) | middle (it {half}) | end | slope per 100 iterations over the "
             f"second half [95% CI] |",
             "|---|---:|---:|---:|---|"]
    for name, curve in curves.items():
        def at(step: int) -> float:
            return float(curve[np.abs(curve[:, 0] - step).argmin(), 1])

        late = curve[curve[:, 0] >= half]
        slope, low, high = (block_bootstrap_slope(late[:, 0], late[:, 1], block=min(10, max(1, len(late) // 4)))
                            if len(late) >= 2 else (float("nan"),) * 3)
        interval = "" if np.isnan(low) or len(late) < 8 else f" [{100 * low:+.1f}, {100 * high:+.1f}]"
        lines.append(f"| {name.removesuffix('_mb')} | {at(warm):.0f} | {at(half):.0f} | {curve[-1, 1]:.0f} | "
                     f"{100 * slope:+.1f}{interval} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "curves.json").write_text(json.dumps({k: v.tolist() for k, v in curves.items()}) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(curve[:, 0], curve[:, 1], marker="o" if len(curve) < 10 else None, label=name.removesuffix("_mb"))
    ax.set_xlabel("iteration")
    ax.set_ylabel("MB")
    ax.set_yscale("log")
    ax.set_title("memory over a GRPO run (per process kind, the largest process)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "memory.png", dpi=120)
    print(f"wrote {args.out / 'table.md'} and {args.out / 'memory.png'}")


if __name__ == "__main__":
    main()
