"""Where a GRPO run's held-out gain is made: the paired change split by how many objects each caption states.

    python benchmarks/gain_by_objects.py RUN_DIR_OR_SCORES_JSON [...] [--reward total] [--against OTHER ...] [--step N]

Reads each run's held_out_scores.json (every held-out prompt's score under every noise seed, before and after; in a
GRPO run_dir, and kept by benchmarks/grpo_recipe.py under its --out/scores/) and prints the paired change after -
before with its 95% bootstrap interval over prompts, overall and on one-object and multi-object scene captions apart
(the base scores 0.96 on the former and 0.45 on the latter, so that is where a gain has room: docs/results.md,
session 39). With several runs of one recipe, also their pooled change (the runs' per-prompt changes averaged:
seeds of one recipe share the held-out prompts). With --against (another recipe's runs of the same seeds), the
final policies paired on the same prompts and noise instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from binding import by_objects  # noqa: E402

from learner.bootstrap import bootstrap_ci  # noqa: E402


def read_scores(path: Path, step: int | None = None) -> dict:
    """A held_out_scores.json, given itself or the run dir holding it; with `step`, its evaluation at that step (one
    of every grpo.eval_every) stands as the "after"."""
    path = path / "held_out_scores.json" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"{path} not found: give a GRPO run_dir or its held_out_scores.json")
    scores = json.loads(path.read_text())
    if step is not None:
        during = scores.get("during", {})
        if str(step) not in during:
            raise SystemExit(f"{path} has no evaluation at step {step}; it has steps {sorted(map(int, during))} "
                             "(runs evaluate every grpo.eval_every) and its final one (no --step)")
        scores["after"] = during[str(step)]
    return scores


def split(change: np.ndarray, prompts: list[str]) -> dict[str, dict]:
    """{"all prompts" | kind: {"prompts": n, mean and interval}} of per-prompt changes [prompts, seeds]."""
    return {"all prompts": {"prompts": len(prompts), **bootstrap_ci(change).as_dict()}, **by_objects(change, prompts)}


def change_by_objects(scores: dict, reward: str, against: dict | None = None,
                      ) -> tuple[list[str], np.ndarray, dict[str, dict]]:
    """(prompts, after - before [prompts, seeds], its `split`); with `against` (another recipe's run of the same
    seed), after - its after instead: the two final policies paired on the same prompts and noise."""
    if reward not in scores["after"]:
        raise SystemExit(f"no reward {reward!r} in the scores; they have {sorted(scores['after'])}")
    baseline = scores["before"]
    if against is not None:
        if against["prompts"] != scores["prompts"] or not np.array_equal(against["before"][reward],
                                                                         scores["before"][reward]):
            raise SystemExit("--against pairs runs of one seed from one start (the same held-out prompts, noise and "
                             "scores before training); these differ: give the runs in the same seed order")
        baseline = against["after"]
    change = np.asarray(scores["after"][reward], dtype=float) - np.asarray(baseline[reward], dtype=float)
    prompts = list(scores["prompts"])
    return prompts, change, split(change, prompts)


def line(name: str, split: dict[str, dict]) -> str:
    return f"| {name} | " + " | ".join(
        f"{s['mean']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}] ({s['prompts']})" if s["prompts"] else "-"
        for s in split.values()) + " |"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="GRPO run dirs or held_out_scores.json files")
    parser.add_argument("--reward", default="total", help="which held-out reward or check (default: the total)")
    parser.add_argument("--against", nargs="+", type=Path, default=None,
                        help="another recipe's runs, one per run and in the same seed order: each row is then the "
                             "run's final scores minus that run's, paired on the same prompts and noise")
    parser.add_argument("--step", type=int, default=None,
                        help="the runs' evaluation at this step (every grpo.eval_every) instead of their final one")
    args = parser.parse_args(argv)
    if args.against is not None and len(args.against) != len(args.runs):
        parser.error(f"--against takes one run per run: {len(args.runs)} runs, {len(args.against)} against")
    rows, changes, prompts = [], [], None
    for i, path in enumerate(args.runs):
        other = read_scores(args.against[i]) if args.against else None
        run_prompts, change, kinds = change_by_objects(read_scores(path, args.step), args.reward, other)
        rows.append(line(f"{path} - {args.against[i]}" if other else str(path), kinds))
        changes.append(change)
        prompts = run_prompts if prompts is None or prompts == run_prompts else []
    if len(changes) > 1 and prompts:  # one recipe's seeds: the same prompts, so the per-prompt changes average
        rows.append(line(f"pooled over {len(changes)} runs", split(np.mean(changes, axis=0), prompts)))
    what = "the run's final scores - the other's" if args.against else "after - before"
    what += f", at step {args.step}" if args.step is not None else ""
    text = (f"Held-out change of `{args.reward}` ({what}, 95% interval over prompts; prompts in brackets)\n\n"
            "| run | all prompts | one object | two or more objects |\n|---|---|---|---|\n" + "\n".join(rows))
    print(text)
    return text


if __name__ == "__main__":
    main()
