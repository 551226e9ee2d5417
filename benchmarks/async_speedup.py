"""Synchronous vs async GRPO (rollouts one policy version ahead): wall time and throughput of the default config.

    python benchmarks/async_speedup.py [--iterations 20] [--out benchmarks/results]

Runs `python -m learner.main --mode grpo` once per setting (same seed, same prompts), reads each run's
summary.json and its per-iteration timings from MLflow, prints a markdown table and writes a bar plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [  # (label, overrides)
    ("sync, all cores per actor (the default)", ["grpo.max_staleness=0", "actors.torch_threads=0"]),
    ("sync, 1 thread per actor", ["grpo.max_staleness=0", "actors.torch_threads=1"]),
    ("async (staleness 1), all cores per actor, always overlapped", ["grpo.max_staleness=1", "actors.torch_threads=2",
                                                                    "grpo.async_probe=0"]),
    ("async (staleness 1), cores split, always overlapped", ["grpo.max_staleness=1", "actors.torch_threads=0",
                                                             "grpo.async_probe=0"]),
    ("async (staleness 1), the defaults: probe, then the faster", ["grpo.max_staleness=1", "actors.torch_threads=0"]),
]


def run(label: str, overrides: list[str], iterations: int, scratch: Path, uri: str) -> dict:
    run_dir = scratch / f"run{len(list(scratch.glob('run*')))}"
    cmd = [sys.executable, "-m", "learner.main", "--mode", "grpo", f"run_dir={run_dir}", f"mlflow.tracking_uri={uri}",
           f"grpo.iterations={iterations}", "grpo.eval_every=0", "mlflow.experiment=benchmark-async", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    per_it = {k: [m.value for m in client.get_metric_history(summary["mlflow_run_id"], k)]
              for k in ("rollout_s", "policy_lag_trained_max")}
    return {"label": label, **summary, "mean_rollout_s": sum(per_it["rollout_s"]) / iterations,
            "max_lag": max(per_it["policy_lag_trained_max"], default=0),  # not logged while it stays 0
            "kept": kept(summary.get("layout"))}


def kept(layout: dict | None) -> str:
    """The layout an async run kept, with what its probe measured (learner/layout.py)."""
    from learner.layout import LayoutProbe

    if not layout or layout["staleness"] == 0:
        return "sync"
    probe = LayoutProbe(**layout)
    if not probe.times["async"]:
        return "async (not probed)"
    sync, overlapped = (probe.seconds_per_group(n) for n in ("sync", "async"))
    return f"{probe.chosen} (probe: sync {sync:.2f} s, async {overlapped:.2f} s per trained group)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "async")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="proxrl-bench-"))  # runs and their MLflow store; only results are kept
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    rows = [run(label, overrides, args.iterations, scratch, uri) for label, overrides in SETTINGS]
    shutil.rmtree(scratch, ignore_errors=True)

    base = rows[0]["wall_time_s"]
    lines = [
        f"| setting ({args.iterations} iterations, 6 prompts x 8 images, 10 steps) | GRPO loop wall time (s) | images/s | "
        "speed-up | waiting for rollouts per iteration (s) | max policy lag trained on | layout kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['wall_time_s']:.0f} | {r['samples_per_s']:.2f} | {base / r['wall_time_s']:.2f}x | "
                     f"{r['mean_rollout_s']:.1f} | {r['max_lag']:.0f} | {r['kept']} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.barh([r["label"] for r in rows], [r["samples_per_s"] for r in rows], color=["#888", "#aaa", "#c66", "#e99", "#2a7"])
    ax.set_xlabel("images per second (whole GRPO loop)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(args.out / "async_speedup.png", dpi=120)
    print(f"wrote {args.out / 'table.md'} and {args.out / 'async_speedup.png'}")


if __name__ == "__main__":
    main()
