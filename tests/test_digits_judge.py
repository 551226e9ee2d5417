"""The digits benchmark's judge: the Frechet distance is the closed form it claims, and real digits pass through
the same image path the pretraining data takes and come out classified and close (so a bad generator, not the
conversion, is what a low score means)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from learner.config import DataConfig
from learner.data import build_source

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from digits_accuracy import DigitJudge, frechet  # noqa: E402


def test_frechet_is_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    shift = np.array([1.0, -2.0, 0.5])
    assert frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet(a, a + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)
    # N(0, I) vs N(0, 4 I) in 3 dims: tr(I + 4I - 2 * 2I) = 3.
    assert frechet(a, 2 * rng.normal(size=(4000, 3))) == pytest.approx(3.0, rel=0.1)


@pytest.fixture(scope="module")
def judge():
    return DigitJudge.fit(data_seed=0)


def test_real_digits_through_the_training_image_path_are_read_correctly(judge):
    source = build_source(DataConfig(kind="digits", seed=0), 16, 3)
    held = [int(i) for i in source.held]
    images = torch.stack([source.loaders[i]() for i in held])  # what the model is trained on, in [-1, 1]
    images = (images + 1) / 2
    labels = load_digits().target[held]
    assert judge.ceiling > 0.9
    assert judge.accuracy(images, labels) > 0.85
    noise = torch.rand_like(images)
    assert judge.frechet(images) < 0.2 * judge.frechet(noise)
    assert judge.accuracy(noise, labels) < 0.3
