"""Does a digits checkpoint draw the digit its caption asks for? A classifier trained on the real digits judges.

    python benchmarks/digits_accuracy.py CHECKPOINT [--per-digit 20] [--steps 10] [--eta 1]

The judge (scikit-learn's MLPClassifier, one hidden layer, on the 8x8 scans of data.seed's training split only)
reads each generated image averaged down to 8x8 and turned back into ink. Two numbers come out of it: the fraction
of images classified as the digit their prompt named (chance 0.1; its ceiling is the classifier's accuracy on the
held-out real digits), and the Frechet distance between Gaussians fitted to the hidden-layer features of the
generated images and of the real training digits (an FID whose feature network knows digits; lower is better).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier

from learner import env  # noqa: F401  (offline, no telemetry)
from learner.config import DataConfig
from learner.data import build_source, digit_caption


def ink_8x8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] (dark ink on white) -> [B, 64] ink in 0..1 (load_digits' 0..16 scaled)."""
    grey = images.float().mean(dim=1, keepdim=True)
    return (1 - torch.nn.functional.adaptive_avg_pool2d(grey, 8)).flatten(1).numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr (S_a S_b)^(1/2) = tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): symmetric PSD throughout, so eigh is exact even when
    # dead ReLU units make a covariance singular (scipy's general sqrtm warns and loses accuracy there).
    w, v = linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def digit_prompts(per_digit: int) -> tuple[np.ndarray, list[str]]:
    """Labels 0..9, each `per_digit` times, and the training captions that ask for them."""
    labels = np.repeat(np.arange(10), per_digit)
    return labels, [digit_caption(k) for k in labels]


def hidden_features(clf: MLPClassifier, ink: np.ndarray) -> np.ndarray:
    """The hidden layer's ReLU activations (MLPClassifier keeps no forward hook, so one line by hand)."""
    return np.maximum(ink @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


@dataclass
class DigitJudge:
    clf: MLPClassifier
    real_features: np.ndarray
    ceiling: float  # accuracy on held-out real digits
    real_frechet: float  # Frechet distance of the held-out real digits to the training digits
    held_out: int  # how many real digits are held out

    @classmethod
    def fit(cls, data_seed: int = 0, hidden: int = 32) -> "DigitJudge":
        digits = load_digits()
        split = build_source(DataConfig(kind="digits", seed=data_seed), 8, 1)
        x = digits.data / 16.0
        clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=2000, random_state=0)
        clf.fit(x[split.train], digits.target[split.train])
        real = hidden_features(clf, x[split.train])
        return cls(clf, real, ceiling=float(clf.score(x[split.held], digits.target[split.held])),
                   real_frechet=frechet(hidden_features(clf, x[split.held]), real), held_out=len(split.held))

    def accuracy(self, images: torch.Tensor, labels: np.ndarray) -> float:
        return float((self.clf.predict(ink_8x8(images)) == labels).mean())

    def frechet(self, images: torch.Tensor) -> float:
        return frechet(hidden_features(self.clf, ink_8x8(images)), self.real_features)


def main() -> None:
    from proxmodel.generate import generate
    from proxmodel.model import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--per-digit", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eta", type=float, default=1.0, help="1 = the stochastic sampler, 0 = deterministic")
    parser.add_argument("--data-seed", type=int, default=0)
    args = parser.parse_args()

    judge = DigitJudge.fit(args.data_seed)
    labels, prompts = digit_prompts(args.per_digit)
    images = generate(load_model(args.checkpoint), prompts, args.steps, seed=0, eta=args.eta)
    print(json.dumps({"generated_accuracy": judge.accuracy(images, labels), "frechet": judge.frechet(images),
                      "classifier_on_held_out_real": judge.ceiling, "real_held_out_frechet": judge.real_frechet,
                      "samples": len(labels), "steps": args.steps, "eta": args.eta}))


if __name__ == "__main__":
    main()
