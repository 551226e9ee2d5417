"""A GRPO run beside another job on the same cores: every actor on all cores against the shell's OMP_NUM_THREADS=1.

    python benchmarks/threads_beside_load.py [--iterations 2] [--out benchmarks/results/threads]

Starts a competing job (one torch thread multiplying matrices, as a one-thread pretraining run does), then runs
`python -m learner.main --mode grpo` on the default config twice, in turns: with `actors.torch_threads=0` (every actor
takes all cores, the default before session 43) and with the shell's `OMP_NUM_THREADS=1` and no setting (what the
default follows since). Both runs evaluate on a small held-out set so that the time is the loop's. Prints a markdown
table of the runs' iteration seconds (MLflow `sample_s` and `iteration_s`, the median over iterations) and writes it to
--out. Without a competing job (--no-load) the same two runs show what all cores are worth on an idle machine.
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
import yaml

ROOT = Path(__file__).resolve().parent.parent
LOAD = "import torch\ntorch.set_num_threads(1)\na = torch.randn(768, 768)\nwhile True:\n    a = torch.tanh(a @ a)\n"


def run(name: str, overrides: list[str], env: dict[str, str], iterations: int, tmp: Path) -> dict:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = ["--mode", "grpo", f"run_dir={tmp / name}", f"grpo.iterations={iterations}", "grpo.eval_prompts=8",
            "grpo.eval_seeds=1", f"mlflow.tracking_uri={uri}", *overrides]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "learner.main", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((tmp / name / "summary.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    per = {key: float(np.median([m.value for m in client.get_metric_history(summary["mlflow_run_id"], key)]))
           for key in ("sample_s", "iteration_s")}
    threads = yaml.safe_load((tmp / name / "config.yaml").read_text())["actors"]["torch_threads"]
    return {"run": name, "torch_threads": threads, **per, "command_s": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--no-load", action="store_true", help="no competing job")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "threads")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cases = [("all-cores", ["actors.torch_threads=0"], base),
             ("omp1", [], {**base, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})]
    load_env = {**base, "OMP_NUM_THREADS": "1"}
    load = None if args.no_load else subprocess.Popen([sys.executable, "-c", LOAD], env=load_env)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, overrides, env in cases:
                rows.append(run(name, overrides, env, args.iterations, Path(tmp)))
                print(rows[-1], flush=True)
    finally:
        if load is not None:
            load.kill()
    lines = [f"GRPO default config, {args.iterations} iterations, "
             f"{'idle machine' if args.no_load else 'beside a one-thread torch job'}, {os.cpu_count()} cores; "
             "medians over iterations.", "",
             "| run | actors.torch_threads used | sampling s per iteration | iteration s | whole command s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['torch_threads']} | {r['sample_s']:.1f} | {r['iteration_s']:.1f} | "
              f"{r['command_s']:.0f} |" for r in rows]
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ("threads-idle.md" if args.no_load else "threads-beside-load.md")).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
