import math

import pytest
import torch
from scipy.integrate import quad

from proxmodel.schedule import VPSchedule, sample_train_pairs


@pytest.mark.parametrize("steps", [1, 5, 10, 37, 1000])
def test_gamma_matches_numerical_integration(steps):
    sched = VPSchedule()
    grid = sched.grid(steps)
    for k in range(1, steps + 1, max(1, steps // 7)):
        a, b = grid.t_at(k - 1), grid.t_at(k)
        numeric, _ = quad(lambda s: sched.beta(s), a, b)
        assert grid.gamma_at(k) == pytest.approx(numeric, rel=1e-12, abs=1e-14)
    assert float(grid.gamma.sum()) == pytest.approx(sched.beta_min + 0.5 * (sched.beta_max - sched.beta_min))


def test_gamma_matches_the_papers_anchor_values():
    # With beta_max = 20, gamma_N is about 3.6 for N = 5 and 1.9 for N = 10.
    sched = VPSchedule()
    assert sched.grid(5).gamma_at(5) == pytest.approx(3.602, abs=1e-9)
    assert sched.grid(10).gamma_at(10) == pytest.approx(1.9005, abs=1e-9)


def test_alpha_is_exp_of_minus_the_beta_integral():
    sched = VPSchedule()
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    expected = [math.exp(-quad(sched.beta, 0, float(x))[0]) for x in t]
    assert torch.allclose(sched.alpha(t), torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


def test_training_pairs_are_exactly_the_sampler_queries():
    sched = VPSchedule()
    gen = torch.Generator().manual_seed(0)
    t, lam = sample_train_pairs(sched, [5, 10], 4000, gen)
    queried = set()
    for n in (5, 10):
        g = sched.grid(n)
        queried |= {(round(g.t_at(k - 1), 6), round(g.gamma_at(k), 5)) for k in range(1, n + 1)}
    drawn = {(round(float(a), 6), round(float(b), 5)) for a, b in zip(t, lam)}
    assert drawn <= queried
    assert len(drawn) == len(queried)  # every query is trained
    with pytest.raises(ValueError):
        sched.grid(0)


def test_backward_training_pairs_are_exactly_what_the_backward_sampler_queries():
    from proxmodel.sampler import half_step

    sched = VPSchedule()
    t, lam = sample_train_pairs(sched, [5, 10, 20], 4000, torch.Generator().manual_seed(0), ("hybrid", "backward"))
    queried = {(round(g.t_at(k - 1), 6), round(half_step(g, k, v).lam, 4))
               for n, v in [(5, "hybrid"), (10, "hybrid"), (20, "hybrid"), (10, "backward"), (20, "backward")]
               for g in [sched.grid(n)] for k in range(1, n + 1)}
    drawn = set(zip(t.double().numpy().round(6).tolist(), lam.double().numpy().round(4).tolist()))
    assert drawn == queried  # every drawn pair is a query of some sampler, and every query is trained


def test_flow_training_pairs_are_exactly_what_the_hybrid_and_flow_samplers_query():
    """The default pretraining variants [hybrid, flow]: the flow sampler (and GRPO's probability-flow steps after
    stochastic_steps) asks for lam = gamma / 2, which must be drawn, and nothing else."""
    from proxmodel.sampler import half_step

    sched = VPSchedule()
    t, lam = sample_train_pairs(sched, [5, 10], 4000, torch.Generator().manual_seed(0), ("hybrid", "flow"))
    queried = torch.tensor([(g.t_at(k - 1), half_step(g, k, v).lam) for n in (5, 10) for v in ("hybrid", "flow")
                            for g in [sched.grid(n)] for k in range(1, n + 1)], dtype=torch.float64)
    drawn = torch.stack([t, lam], dim=1).double().unique(dim=0)
    close = ((drawn[:, None, :] - queried[None, :, :]).abs() <= 1e-6 * (1 + queried.abs())).all(dim=-1)
    assert bool(close.any(dim=1).all()), drawn[~close.any(dim=1)]  # every drawn pair is a sampler's query
    assert bool(close.any(dim=0).all()), queried[~close.any(dim=0)]  # and every query is trained


def test_a_grid_stitched_from_trained_grids_queries_only_trained_pairs():
    """grid_at: coarse steps where nothing is decided (benchmarks/calibration.py --grids) ask the prox only the
    (t, lam) pairs pretraining draws for step_candidates [5, 10]; its gammas are the integrals over its own steps."""
    sched = VPSchedule()
    grid = sched.grid_at([0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0])
    assert grid.steps == 8
    for k in range(1, 9):
        assert grid.gamma_at(k) == pytest.approx(quad(sched.beta, grid.t_at(k - 1), grid.t_at(k))[0], rel=1e-12)
    t, lam = sample_train_pairs(sched, [5, 10], 4000, torch.Generator().manual_seed(0))
    trained = {(round(float(a), 6), round(float(b), 5)) for a, b in zip(t, lam)}
    assert {(round(grid.t_at(k - 1), 6), round(grid.gamma_at(k), 5)) for k in range(1, 9)} <= trained
    assert torch.equal(sched.grid_at(torch.linspace(0, 1, 11, dtype=torch.float64)).gamma, sched.grid(10).gamma)
    for bad in ([0.0, 0.5, 0.5, 1.0], [0.1, 1.0], [0.0, 0.9], [1.0]):
        with pytest.raises(ValueError, match="rise strictly from 0 to 1"):
            sched.grid_at(bad)


def test_step_counts_are_drawn_with_weights_n_to_the_one_third():
    """method.md sec. 5: N ~ candidates with weights N^(1/3). A pair shows its grid in its lam (every 1000-step gamma
    is below 0.03, every 5-step one above 0.4), so the share of 1000-step pairs must be
    1000^(1/3) / (5^(1/3) + 1000^(1/3)) = 0.854. Would catch uniform weights (0.5), weights N (0.995) or sqrt(N)
    (0.934): the few-step grids the sampler uses would be trained on a different share of the pairs."""
    t, lam = sample_train_pairs(VPSchedule(), [5, 1000], 20000, torch.Generator().manual_seed(0))
    assert bool(((lam < 0.03) | (lam > 0.4)).all())
    expected = 1000 ** (1 / 3) / (5 ** (1 / 3) + 1000 ** (1 / 3))
    assert float((lam < 0.03).double().mean()) == pytest.approx(expected, abs=0.015)  # 6 standard errors
