"""How long a GRPO run takes to start: from the command to the start model's evaluation, and to the end of a
one-iteration run, for one or more checkouts measured in turns in the same session.

    python benchmarks/startup.py [--trees . ../old-checkout] [--repeats 3] [--out benchmarks/results/startup]

Each run is `python -m learner.main --mode grpo` with configs/smoke.yaml and 1 iteration (the tiniest model, so what
is left is start-up: imports, Ray, the actors' processes, the learner's DeepSpeed engine), from a smoke model this
script pretrains once. Runs alternate between the trees so that a change in the machine's load hits each alike; one
warm-up run per tree (MLflow's schema, DeepSpeed's op build, the file cache) is not counted. Prints a markdown table
of medians with [min, max] and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MARK = "evaluating the starting model"  # printed once the actors are created, as the start's evaluation begins


def timed_run(tree: Path, args: list[str], log: Path) -> dict[str, float]:
    """Seconds from the command to MARK and to its end, and the run's own loop seconds (summary.json)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "learner.main", *args], cwd=tree, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=err)
        to_mark, lines = float("nan"), []
        for line in proc.stdout:
            lines.append(line)
            if MARK in line and to_mark != to_mark:
                to_mark = time.monotonic() - start
        proc.wait()
    total = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"a run in {tree} failed (exit {proc.returncode}); its stderr is in {log}")
    summary = json.loads(Path(lines[-1].strip()).read_text())
    return {"to_evaluation_s": to_mark, "loop_s": summary["wall_time_s"], "total_s": total}


def label(tree: Path) -> str:
    """The tree's commit (and whether it has uncommitted changes), or its path outside git."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return str(tree)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def table(results: dict[str, list[dict[str, float]]]) -> str:
    def cell(values: list[float]) -> str:
        return f"{np.median(values):.1f} [{min(values):.1f}, {max(values):.1f}]"

    rows = ["| checkout | runs | command to the start's evaluation (s) | the 1-iteration loop (s) | whole command (s) |",
            "|---|---|---|---|---|"]
    for tree, runs in results.items():
        rows.append(f"| {tree} | {len(runs)} | " + " | ".join(cell([r[k] for r in runs]) for k in
                                                         ("to_evaluation_s", "loop_s", "total_s")) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs="+", type=Path, default=[ROOT], help="checkouts to compare (default: this one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="folder for startup.md (default: print only)")
    a = ap.parse_args()
    trees = [t.resolve() for t in a.trees]
    scratch = Path(tempfile.mkdtemp(prefix="proxrl-startup-"))
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    smoke = str(ROOT / "configs" / "smoke.yaml")
    common = ["--config", smoke, f"mlflow.tracking_uri={uri}", "mlflow.experiment=benchmark-startup"]
    print(f"pretraining the smoke model in {scratch}", flush=True)
    pre = subprocess.run([sys.executable, "-m", "learner.main", "--mode", "pretrain", *common,
                          f"run_dir={scratch / 'pretrain'}"], cwd=ROOT, capture_output=True, text=True)
    if pre.returncode != 0:
        raise SystemExit(f"pretraining failed:\n{pre.stderr[-3000:]}")
    grpo = ["--mode", "grpo", *common, f"init_from={scratch / 'pretrain' / 'checkpoint'}", "grpo.iterations=1",
            "grpo.eval_every=0"]
    labels = [label(t) for t in trees]  # once: a tree edited during the runs stays one row
    results: dict[str, list[dict[str, float]]] = {name: [] for name in labels}
    for repeat in range(a.repeats + 1):  # repeat 0: the warm-up, not counted
        for i, tree in enumerate(trees):
            name = f"r{repeat}-t{i}"
            r = timed_run(tree, [*grpo, f"run_dir={scratch / name}"], scratch / f"{name}.stderr")
            print(f"{tree} run {repeat}{' (warm-up)' if repeat == 0 else ''}: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
            if repeat:
                results[labels[i]].append(r)
    text = table(results)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "startup.md").write_text(f"`python benchmarks/startup.py {' '.join(sys.argv[1:])}`\n\n{text}\n")


if __name__ == "__main__":
    main()
