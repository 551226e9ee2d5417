"""The invariants of method.md sec. 4 for the prox samplers (hybrid and fully backward) as policies, and guidance."""

import math

import pytest
import torch
import torch.nn.functional as F

from proxmodel.model import prox_fn
from proxmodel.sampler import (gaussian_log_prob, half_step, hybrid_step, initial_state, sample_hybrid,
                               trajectory_log_probs)
from proxmodel.schedule import VPSchedule

G = 4


def _setup(model, prompt="a small red circle at the top left, on a white background"):
    tokens = model.tokenize([prompt] * G)
    with torch.no_grad():
        context = model.encode_text(tokens)
    c = model.cfg
    return tokens, context, (G, c.channels, c.image_size, c.image_size)


def standard_normal_prox(y, t, lam):
    """The exact prox of -lam log N(0, I): data N(0, I) stay N(0, I) under the VP process, so p_t = N(0, I)."""
    return y / (1 + lam.view(-1, *([1] * (y.dim() - 1))))


@pytest.mark.parametrize("variant,steps", [("hybrid", 2), ("hybrid", 5), ("backward", 10)])
def test_log_probs_are_the_gaussian_density_of_the_drawn_noise(tiny_model, variant, steps):
    tokens, context, shape = _setup(tiny_model)
    grid = VPSchedule().grid(steps)
    eta = 0.7
    # The untrained net diverges under the backward sampler (|y| ~ 1e4: float32 rounding dominates); the exact prox
    # of N(0, I) keeps the states O(1) so the check is about the log-prob bookkeeping.
    prox = prox_fn(tiny_model.eval(), context=context) if variant == "hybrid" else standard_normal_prox
    traj = sample_hybrid(prox, shape, grid, eta=eta, generator=torch.Generator().manual_seed(3), variant=variant)
    # Replay the generator: x_N, z_N, then z_{k-1} for k = N..2.
    gen = torch.Generator().manual_seed(3)
    torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    d = math.prod(shape[1:])
    for i, k in enumerate(range(steps, 1, -1)):
        z = torch.randn(shape, generator=gen)
        gamma = grid.gamma_at(k - 1)
        var = eta**2 * (gamma if variant == "hybrid" else gamma / (1 - gamma / 2) ** 2)  # docs/method.md sec. 3
        density = torch.distributions.Normal(0.0, math.sqrt(var)).log_prob(math.sqrt(var) * z)
        expected = density.flatten(1).sum(1) / d
        assert torch.allclose(traj.log_probs[:, i], expected, atol=1e-5), f"step k={k}"
    assert traj.log_probs.shape == (G, steps - 1)
    assert traj.states.shape == (G, steps, *shape[1:])


@pytest.mark.parametrize("variant,steps", [("hybrid", 4), ("backward", 10)])
def test_first_on_policy_ratio_is_exactly_one(tiny_model, variant, steps):
    """Rollout (eval, no grad) and learner recomputation (train, grad) give bit-identical log-probs."""
    tokens, context, shape = _setup(tiny_model)
    grid = VPSchedule().grid(steps)
    traj = sample_hybrid(prox_fn(tiny_model.eval(), context=context), shape, grid,
                         generator=torch.Generator().manual_seed(0), variant=variant)
    tiny_model.train()
    recomputed = trajectory_log_probs(prox_fn(tiny_model, tokens=tokens), traj.states, grid, variant=variant)
    assert recomputed.requires_grad
    ratio = torch.exp(recomputed - traj.log_probs)
    assert torch.equal(ratio, torch.ones_like(ratio))
    # ...and it is not a coincidence of a constant: a perturbed model moves the ratio.
    with torch.no_grad():
        next(tiny_model.unet.parameters()).add_(0.05)
    moved = trajectory_log_probs(prox_fn(tiny_model, tokens=tokens), traj.states, grid, variant=variant)
    with torch.no_grad():
        next(tiny_model.unet.parameters()).sub_(0.05)
    assert not torch.equal(moved, traj.log_probs)


def test_zero_noise_reproduces_the_deterministic_sampler(tiny_model):
    tokens, context, shape = _setup(tiny_model)
    grid = VPSchedule().grid(5)
    prox = prox_fn(tiny_model.eval(), context=context)
    det = sample_hybrid(prox, shape, grid, eta=0.0, generator=torch.Generator().manual_seed(1))
    assert det.log_probs is None
    # An independent writing of the deterministic hybrid sampler: x_{k-1} = prox((1 + gamma_k/2) x_k).
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        for k in range(5, 0, -1):
            gk = grid.gamma_at(k)
            x = prox((1 + gk / 2) * x, torch.full((G,), grid.t_at(k - 1)), torch.full((G,), gk))
    assert torch.allclose(det.images, x, atol=1e-6)
    # The stochastic sampler tends to it as the noise goes to zero.
    near = sample_hybrid(prox, shape, grid, eta=1e-6, generator=torch.Generator().manual_seed(1))
    far = sample_hybrid(prox, shape, grid, eta=0.5, generator=torch.Generator().manual_seed(1))
    assert (near.images - det.images).abs().max() < 1e-4
    assert (far.images - det.images).abs().max() > 1e-2


def test_a_recorded_action_is_scored_by_the_policy_density_written_from_method_md(tiny_model):
    """pi(y_{k-1} | y_k) = N((1 + gamma_{k-1}/2) prox(y_k; t_{k-1}, gamma_k), gamma_{k-1} I), mean over dimensions,
    for an arbitrary action (not one the step drew), from the prox called directly and torch's Normal."""
    tokens, context, shape = _setup(tiny_model)
    grid = VPSchedule().grid(3)
    prox = prox_fn(tiny_model.eval(), context=context)
    y, action = 2.0 * torch.randn(shape), torch.randn(shape)
    t1, t2 = 1 / 3, 2 / 3
    gamma_3 = 0.1 / 3 + 0.5 * 19.9 * (1.0 - t2 * t2)  # int_{t_2}^{1} beta
    gamma_2 = 0.1 / 3 + 0.5 * 19.9 * (t2 * t2 - t1 * t1)
    with torch.no_grad():
        scored = hybrid_step(prox, y, grid, 3, y_next=action)
        mean = (1 + gamma_2 / 2) * prox(y, torch.full((G,), t2), torch.full((G,), gamma_3))
        last = hybrid_step(prox, y, grid, 1)
    expected = torch.distributions.Normal(mean, math.sqrt(gamma_2)).log_prob(action).flatten(1).mean(1)
    assert torch.allclose(scored.log_prob, expected, atol=1e-5)
    assert torch.equal(scored.y, action)
    assert last.y is None and last.log_prob is None
    with pytest.raises(ValueError):
        hybrid_step(prox, y, grid, 3)  # stochastic without noise


def test_closed_form_kl_matches_the_log_prob_difference_in_expectation():
    from proxmodel.sampler import gaussian_kl, gaussian_log_prob

    gen = torch.Generator().manual_seed(0)
    mean_p, mean_q, var = torch.randn(1, 64, generator=gen), torch.randn(1, 64, generator=gen), 0.7
    samples = mean_p + math.sqrt(var) * torch.randn(20000, 64, generator=gen)
    monte_carlo = (gaussian_log_prob(samples, mean_p, var) - gaussian_log_prob(samples, mean_q, var)).mean()
    assert float(gaussian_kl(mean_p, mean_q, var)) == pytest.approx(float(monte_carlo), rel=0.02)
    assert float(gaussian_kl(mean_p, mean_p, var)) == 0.0


def test_a_block_log_prob_is_the_density_of_the_block_means_in_units_of_the_whole_state():
    """grpo.credit_block: the coarse coordinates (a block's sum / s, an orthonormal basis, built here by reshaping
    rather than pooling) are N(mean's, var) and their log-density is divided by all the state's dimensions. A
    missing 1/s on the sums, a mean over the blocks instead of over all dimensions, or a fine part left in would
    each change it; a block-mean-free change of the action must not."""
    gen = torch.Generator().manual_seed(3)
    b, c, h, s, var = 5, 3, 8, 4, 0.3
    mean = torch.randn(b, c, h, h, generator=gen)
    action = mean + math.sqrt(var) * torch.randn(b, c, h, h, generator=gen)
    coarse = (action - mean).reshape(b, c, h // s, s, h // s, s).sum(dim=(3, 5)) / s
    expected = torch.distributions.Normal(0.0, math.sqrt(var)).log_prob(coarse).flatten(1).sum(1) / (c * h * h)
    assert torch.allclose(gaussian_log_prob(action, mean, var, block=s), expected, atol=1e-6)
    assert torch.equal(gaussian_log_prob(action, mean, var, block=1), gaussian_log_prob(action, mean, var))
    fine = torch.randn(b, c, h, h, generator=gen)
    fine = fine - F.interpolate(F.avg_pool2d(fine, s), scale_factor=s)  # zero mean in every block
    assert torch.allclose(gaussian_log_prob(action + fine, mean, var, block=s),
                          gaussian_log_prob(action, mean, var, block=s), atol=1e-6)
    assert not torch.allclose(gaussian_log_prob(action + fine, mean, var), gaussian_log_prob(action, mean, var))
    with pytest.raises(ValueError, match="does not tile"):
        gaussian_log_prob(action, mean, var, block=3)


def test_block_credit_keeps_the_policy_gradient_of_a_coarse_reward_and_cuts_its_variance():
    """The score-function gradient E[R grad_theta log pi(a)] of a reward that sees block means only is the same
    with the block log-prob (the fine noise is independent of R and its score has mean 0), with a fraction of the
    variance: the reason for grpo.credit_block. Checked against the exact gradient of E[R] (a linear-Gaussian
    case with a closed form)."""
    gen = torch.Generator().manual_seed(0)
    c, h, s, var, n = 1, 8, 4, 0.5, 20000
    theta = torch.zeros(1, c, h, h, requires_grad=True)
    w = torch.randn(1, c, h // s, h // s, generator=gen)
    noise = math.sqrt(var) * torch.randn(n, c, h, h, generator=gen)
    action = (theta + noise).detach()
    reward = (F.avg_pool2d(action, s) * w).flatten(1).sum(1)  # E[R] = sum_b w_b mean_b(theta)
    exact = F.interpolate(w, scale_factor=s) / (s * s)
    estimates = {}
    for block in (1, s):
        lp = gaussian_log_prob(action, theta.expand(n, -1, -1, -1), var, block) * (c * h * h)  # the full sum
        per_sample = torch.autograd.grad((reward.detach() * lp).sum(), theta, retain_graph=True)[0] / n
        estimates[block] = per_sample
        per_row = torch.stack([torch.autograd.grad(reward[i].detach() * lp[i], theta, retain_graph=True)[0]
                               for i in range(0, n, 200)])
        estimates[(block, "var")] = float(per_row.var(0).mean())
    for block in (1, s):
        assert float((estimates[block] - exact).norm() / exact.norm()) < 0.15, block
    assert estimates[(s, "var")] < 0.2 * estimates[(1, "var")]


def test_backward_zero_noise_is_the_deterministic_backward_sampler():
    shape = (G, 3, 4, 4)
    grid = VPSchedule().grid(10)
    prox = standard_normal_prox  # an untrained net diverges under the backward sampler (see above)
    det = sample_hybrid(prox, shape, grid, eta=0.0, generator=torch.Generator().manual_seed(1), variant="backward")
    # Independently: x_{k-1} = prox(x_k / (1 - gamma_k/2); t_{k-1}, lam = gamma_k / (1 - gamma_k/2)).
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        for k in range(10, 0, -1):
            gk = grid.gamma_at(k)
            x = prox(x / (1 - gk / 2), torch.full((G,), grid.t_at(k - 1)), torch.full((G,), gk / (1 - gk / 2)))
    assert torch.allclose(det.images, x, atol=1e-6)
    near = sample_hybrid(prox, shape, grid, eta=1e-6, generator=torch.Generator().manual_seed(1), variant="backward")
    assert (near.images - det.images).abs().max() < 1e-4


def test_backward_sampler_refuses_large_steps_and_names_the_step_counts_that_work():
    schedule = VPSchedule()
    n_min = schedule.min_steps_below(2.0)
    assert float(schedule.grid(n_min).gamma.max()) < 2.0 <= float(schedule.grid(n_min - 1).gamma.max())
    assert n_min == 10  # gamma_N is about 1.9 at N = 10 with beta_max = 20
    with pytest.raises(ValueError, match=f"N >= {n_min}"):
        half_step(schedule.grid(5), 1, "backward")  # even a small step of a bad grid: the grid is refused whole
    gentle = VPSchedule(beta_max=5.0)  # gamma_N = 2.55 at N = 1, 1.89 at N = 2
    with pytest.raises(ValueError, match="N >= 2"):
        half_step(gentle.grid(1), 1, "backward")
    assert gentle.min_steps_below(2.0) == 2 and half_step(gentle.grid(2), 2, "backward").lam > 0


def test_guidance_one_is_the_plain_prox_and_other_scales_follow_the_formula(tiny_model):
    tokens, context, shape = _setup(tiny_model)
    tiny_model.eval()
    y, t, lam = torch.randn(shape), torch.full((G,), 0.3), torch.full((G,), 0.8)
    with torch.no_grad():
        plain = prox_fn(tiny_model, context=context)(y, t, lam)
        assert torch.equal(prox_fn(tiny_model, 1.0, context=context)(y, t, lam), plain)
        assert torch.equal(prox_fn(tiny_model, 1.0, tokens=tokens)(y, t, lam), plain)
        empty = prox_fn(tiny_model, tokens=tiny_model.tokenize([""] * G))(y, t, lam)
        w = 3.0
        guided = prox_fn(tiny_model, w, context=context)(y, t, lam)
        # prox = y - sqrt(lam) (eps_u + w (eps_c - eps_u)) = prox_u + w (prox_c - prox_u): from separate forwards.
        assert torch.allclose(guided, empty + w * (plain - empty), atol=1e-5)
        assert torch.allclose(prox_fn(tiny_model, w, tokens=tokens)(y, t, lam), guided, atol=1e-5)
        assert torch.allclose(prox_fn(tiny_model, 0.0, context=context)(y, t, lam), empty, atol=1e-5)
        assert (guided - plain).abs().max() > 1e-3


def test_backward_stochastic_early_steps_then_flow_follow_the_chain_written_out():
    """grpo.stochastic_steps with the fully backward sampler: K backward transitions, y = (x + sqrt(gamma) z) /
    (1 - gamma/2), then probability-flow steps y = (1 + gamma/2) x with lam = gamma/2, the first flow step's prox
    still taking the backward lam (its input was made by a backward half-step). Written out independently. Would
    catch a flow step that keeps the backward half-step's scale 1 / (1 - gamma/2) or lam (the flow and hybrid scales
    coincide, so the hybrid chain cannot show it)."""
    shape, steps, k_stochastic = (G, 3, 4, 4), 10, 3
    grid = VPSchedule().grid(steps)
    traj = sample_hybrid(standard_normal_prox, shape, grid, generator=torch.Generator().manual_seed(2),
                         variant="backward", stochastic_steps=k_stochastic)
    gen = torch.Generator().manual_seed(2)
    x, z = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    g = grid.gamma_at(steps)
    y = (x + math.sqrt(g) * z) / (1 - g / 2)
    states, backward = [y], True  # whether y_k was made by a backward half-step
    for k in range(steps, 0, -1):
        g = grid.gamma_at(k)
        lam = g / (1 - g / 2) if backward else g / 2
        x = standard_normal_prox(y, torch.full((G,), grid.t_at(k - 1)), torch.full((G,), lam))
        if k == 1:
            break
        backward = steps - (k - 1) <= k_stochastic  # transition steps - k makes y_{k-1}
        g = grid.gamma_at(k - 1)
        y = (x + math.sqrt(g) * torch.randn(shape, generator=gen)) / (1 - g / 2) if backward else (1 + g / 2) * x
        states.append(y)
    assert traj.log_probs.shape == (G, k_stochastic)
    assert torch.allclose(traj.states, torch.stack(states, dim=1), atol=1e-5)
    assert torch.allclose(traj.images, x, atol=1e-5)
