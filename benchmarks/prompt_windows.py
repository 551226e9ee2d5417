"""How much of a GRPO run's training-reward rise is its prompts? The base, scored on the runs' own windows.

    python benchmarks/prompt_windows.py [--checkpoint builtin:scenes-minilm] [--iterations 30] [--out DIR]

summary.json's reward_first_window / reward_last_window are the mean training reward over the first and last fifth
of a run's iterations. Every run of one seed trains on the same seeded prompt sequence, so the two windows differ in
their prompts as well as in the policy. This scores the untrained base on exactly those prompts (group-size images
each, the rollouts' sampler) and reports its own first -> last change with a 95% bootstrap interval over prompts:
what a run's windows would show if it learned nothing. Beside it, the windows the stored grpo_recipe runs from that
base recorded. Prints a markdown table, writes it and a JSON to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

from report import publish  # a sibling script (see report.py)

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="builtin:scenes-minilm", help="the runs' base (folder or builtin:NAME)")
    parser.add_argument("--iterations", type=int, default=30, help="the runs' grpo.iterations")
    parser.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "results" / "grpo_recipe",
                        help="stored grpo_recipe results to set beside it (runs from --checkpoint)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prompt_windows")
    args = parser.parse_args()

    from learner.bootstrap import bootstrap_ci
    from learner.config import load_config
    from learner.evaluation import reward_matrix
    from learner.main import resolve_checkpoint
    from learner.prompts import prompt_source
    from proxmodel.model import load_model
    from rewards import build

    cfg = load_config(ROOT / "configs" / "default.yaml")
    n, window = cfg.grpo.prompts_per_iteration, max(1, args.iterations // 5)  # as learner/grpo.py's summary
    source = prompt_source(cfg)
    windows = {"first": source.train(0, window * n), "last": source.train((args.iterations - window) * n, window * n)}
    base = Path(resolve_checkpoint(args.checkpoint))  # runs recorded it resolved, on whichever machine
    model = load_model(base).eval()
    rewards = {r.name: build(r.name, **r.options) for r in cfg.rewards}
    per_prompt, result = {}, {"checkpoint": args.checkpoint, "iterations": args.iterations, "window": window}
    for name, prompts in windows.items():
        _, scores = reward_matrix(model, prompts, cfg.grpo.steps, cfg.seed, cfg.grpo.group_size, rewards,
                                  cfg.grpo.eta, guidance=cfg.grpo.guidance)
        total = sum(r.weight * scores[r.name] for r in cfg.rewards)
        per_prompt[name] = total.mean(axis=1)
        est = bootstrap_ci(total)
        result[name] = {"mean": est.mean, "ci_low": est.low, "ci_high": est.high, "prompts": len(prompts)}
    change = stats.bootstrap((per_prompt["first"], per_prompt["last"]), lambda a, b: np.mean(b) - np.mean(a),
                             n_resamples=2000, vectorized=False, random_state=0).confidence_interval
    result["change"] = {"mean": float(per_prompt["last"].mean() - per_prompt["first"].mean()),
                        "ci_low": float(change.low), "ci_high": float(change.high)}

    rows = [f"| base ({args.checkpoint}), untrained | {result['first']['mean']:.3f} | {result['last']['mean']:.3f} | "
            f"{result['change']['mean']:+.3f} [{result['change']['ci_low']:+.3f}, {result['change']['ci_high']:+.3f}] | - |"]
    result["runs"] = []
    for path in sorted(args.runs.glob("*-seed0.json")):
        run = json.loads(path.read_text())
        if Path(run.get("init_from") or "").name != base.name or run.get("iterations") != args.iterations:
            continue
        first, last = run["reward_first_window"], run["reward_last_window"]
        held = run["eval"]["rewards"]["total"]["difference"]
        result["runs"].append({"recipe": run["recipe"], "first": first, "last": last, "held_out": held})
        rows.append(f"| {run['recipe']} | {first:.3f} | {last:.3f} | {last - first:+.3f} | "
                    f"{held['mean']:+.3f} [{held['ci_low']:+.3f}, {held['ci_high']:+.3f}] |")
    table = "\n".join([
        f"| policy (seed {cfg.seed}, windows of {window} iterations x {n} prompts) | first window | last window | "
        "last - first | held-out change (paired) |",
        "|---|---|---|---|---|",
        *rows,
    ])
    publish(table, result, args.out, "prompt_windows")


if __name__ == "__main__":
    main()
