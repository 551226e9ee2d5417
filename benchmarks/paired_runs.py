"""Two recipes' final policies compared on the same held-out prompts and noise, paired per prompt.

    python benchmarks/paired_runs.py --a DB:RUN_ID ... --b DB:RUN_ID ... [--step 30] [--out FILE]

Each pair (a_i, b_i) must be two GRPO runs of one seed (`benchmarks/grpo_recipe.py` with the same --seeds): the same
held-out prompts and, because the held-out noise is fixed by the run seed, the same noise. Every evaluation logs a
table with each prompt's scores on the first noise seed (MLflow artifact samples/stepNNNNN.json); this reads those
of `--step` from each run's artifact folder next to its mlflow.db and bootstraps b - a over prompts x seed pairs
(95% interval over prompts). It checks that the starts (step 0) are identical, so the runs are comparable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from learner.bootstrap import bootstrap_ci  # noqa: E402


def table(ref: str, step: int) -> dict[str, np.ndarray]:
    """{column: per-prompt values} of one run's evaluation table at `step` (ref: path/to/mlflow.db:RUN_ID)."""
    db, run = ref.rsplit(":", 1)
    path = Path(db).parent / "mlartifacts" / run / "artifacts" / "samples" / f"step{step:05d}.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: is {run} a run logged to {db} with an evaluation at step {step}?")
    data = json.loads(path.read_text())
    rows = data["data"]
    return {c: np.array([r[i] for r in rows], dtype=object if c in ("prompt", "image") else float)
            for i, c in enumerate(data["columns"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="+", required=True, help="baseline runs, path/to/mlflow.db:RUN_ID, one per seed")
    parser.add_argument("--b", nargs="+", required=True, help="compared runs, in the same seed order")
    parser.add_argument("--step", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if len(args.a) != len(args.b):
        raise SystemExit(f"--a has {len(args.a)} runs and --b {len(args.b)}: give one of each per seed")
    diffs: dict[str, list[np.ndarray]] = {}
    for a, b in zip(args.a, args.b):
        a0, b0 = table(a, 0), table(b, 0)
        if list(a0["prompt"]) != list(b0["prompt"]) or not np.array_equal(a0["total"], b0["total"]):
            raise SystemExit(f"{a} and {b} do not start alike (other prompts or other noise): not a pair")
        a1, b1 = table(a, args.step), table(b, args.step)
        for column in a1:
            if column not in ("prompt", "image") and column in b1:
                diffs.setdefault(column, []).append(b1[column] - a1[column])
    rows = [f"| {column} | {bootstrap_ci(np.stack(d, axis=1))} |" for column, d in diffs.items()]
    text = (f"b - a at step {args.step}, {len(args.a)} seed pair(s), the first noise seed of each run's held-out "
            "evaluation, paired per prompt; 95% bootstrap intervals over prompts.\n\n| reward | b - a |\n|---|---|\n"
            + "\n".join(rows) + "\n\na: " + ", ".join(args.a) + "\n\nb: " + ", ".join(args.b) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
