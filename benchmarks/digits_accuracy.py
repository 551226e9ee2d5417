"""Does a digits checkpoint draw the digit its caption asks for? A classifier trained on the real digits judges.

    python benchmarks/digits_accuracy.py CHECKPOINT [--per-digit 20] [--steps 10]

The classifier (scikit-learn logistic regression on the 8x8 scans, data.seed's training split only) reads each
generated image averaged down to 8x8 and turned back into ink; the score is the fraction classified as the digit
the prompt named (chance = 0.1). It also reports the classifier's accuracy on the held-out real digits, its ceiling.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from learner import env  # noqa: F401  (offline, no telemetry)
from learner.config import DataConfig
from learner.data import build_source
from learner.evaluation import generate
from proxmodel.model import load_model


def ink_8x8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] (dark ink on white) -> [B, 64] ink in 0..16, the scale of load_digits."""
    grey = images.float().mean(dim=1, keepdim=True)
    return ((1 - torch.nn.functional.adaptive_avg_pool2d(grey, 8)) * 16).flatten(1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--per-digit", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--data-seed", type=int, default=0)
    args = parser.parse_args()

    digits = load_digits()
    split = build_source(DataConfig(kind="digits", seed=args.data_seed), 8, 3)
    clf = LogisticRegression(max_iter=2000).fit(digits.data[split.train], digits.target[split.train])
    ceiling = clf.score(digits.data[split.held], digits.target[split.held])

    model = load_model(args.checkpoint)
    labels = [k for k in range(10) for _ in range(args.per_digit)]
    images = generate(model, [f"a handwritten digit {k}" for k in labels], args.steps, seed=0)
    accuracy = float((clf.predict(ink_8x8(images)) == np.array(labels)).mean())
    print(json.dumps({"generated_accuracy": accuracy, "classifier_on_held_out_real": ceiling,
                      "samples": len(labels), "steps": args.steps}))


if __name__ == "__main__":
    main()
