"""The score baseline: its model kind, samplers (Euler-Maruyama, ODE, DDIM), SDE log-probs and guidance."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from proxmodel.losses import make_score_pairs
from proxmodel.model import ProxT2I
from proxmodel.schedule import VPSchedule
from proxmodel.score import (
    DDIM_TRAIN_STEPS, ddim_scheduler, eps_fn, sample_ddim, sample_score, score_times, sde_step,
)

G = 3
SHAPE = (G, 2, 3, 3)


def standard_normal_eps(x, t):
    """Exact eps for data N(0, I): p_t = N(0, I), score -x, eps = -sqrt(1 - alpha_t) s."""
    alpha = VPSchedule().alpha(t.double()).float().view(-1, *([1] * (x.dim() - 1)))
    return (1 - alpha).sqrt() * x


@pytest.fixture(scope="module")
def score_model(tiny_model_config):
    torch.manual_seed(1)
    return ProxT2I(tiny_model_config.model_copy(update={"kind": "score"})).eval()


def test_ddim_scheduler_is_the_discrete_twin_of_the_vp_schedule():
    sched = ddim_scheduler()
    t = torch.arange(1, DDIM_TRAIN_STEPS + 1, dtype=torch.float64) / DDIM_TRAIN_STEPS
    assert torch.allclose(sched.alphas_cumprod.double(), VPSchedule().alpha(t), atol=1e-6)
    # diffusers' own linear betas with beta_min/T, beta_max/T are the same schedule only to first order.
    linear = DDIMScheduler(beta_start=0.1 / DDIM_TRAIN_STEPS, beta_end=20.0 / DDIM_TRAIN_STEPS)
    rel = (linear.alphas_cumprod.double() / VPSchedule().alpha(t) - 1).abs().max()
    assert 1e-3 < float(rel) < 0.1
    sched.set_timesteps(5)
    assert sched.timesteps.tolist() == [999, 799, 599, 399, 199]  # starts at t = 1, N network evaluations


def test_sde_log_probs_are_the_density_of_the_drawn_noise():
    eta, steps = 0.8, 4
    out = sample_score(standard_normal_eps, SHAPE, steps, eta=eta, generator=torch.Generator().manual_seed(5))
    times = score_times(steps).tolist()
    gen = torch.Generator().manual_seed(5)
    torch.randn(SHAPE, generator=gen)  # x_N
    d = math.prod(SHAPE[1:])
    total = torch.zeros(G)
    for i, (t, t_next) in enumerate(zip(times[:0:-1], times[-2::-1])):
        var = eta**2 * 0.1 * (t - t_next) + eta**2 * 19.9 * t * (t - t_next)  # eta^2 beta(t) (t - t_next)
        z = torch.randn(SHAPE, generator=gen)
        expected = torch.distributions.Normal(0.0, math.sqrt(var)).log_prob(math.sqrt(var) * z).flatten(1).sum(1) / d
        assert torch.allclose(out.log_probs[:, i], expected, atol=1e-5)
        total += expected
    assert torch.allclose(out.log_probs.sum(1), total, atol=1e-5)
    assert out.log_probs.shape == (G, steps - 1)


def test_sde_step_scores_what_it_drew_and_zero_noise_is_the_mean():
    x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    drawn = sde_step(standard_normal_eps, x, 0.6, 0.4, noise=noise)
    g = VPSchedule().beta(0.6) * 0.2
    # For N(0, I) data the score is -x, so the mean is (1 + g/2) x - g x = (1 - g/2) x, the variance g.
    assert torch.allclose(drawn.mean, (1 - g / 2) * x, atol=1e-5)
    action = torch.randn(SHAPE)  # an arbitrary recorded action, not the one drawn
    scored = sde_step(standard_normal_eps, x, 0.6, 0.4, x_next=action)
    expected = torch.distributions.Normal((1 - g / 2) * x, math.sqrt(g)).log_prob(action).flatten(1).mean(1)
    assert torch.allclose(scored.log_prob, expected, atol=1e-5)
    assert torch.equal(sde_step(standard_normal_eps, x, 0.6, 0.4, eta=0.0).x, drawn.mean)
    det = sample_score(standard_normal_eps, SHAPE, 6, eta=0.0, generator=torch.Generator().manual_seed(2))
    near = sample_score(standard_normal_eps, SHAPE, 6, eta=1e-7, generator=torch.Generator().manual_seed(2))
    assert det.log_probs is None and (near.images - det.images).abs().max() < 1e-4
    with pytest.raises(ValueError, match="noise"):
        sde_step(standard_normal_eps, x, 0.6, 0.4)


def test_samplers_reach_unit_variance_for_standard_normal_data():
    """With the exact eps of N(0, I) data every sampler must return N(0, I) samples at 50 steps."""
    shape = (4000, 2)
    for name, draw in {
        "sde": lambda: sample_score(standard_normal_eps, shape, 50, generator=torch.Generator().manual_seed(0)),
        "ode": lambda: sample_score(standard_normal_eps, shape, 50, method="ode", generator=torch.Generator().manual_seed(0)),
        "ddim": lambda: sample_ddim(standard_normal_eps, shape, 50, generator=torch.Generator().manual_seed(0)),
    }.items():
        x = draw().images
        # std of a sample variance of n unit normals is sqrt(2/n) ~ 0.022; allow the 50-step bias too.
        assert abs(float(x.var()) - 1) < 0.1 and abs(float(x.mean())) < 0.05, name


def test_score_model_ignores_lam_and_guidance_one_is_unguided(score_model):
    tokens = score_model.tokenize(["a big blue square"] * G)
    x, t = torch.randn(G, 3, 8, 8), torch.full((G,), 0.5)
    with torch.no_grad():
        assert torch.equal(score_model(x, t, torch.zeros(G), tokens=tokens), score_model(x, t, torch.ones(G), tokens=tokens))
        plain = eps_fn(score_model, tokens=tokens)(x, t)
        assert torch.equal(eps_fn(score_model, 1.0, tokens=tokens)(x, t), plain)
        empty = eps_fn(score_model, tokens=score_model.tokenize([""] * G))(x, t)
        guided = eps_fn(score_model, 2.5, tokens=tokens)(x, t)
        assert torch.allclose(guided, empty + 2.5 * (plain - empty), atol=1e-5)
        out = sample_ddim(eps_fn(score_model, 2.0, tokens=tokens), (G, 3, 8, 8), 3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.images).all()


def test_score_training_pairs_are_the_forward_process():
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1
    x_t, t, eps = make_score_pairs(x0, VPSchedule(), 1e-3, torch.Generator().manual_seed(0))
    alpha = VPSchedule().alpha(t).view(-1, 1, 1, 1)
    assert float(t.min()) >= 1e-3 and float(t.max()) <= 1.0
    assert torch.allclose(x_t, alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps)
    assert abs(float(eps.std()) - 1) < 0.05


def test_score_pairs_draw_t_uniformly_above_t_min():
    """pretrain.score_t_min: the score baseline is trained on t ~ U(t_min, 1) only (below it sqrt(1 - alpha_t) -> 0
    and the eps target is unlearnable), with x_t = sqrt(alpha_t) x0 + sqrt(1 - alpha_t) eps. Would catch t_min
    ignored (t ~ U(0, 1))."""
    x0 = torch.rand(4000, 1, 2, 2) * 2 - 1
    x_t, t, eps = make_score_pairs(x0, VPSchedule(), 0.3, torch.Generator().manual_seed(0))
    assert float(t.min()) >= 0.3 and float(t.max()) < 1.0
    assert float(t.mean()) == pytest.approx(0.65, abs=0.01) and float(t.std()) == pytest.approx(0.7 / 12**0.5, abs=0.01)
    alpha = VPSchedule().alpha(t).view(-1, 1, 1, 1)
    assert torch.allclose(x_t, alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps, atol=1e-6)
