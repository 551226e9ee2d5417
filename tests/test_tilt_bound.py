"""The KL-optimal bound of benchmarks/tilt_bound.py: best-of-k from order statistics and the reward-tilted reweighting.

Its numbers back a claim in docs/results.md (how few nats the base's own samples need for +0.15), so the estimators are
checked against brute force and closed forms: a wrong order-statistic weight or a KL with the wrong normaliser would
change that claim silently.
"""

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # an installed package owns the name
from tilt_bound import best_of_k, gain_at_kl, kl_for_gain, tilt  # noqa: E402

BETAS = np.geomspace(10.0, 1e-3, 2000)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 6])
def test_best_of_k_is_the_mean_max_over_every_k_subset(k):
    rewards = np.array([[0.0, 0.5, 0.5, 0.2, 1.0, 0.0], [0.3, 0.1, 0.9, 0.9, 0.0, 0.4]])  # ties included
    brute = [np.mean([max(row[list(s)]) for s in itertools.combinations(range(6), k)]) for row in rewards]
    np.testing.assert_allclose(best_of_k(rewards, k), brute, rtol=1e-12)


def test_the_tilt_runs_from_the_base_at_large_beta_to_the_best_sample_at_small_beta():
    rewards = np.random.default_rng(0).random((5, 16))
    mean, kl = tilt(rewards, 1e6)
    np.testing.assert_allclose(mean, rewards.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(kl, 0.0, atol=1e-9)
    mean, kl = tilt(rewards, 1e-6)  # all weight on each row's unique best
    np.testing.assert_allclose(mean, rewards.max(axis=1))
    np.testing.assert_allclose(kl, math.log(16), rtol=1e-9)
    kls = [tilt(rewards, b)[1].mean() for b in BETAS]
    assert np.all(np.diff(kls) >= -1e-12), "a colder tilt must never be closer to the base"


def test_the_kl_for_a_gain_matches_the_closed_form_of_one_hit_among_n():
    # each prompt: one sample scores 1, n - 1 score 0; a tilt putting mass p on the hit has reward p and
    # KL = p log(p n) + (1 - p) log((1 - p) n / (n - 1))
    n, gain = 8, 0.3
    rewards = np.zeros((4, n))
    rewards[:, 0] = 1.0
    p = 1.0 / n + gain
    exact = p * math.log(p * n) + (1 - p) * math.log((1 - p) * n / (n - 1))
    assert kl_for_gain(rewards, gain, BETAS) == pytest.approx(exact, rel=1e-2)
    assert gain_at_kl(rewards, exact, BETAS) == pytest.approx(gain, abs=2e-3)
    # a gain beyond the best sample is unreachable by any reweighting: reported at the cap log n
    assert kl_for_gain(rewards, 1.0, BETAS) == pytest.approx(math.log(n))


def test_a_tilt_by_another_score_gains_only_what_that_score_says_about_the_reward():
    rng = np.random.default_rng(1)
    rewards = rng.random((6, 16))
    budget = 0.5
    own = gain_at_kl(rewards, budget, BETAS)
    assert own > 0.05
    # tilting by 2r is tilting by r at half the beta: the same KL frontier, and the gain is the reward's, not 2x
    assert gain_at_kl(rewards, budget, BETAS, by=2 * rewards) == pytest.approx(own, abs=2e-3)
    # a score that is constant within each prompt (an image-agnostic look) leaves the weights uniform: no gain
    assert gain_at_kl(rewards, budget, BETAS, by=np.repeat(rng.random((6, 1)), 16, axis=1)) == pytest.approx(0, abs=1e-9)
    # a score independent of the reward buys less at the same KL than the reward itself
    assert gain_at_kl(rewards, budget, BETAS, by=rng.random((6, 16))) < own - 0.02


def test_the_split_change_puts_a_look_every_caption_pays_for_in_m_and_a_caption_fit_in_r_minus_m():
    from tilt_bound import split_change

    rng = np.random.default_rng(2)
    r = rng.random((40, 8))
    before = {"compositional": r, "contrastive": 0.3 * r, "compositional_strict": 0.5 * r}
    # a caption-blind gain: the image earns 0.1 more under its own caption and under every other one alike
    blind = {"compositional": r + 0.1, "contrastive": 0.3 * r, "compositional_strict": 0.5 * r}
    change = split_change(before, blind)
    assert change["verifier"].mean == pytest.approx(0.1)
    assert change["any caption"].mean == pytest.approx(0.1) and change["caption-specific"].mean == pytest.approx(0)
    # a caption fit: more under its own caption only, so the contrast with other captions rises by as much
    fit = {"compositional": r + 0.1, "contrastive": 0.3 * r + 0.1, "compositional_strict": 0.5 * r}
    change = split_change(before, fit)
    assert change["any caption"].mean == pytest.approx(0) and change["caption-specific"].mean == pytest.approx(0.1)
    assert change["caption-specific"].low > 0.09  # a constant shift has no spread
    # tilted by the strict setting (--reward compositional_strict): its column is the verifier, the lenient the check
    change = split_change(before, {**before, "compositional_strict": 0.5 * r + 0.2}, "compositional_strict",
                          "compositional")
    assert change["verifier"].mean == pytest.approx(0.2) and change["check"].mean == pytest.approx(0)
    assert change["any caption"].mean == pytest.approx(0.2)  # the contrastive score did not move: any caption pays


def test_time_to_a_target_counts_a_seed_that_never_reaches_it_as_censored():
    """benchmarks/grpo_reward_vs_time.py: the target is the mean of score-GRPO's finals, which some of its own seeds
    end below; requiring every seed to reach it left the column '-' and the goal's verdict unprinted. Would catch
    that, and a never-reaching seed read as reaching at once."""
    from grpo_reward_vs_time import median_reach

    assert median_reach([(10.0, 100.0), None, (30.0, 300.0)]) == (30.0, 300.0)
    assert median_reach([(10.0, 100.0), None, None]) == (np.inf, np.inf)
    assert median_reach([(0.0, 0.0)] * 3) == (0.0, 0.0)
