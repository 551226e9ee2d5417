"""Which of the strict verifier's thresholds a model's samples fail: the verifier's score with each threshold alone,
with all, and with all but one, on the held-out prompts.

    python benchmarks/strict_failures.py [--init builtin:scenes-minilm-bind3 PATH ...] [--names base ...] [--prompts 96]

The strict setting (rewards/compositional.py STRICT) differs from the lenient one in three thresholds: the purity of
an object's blob (0.9 vs 0.75), the overlap with its shape's template (0.7 vs 0.6) and a colour tolerance (0.2 RGB:
farther pixels are no colour's and count against the blob's purity). Knowing which one a model fails says what a
reward must teach it (the dense verifier's `tolerance` came from this table). Prints a table of means with 95%
bootstrap intervals over prompts and writes it with the scores to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from learner import env  # noqa: E402,F401  (offline, no telemetry)
from learner.bootstrap import bootstrap_ci  # noqa: E402
from rewards.compositional import MIN_PURITY, MIN_SHAPE_IOU, STRICT, Thresholds, verify  # noqa: E402
from rewards.scenes import parse_caption  # noqa: E402

SETTINGS = {
    "lenient": Thresholds(),
    "purity only": Thresholds(purity=STRICT.purity),
    "shape only": Thresholds(shape_iou=STRICT.shape_iou),
    "tolerance only": Thresholds(tolerance=STRICT.tolerance),
    "strict": STRICT,
    "strict but purity": Thresholds(MIN_PURITY, STRICT.shape_iou, STRICT.tolerance),
    "strict but shape": Thresholds(STRICT.purity, MIN_SHAPE_IOU, STRICT.tolerance),
    "strict but tolerance": Thresholds(STRICT.purity, STRICT.shape_iou, None),
}


def verdicts(images: np.ndarray, captions: list[str]) -> dict[str, np.ndarray]:
    """{setting: the verifier's score of each image [n]} for images [n, 3, H, W] in [0, 1]."""
    scenes = [parse_caption(c) for c in captions]
    return {name: np.array([verify(im, sc, t) for im, sc in zip(images, scenes)]) for name, t in SETTINGS.items()}


def table(results: dict[str, dict[str, np.ndarray]], names: list[str], what: str) -> str:
    """Markdown: one row per setting, one column per model (`names` in the order of `results`)."""
    lines = [f"{what}: the verifier's mean score per setting, 95% bootstrap intervals over prompts", "",
             "| setting | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for name in SETTINGS:
        lines.append(f"| {name} | " + " | ".join(str(bootstrap_ci(scores[name])) for scores in results.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", nargs="+", default=["builtin:scenes-minilm-bind3"],
                        help="checkpoint folders or builtin:NAME (e.g. a GRPO run's exported checkpoint)")
    parser.add_argument("--prompts", type=int, default=96, help="held-out prompts (GRPO's held-out set, seed 0)")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per prompt")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--names", nargs="+", default=None, help="the table's column names, one per --init")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "strict_failures")
    args = parser.parse_args()
    if args.names is not None and len(args.names) != len(args.init):
        parser.error(f"--names takes one name per --init: {len(args.init)} inits, {len(args.names)} names")

    import torch

    from learner.config import load_config
    from learner.main import resolve_checkpoint
    from learner.prompts import prompt_source
    from proxmodel.generate import generate
    from proxmodel.model import load_model

    torch.set_grad_enabled(False)
    prompts = prompt_source(load_config(None, ["seed=0"])).held_out(args.prompts)
    results = {}
    for init in args.init:
        model = load_model(resolve_checkpoint(init))
        scores = {name: np.zeros((len(prompts), args.seeds)) for name in SETTINGS}
        for s in range(args.seeds):  # other noise than the held-out evaluation's and the tilt bound's
            for name, v in verdicts(generate(model, prompts, args.steps, 20_000 + s).numpy(), prompts).items():
                scores[name][:, s] = v
        results[init] = scores
        print(f"sampled {init}", file=sys.stderr, flush=True)
    text = table(results, args.names or args.init, f"{len(prompts)} held-out prompts x {args.seeds} noise seeds "
                 f"(stochastic hybrid, {args.steps} steps)")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "scores.json").write_text(json.dumps(
        {"prompts": prompts, "layout": "[prompt][noise seed]",
         "names": args.names or args.init,
         "scores": {i: {n: m.tolist() for n, m in s.items()} for i, s in results.items()}}) + "\n")


if __name__ == "__main__":
    main()
