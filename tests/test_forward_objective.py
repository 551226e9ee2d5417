"""The forward objective (learner/forward_objective.py): no self-distillation without signal, the right direction
with it, and the closed-form optimum of one policy-improvement step on Gaussian data."""

import math

import pytest
import torch

from learner.forward_objective import ForwardBatch, forward_loss, optimality, split_loss


def test_optimality_maps_advantages_to_probabilities():
    r = optimality(torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0]), adv_scale=1.0)
    assert torch.equal(r, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


def test_without_signal_the_sampling_policy_is_a_stationary_point():
    """r = 1/2 everywhere: the gradient at e = e_old vanishes, so the sampler's biases (present in any own sample)
    are not trained back into the model; a plain pretraining loss on own samples would pull e to xi."""
    eps_old, xi = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    eps = eps_old.clone().requires_grad_(True)
    split_loss(eps, eps_old, xi, torch.full((8,), 0.5), beta=1.0).backward()
    assert eps.grad.abs().max() < 1e-7
    # with signal, the descent direction is (2r - 1)(xi - e_old) per sample, exactly
    r = torch.tensor([1.0, 0.0, 0.75, 0.5, 0.25, 1.0, 0.0, 0.6])
    eps.grad = None
    split_loss(eps, eps_old, xi, r, beta=0.5).backward()
    direction = ((2 * r - 1).view(-1, 1, 1, 1) * (xi - eps_old))
    expected = -2 * 0.5 * direction / (3 * 4 * 4) / 8  # d/de of the mean over samples and dimensions
    assert torch.allclose(eps.grad, expected, atol=1e-7)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_the_minimiser_is_the_advantage_weighted_residual_over_beta(beta):
    eps_old, xi = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    r = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3])
    optimum = eps_old + ((2 * r - 1).view(-1, 1, 1, 1) * (xi - eps_old)) / beta
    eps = optimum.clone().requires_grad_(True)
    split_loss(eps, eps_old, xi, r, beta).backward()
    assert eps.grad.abs().max() < 1e-6


class LinearEps(torch.nn.Module):
    """eps(y) = a y + b: the family that holds the exact eps of 1-D Gaussian data."""

    def __init__(self, a: float = 0.0, b: float = 0.0):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(a)), torch.nn.Parameter(torch.tensor(b))

    def forward(self, y, t, lam, tokens=None):
        return self.a * y + self.b


@pytest.mark.parametrize("sign", [1.0, -1.0, 0.0])
def test_one_improvement_step_on_gaussian_data_moves_towards_the_rewarded_side(sign):
    """Samples x ~ N(0, 1) drawn by the exact model (eps_old: the exact eps at t = 0, lam = gamma of a 1-step grid),
    reward sign * x. Trained to convergence on one batch, the linear eps must reach the least-squares fit of the
    closed-form optimum e_old + (2r - 1)(xi - e_old) / beta (computed here apart from the code), which shifts b
    below 0 when larger x is rewarded (the tilted mean is positive), above 0 when smaller, and not at all without
    a reward."""
    torch.manual_seed(0)
    n, beta = 20_000, 1.0
    lam = 0.1 + 0.5 * 19.9  # int_0^1 beta: the single step's gamma
    a0 = math.sqrt(lam) / (1 + lam)
    x0 = torch.randn(n, 1)
    adv = (sign * x0 - (sign * x0).mean()) / ((sign * x0).std() + 1e-4)
    sampler = LinearEps(a0, 0.0)
    batch = ForwardBatch.build(sampler, x0, None, adv.view(n), step_candidates=[1], variants=("hybrid",),
                               adv_scale=1.0, generator=torch.Generator().manual_seed(1))
    r = (0.5 + 0.5 * adv.view(n).clamp(-1, 1)).view(n, 1)
    target = batch.eps_old + (2 * r - 1) * (batch.xi - batch.eps_old) / beta
    design = torch.cat([batch.y, torch.ones(n, 1)], dim=1)
    a_star, b_star = torch.linalg.lstsq(design.double(), target.double()).solution.view(2).tolist()
    model = LinearEps(a0, 0.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(400):
        loss, _ = forward_loss(model, batch, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.a.item() == pytest.approx(a_star, abs=2e-3) and model.b.item() == pytest.approx(b_star, abs=2e-3)
    if sign == 0.0:
        assert abs(b_star) < 1e-6
    else:
        assert sign * b_star < -0.02


def test_the_conditional_target_keeps_the_improvement_step_and_removes_its_noise():
    """The improvement step's least-squares fit (as above: reward x, here on a 5- and 10-step grid so the noise
    splits) over independent pair draws: with target=conditional its mean is the noise target's (the same
    minimiser), and the per-pair noise around the fit, which is what each gradient carries, is far smaller. Would
    catch a conditional target with another mean (the fits would disagree) or one that is still the drawn noise."""
    torch.manual_seed(0)
    n = 4000
    x0 = torch.randn(n, 1).sign()  # two-point data: what x0 is shows through the noise, how the noise split does not
    adv = (x0 - x0.mean()) / x0.std()
    r = (0.5 + 0.5 * adv.view(n).clamp(-1, 1)).view(n, 1)
    fits, noise_left = {"noise": [], "conditional": []}, {"noise": [], "conditional": []}
    for seed in range(12):
        for target in fits:
            batch = ForwardBatch.build(LinearEps(0.3, 0.0), x0, None, adv.view(n), step_candidates=[5, 10],
                                       variants=("hybrid",), adv_scale=1.0,
                                       generator=torch.Generator().manual_seed(seed), target=target)
            tilted = (batch.eps_old + (2 * r - 1) * (batch.xi - batch.eps_old)).double()
            design = torch.cat([batch.y, torch.ones(n, 1)], dim=1).double()
            fit = torch.linalg.lstsq(design, tilted).solution
            fits[target].append(fit.view(2))
            noise_left[target].append(float((tilted - design @ fit).pow(2).mean()))
    noise, conditional = (torch.stack(f) for f in fits.values())
    assert torch.allclose(noise.mean(0), conditional.mean(0), atol=3 * float(noise.std(0).max()) / 12**0.5)
    assert sum(noise_left["conditional"]) < 0.5 * sum(noise_left["noise"])


def test_the_anchor_pulls_towards_the_reference_on_the_same_inputs():
    x0 = torch.randn(64, 1)
    model, reference = LinearEps(), LinearEps(0.0, 0.5)
    batch = ForwardBatch.build(model, x0, None, torch.zeros(64), step_candidates=[5], variants=("hybrid",),
                               adv_scale=1.0, generator=torch.Generator().manual_seed(0))
    plain, _ = forward_loss(model, batch, 1.0)
    anchored, stats = forward_loss(model, batch, 1.0, reference=reference, anchor=2.0)
    assert float(stats["anchor_mse"]) == pytest.approx(0.25)  # (0 - 0.5)^2 on the same pairs
    assert anchored.item() == pytest.approx(plain.item() + 0.5)


def test_the_default_scale_keeps_every_group_balanced_even_with_one_success():
    """With s = sqrt(G - 1) (the largest |A| of group-std advantages) nothing is clipped and (2r - 1) sums to 0 in
    every group; clipping at s = 1 tilts a one-success group towards pushing away from its own samples."""
    from learner.policy_loss import group_advantages

    g = 8
    rewards = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 1, 1, 0.25, 0], [0, 0, 0, 0, 0, 0, 0.1, 0.3]])
    adv = group_advantages(rewards, eps=1e-4)
    balanced = 2 * optimality(adv, math.sqrt(g - 1)) - 1
    assert balanced.abs().max() <= 1 and torch.allclose(balanced.sum(dim=1), torch.zeros(3), atol=1e-4)
    clipped = 2 * optimality(adv, 1.0) - 1
    assert float(clipped[0].sum()) < -1.0  # the failure mode the default avoids


def test_without_negatives_only_better_samples_move_the_model():
    """forward_negatives=false: below-average samples get r = 1/2, so at e = e_old the gradient is the positive
    samples' pull alone (a bug keeping their push, or dropping the pull, changes it)."""
    adv = torch.tensor([2.0, -0.5, -0.5, -1.0])
    r = optimality(adv, adv_scale=2.0, negatives=False)
    assert torch.equal(r, torch.tensor([1.0, 0.5, 0.5, 0.5]))
    eps_old, xi = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    eps = eps_old.clone().requires_grad_(True)
    split_loss(eps, eps_old, xi, r, beta=1.0).backward()
    assert eps.grad[1:].abs().max() < 1e-7
    assert torch.allclose(eps.grad[0], -2 * (xi[0] - eps_old[0]) / 4 / 4, atol=1e-7)


def test_tied_pairs_cancel_what_a_group_has_in_common():
    """tie = G: a group's images share (t, lam) and noises, so for a group of identical images the advantage-
    weighted gradient is exactly 0 (sum (2r - 1) = 0); with their own pairs it is pure noise, not 0. Groups
    differ from each other."""
    from proxmodel.losses import make_training_pairs
    from proxmodel.schedule import VPSchedule

    g = 4
    x0 = torch.randn(2, 1, 3, 3).repeat_interleave(g, dim=0)  # two groups of four identical images
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5] * 2)
    y, t, lam, xi = make_training_pairs(x0, VPSchedule(), [5, 10], torch.Generator().manual_seed(0), tie=g)
    assert all(torch.equal(v[:g], v[:1].expand_as(v[:g])) for v in (y, t, lam, xi))
    assert not torch.equal(xi[0], xi[g])

    def gradient(tie: int) -> torch.Tensor:
        model = LinearEps(0.3, 0.1)
        batch = ForwardBatch.build(model, x0, None, adv, step_candidates=[5, 10], variants=("hybrid",),
                                   adv_scale=math.sqrt(g - 1), generator=torch.Generator().manual_seed(1), tie=tie)
        model.a.data += 0.05  # away from e_old, where the split loss has a gradient for any r
        loss, _ = forward_loss(model, batch, beta=1.0)
        return torch.stack(torch.autograd.grad(loss, [model.a, model.b]))

    tied, own = gradient(g), gradient(1)
    # only the beta^2 ||u||^2 term is left: the same for every weighting, so compare with r = 1/2 everywhere
    model = LinearEps(0.3, 0.1)
    flat = ForwardBatch.build(model, x0, None, torch.zeros(8), step_candidates=[5, 10], variants=("hybrid",),
                              adv_scale=1.0, generator=torch.Generator().manual_seed(1), tie=g)
    model.a.data += 0.05
    loss, _ = forward_loss(model, flat, beta=1.0)
    assert torch.allclose(tied, torch.stack(torch.autograd.grad(loss, [model.a, model.b])), atol=1e-6)
    assert not torch.allclose(own, tied, atol=1e-3)
    with pytest.raises(ValueError, match="tie=3"):
        make_training_pairs(x0, VPSchedule(), [5], tie=3)


def test_in_x0_space_the_split_loss_is_the_implied_clean_images_error():
    """forward_loss_space=x0: with the conditional target, the weighted split loss equals r ||x0(e+) - x0||^2 / d +
    (1 - r) ||x0(e-) - x0||^2 / d on the noisy pairs (k < 1), x0(e) the clean image an eps prediction implies
    (inverted here from y = sqrt(alpha) x0 + noise by hand, apart from the code), and the eps-space loss elsewhere.
    Would catch a wrong k, a weight applied to the residual instead of its square, or the weight not applied."""
    from proxmodel.schedule import VPSchedule

    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(32, 3, 4, 4, generator=gen) * 2 - 1
    adv = torch.randn(32, generator=gen)
    batch = ForwardBatch.build(LinearEps(0.3, 0.1), x0, None, adv, step_candidates=[5, 10], variants=("hybrid",),
                               adv_scale=2.0, generator=gen, target="conditional", loss_space="x0")
    eps = batch.eps_old + 0.05 * torch.randn(x0.shape, generator=gen)
    beta = 0.7
    got = split_loss(eps, batch.eps_old, batch.xi, batch.r, beta, batch.weight)

    view = (-1, 1, 1, 1)
    alpha, lam = VPSchedule().alpha(batch.t).view(view), batch.lam.view(view)
    k = (lam * alpha).sqrt() / (1 - alpha + lam)
    noisy = k.flatten() < 1
    assert noisy.sum() >= 8 and (~noisy).sum() >= 4

    def implied_x0(e):  # y - sqrt(alpha) x0 = (1 - alpha + lam) / sqrt(lam) * E[xi | x0, y]
        return (batch.y - (1 - alpha + lam) / lam.sqrt() * e) / alpha.sqrt()

    assert torch.allclose(implied_x0(batch.xi), x0, atol=1e-4)  # the target implies the sample itself
    plus, minus = (1 - beta) * batch.eps_old + beta * eps, (1 + beta) * batch.eps_old - beta * eps
    per = lambda a, b: (a - b).pow(2).flatten(1).mean(dim=1)  # noqa: E731
    in_x0 = batch.r * per(implied_x0(plus), x0) + (1 - batch.r) * per(implied_x0(minus), x0)
    in_eps = batch.r * per(plus, batch.xi) + (1 - batch.r) * per(minus, batch.xi)
    expected = torch.where(noisy, in_x0, in_eps).mean()
    assert torch.allclose(got, expected, rtol=1e-4)
    assert got > 5 * split_loss(eps, batch.eps_old, batch.xi, batch.r, beta)  # the noisy pairs are amplified


def test_x0_space_needs_the_conditional_target():
    with pytest.raises(ValueError, match="target=conditional"):
        ForwardBatch.build(LinearEps(), torch.zeros(4, 1, 2, 2), None, torch.zeros(4), step_candidates=[5],
                           variants=("hybrid",), adv_scale=1.0, generator=torch.Generator(), loss_space="x0")


def test_the_anchor_trains_the_model_and_not_its_reference():
    """The anchor's gradient moves the trained model towards the reference, and leaves the reference (a frozen copy
    or the EMA, held to stay where it is) without a graph or a gradient. Would catch the reference's prediction
    computed with grad (a backward through a second network on every step, and a reference that moves if any of its
    weights is trainable)."""
    x0 = torch.randn(16, 1)
    model, reference = LinearEps(), LinearEps(0.0, 0.5)
    batch = ForwardBatch.build(model, x0, None, torch.zeros(16), step_candidates=[5], variants=("hybrid",),
                               adv_scale=1.0, generator=torch.Generator().manual_seed(0))
    loss, _ = forward_loss(model, batch, 1.0, reference=reference, anchor=1.0)
    loss.backward()
    assert reference.a.grad is None and reference.b.grad is None
    assert float(model.b.grad) == pytest.approx(-1.0)  # d/db (b - 0.5)^2 at b = 0: the pull towards 0.5


def test_in_x0_space_the_anchor_is_measured_in_x0_space_too():
    """forward_loss_space=x0 weighs each pair's squared residuals by x0_loss_scale^2; the anchor to the reference must
    use the same weights, or on the noisy pairs it is ~1/k^2 weaker than the split loss it is meant to balance. Would
    catch the anchor left in eps space."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(32, 1, 2, 2, generator=gen) * 2 - 1
    model, reference = LinearEps(), LinearEps(0.0, 0.5)
    batch = ForwardBatch.build(model, x0, None, torch.zeros(32), step_candidates=[5, 10], variants=("hybrid",),
                               adv_scale=1.0, generator=gen, target="conditional", loss_space="x0")
    _, stats = forward_loss(model, batch, 1.0, reference=reference, anchor=1.0)
    assert float(stats["anchor_mse"]) == pytest.approx(float((0.25 * batch.weight).mean()), rel=1e-6)
    assert float(stats["anchor_mse"]) > 2 * 0.25  # the noisy pairs amplified, as in the split loss


def test_before_the_first_step_the_model_has_not_moved_from_the_sampling_policy():
    """forward_step reports how far the model's prediction has moved from the sampling policy's (e_old) on the
    batch's pairs: 0 before any optimiser step, the square of the shift after one. Would catch it measured against the
    noise target xi (the loss's residual, never 0) instead of e_old."""
    x0 = torch.randn(16, 1)
    model = LinearEps(0.2, 0.1)
    batch = ForwardBatch.build(model, x0, None, torch.randn(16), step_candidates=[5], variants=("hybrid",),
                               adv_scale=1.0, generator=torch.Generator().manual_seed(0))
    _, stats = forward_loss(model, batch, 1.0)
    assert float(stats["forward_step"]) == 0.0
    with torch.no_grad():
        model.b += 0.3
    _, stats = forward_loss(model, batch, 1.0)
    assert float(stats["forward_step"]) == pytest.approx(0.09)
