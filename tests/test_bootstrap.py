"""The held-out confidence intervals: they must cover the truth at their stated rate and see both noise sources."""

import numpy as np
import pytest

from learner.bootstrap import bootstrap_ci, bootstrap_stat


def test_the_95_percent_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    trials = 300
    for i in range(trials):
        prompt_effect = rng.normal(0.0, 1.0, size=(64, 1))  # prompts differ ...
        scores = 0.3 + prompt_effect + rng.normal(0.0, 0.5, size=(64, 2))  # ... and so do noise seeds
        est = bootstrap_ci(scores, resamples=500, seed=i)
        covered += est.low <= 0.3 <= est.high
        assert est.low <= est.mean <= est.high
    assert 0.9 <= covered / trials <= 0.99, covered / trials


def test_with_few_prompts_the_interval_still_covers_near_its_rate():
    """The plain percentile interval covers 0.79 at 4 prompts and 0.87 at 8 (its spread is the plug-in one, with
    normal tails); a held-out check judged on so few prompts then flags a change that is not there. The expanded
    interval holds 0.86 and 0.94 (Student-t and n - 1: more cannot be had from 4 distinct rows)."""
    rng = np.random.default_rng(3)
    for n, least in ((4, 0.84), (8, 0.91)):
        trials = 400
        covered = sum(est.low <= 0.0 <= est.high
                      for est in (bootstrap_ci(rng.normal(size=(n, 2)), resamples=1000, seed=i) for i in range(trials)))
        assert covered / trials >= least, (n, covered / trials)


def test_the_width_is_the_normal_theory_width_and_includes_seed_noise():
    rng = np.random.default_rng(1)
    prompts = rng.normal(size=(128, 1))
    for seed_noise in (0.01, 2.0):  # with 2 seeds, noise 2.0 triples the variance of a prompt's mean
        scores = prompts + rng.normal(0, seed_noise, size=(128, 2))
        est = bootstrap_ci(scores, resamples=4000)
        expected = 2 * 1.96 * scores.mean(axis=1).std() / np.sqrt(128)
        assert est.high - est.low == pytest.approx(expected, rel=0.12), seed_noise


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="prompts"):
        bootstrap_ci(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="prompts"):
        bootstrap_ci(np.zeros((2, 2, 2)))


def test_any_statistic_of_the_rows_gets_an_interval_that_covers_it():
    """A ratio of two per-prompt means (decision_time's 'undecided' share): covered at about the stated rate, and the
    mean as a statistic reproduces bootstrap_ci's interval exactly (both resample the same prompt rows)."""
    rng = np.random.default_rng(2)
    covered = 0
    trials = 200
    for i in range(trials):
        top = rng.gamma(2.0, 0.5, size=64)  # true mean 1.0
        bottom = rng.gamma(4.0, 0.5, size=64)  # true mean 2.0: the ratio of means is 0.5
        est = bootstrap_stat(lambda rows: top[rows].mean() / bottom[rows].mean(), 64, resamples=400, seed=i)
        covered += est.low <= 0.5 <= est.high
    assert 0.88 <= covered / trials <= 0.99, covered / trials
    scores = rng.normal(size=(50, 2))
    assert bootstrap_stat(lambda rows: scores.mean(axis=1)[rows].mean(), 50) == bootstrap_ci(scores)
    with pytest.raises(ValueError, match="zero prompts"):
        bootstrap_stat(lambda rows: 0.0, 0)


def test_the_point_estimate_is_the_mean_of_the_prompts_seed_averaged_scores():
    """The interval's centre is the data's mean, the same whatever the resampling: a bootstrap mean instead would move
    with the seed and the number of resamples. Would catch the centre taken from the draws."""
    scores = np.random.default_rng(4).gamma(1.0, 1.0, size=(12, 3))
    for seed, resamples in ((0, 200), (1, 50)):
        assert bootstrap_ci(scores, resamples=resamples, seed=seed).mean == pytest.approx(scores.mean(), abs=1e-15)


@pytest.mark.parametrize("n", [2, 4, 8, 128])
def test_the_expanded_quantile_is_students_t_with_the_unbiased_spread(n):
    """Hesterberg's expansion: the bootstrap distribution of a mean has the plug-in spread s sqrt((n - 1) / n) /
    sqrt(n) and normal tails; its quantile at expanded_alpha lies z(expanded_alpha) of those from the mean, which must
    be t_{n-1} unbiased standard errors, the Student-t interval. Would catch the factor inverted, the t taken with n
    degrees of freedom (too narrow at a few prompts) or the wrong tail of the normal."""
    from scipy import stats

    from learner.bootstrap import expanded_alpha

    alpha = expanded_alpha(n, 0.95)
    assert 0 < alpha <= 0.025
    assert stats.norm.isf(alpha) * np.sqrt((n - 1) / n) == pytest.approx(stats.t.isf(0.025, n - 1), rel=1e-9)


def test_the_logged_intervals_name_their_bounds_the_right_way_round():
    """ci_metrics is what MLflow shows for every held-out reward: the mean with ci_low below it and ci_high above,
    both those of bootstrap_ci. Would catch the two bounds swapped (every logged interval upside down)."""
    from learner.bootstrap import ci_metrics

    scores = np.random.default_rng(5).normal(size=(32, 2))
    est = bootstrap_ci(scores)
    out = ci_metrics("eval_reward", {"total": scores})
    assert out == {"eval_reward_total": est.mean, "eval_reward_total_ci_low": est.low,
                   "eval_reward_total_ci_high": est.high}
    assert out["eval_reward_total_ci_low"] < out["eval_reward_total"] < out["eval_reward_total_ci_high"]
