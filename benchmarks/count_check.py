"""Does the object-count check catch a policy that hedges with extra objects? Checkpoints against the first, paired.

    python benchmarks/count_check.py base=builtin:scenes-minilm trained=<run>/checkpoint [...] [--out DIR]

Each checkpoint samples the GRPO evaluation's held-out prompts (128 x 2 noise seeds, 10 stochastic steps) and is
scored by the trained verifier, the strict check and the count check (`compositional_count`: as many objects as the
caption states); every later checkpoint is compared with the first on the same prompts and noise (the paired
difference with its 95% bootstrap interval over prompts). Also the mean number of objects per image against the
stated number. Prints a markdown table, writes it and a JSON to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from report import publish  # a sibling script (see report.py)

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ("compositional", "compositional_strict", "compositional_count")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="name=checkpoint (folder or builtin:NAME); the first is the base")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "count_check")
    args = parser.parse_args()

    from learner.bootstrap import bootstrap_ci
    from learner.config import load_config
    from learner.evaluation import reward_matrix
    from learner.main import resolve_checkpoint
    from learner.prompts import prompt_source
    from proxmodel.model import load_model
    from rewards import build
    from rewards.compositional import count_objects
    from rewards.scenes import parse_caption

    cfg = load_config(ROOT / "configs" / "default.yaml")
    prompts = prompt_source(cfg).held_out(args.prompts)
    rewards = {name: build(name) for name in CHECKS}
    stated = np.mean([len(parse_caption(p).objects) for p in prompts])
    rows, base = [], None
    for spec in args.models:
        name, _, ref = spec.partition("=")
        model = load_model(resolve_checkpoint(ref)).eval()
        images, scores = reward_matrix(model, prompts, cfg.grpo.steps, cfg.seed, args.seeds, rewards,
                                       cfg.grpo.eta, guidance=cfg.grpo.guidance)
        objects = float(np.mean([count_objects(im) for im in images.float().clamp(0, 1).cpu().numpy()]))
        row = {"model": name, "checkpoint": ref, "objects_per_image": objects, "stated_per_image": float(stated)}
        for check, matrix in scores.items():
            est = bootstrap_ci(matrix)
            row[check] = {"mean": est.mean, "ci_low": est.low, "ci_high": est.high}
            if base is not None:
                diff = bootstrap_ci(matrix - base[check])
                row[check]["difference"] = {"mean": diff.mean, "ci_low": diff.low, "ci_high": diff.high}
        base = base or scores
        rows.append(row)
        print(name, {c: round(row[c]["mean"], 3) for c in CHECKS}, f"objects {objects:.2f}", flush=True)

    def cell(row: dict, check: str) -> str:
        c = row[check]
        text = f"{c['mean']:.3f}"
        if "difference" in c:
            d = c["difference"]
            text += f" ({d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}])"
        return text

    lines = ["| model | verifier (change) | strict check (change) | count check (change) | objects per image |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {' | '.join(cell(r, c) for c in CHECKS)} | {r['objects_per_image']:.2f} "
              f"(stated {r['stated_per_image']:.2f}) |" for r in rows]
    publish("\n".join(lines), rows, args.out, "count_check")


if __name__ == "__main__":
    main()
