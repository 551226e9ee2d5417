"""The forward-process objective (learner/forward_objective.py): its weights implement the reward tilt, and
training on tilted own samples moves the learned prox to the prox of the tilted distribution."""

import math

import pytest
import torch

from learner.forward_objective import forward_loss, tilt_weights, weighted_matching_loss
from proxmodel.losses import proximal_matching_loss


def test_tilt_weights_average_one_per_group_and_favour_the_better_samples():
    adv = torch.tensor([[-1.0, 0.0, 2.0, -1.0], [0.5, -0.5, 0.5, -0.5]])
    w = tilt_weights(adv, beta=1.0)
    assert torch.allclose(w.mean(dim=1), torch.ones(2))
    assert torch.equal(tilt_weights(adv, 0.0), torch.ones_like(adv))  # beta = 0: plain self-distillation
    order = adv[0].argsort()
    assert (w[0][order].diff() >= 0).all()  # monotone in the advantage
    assert float(w[0, 2]) == pytest.approx(4 * math.exp(2) / (2 * math.exp(-1) + 1 + math.exp(2)))


def test_weighted_matching_loss_is_proximal_matching_at_unit_weights_and_ignores_zero_weights():
    pred, target = torch.randn(6, 3, 4, 4, requires_grad=True), torch.randn(6, 3, 4, 4)
    ones = torch.ones(6)
    assert torch.allclose(weighted_matching_loss(pred, target, ones, 0.7), proximal_matching_loss(pred, target, 0.7))
    w = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 0.5])
    weighted_matching_loss(pred, target, w, 0.7).backward()
    assert (pred.grad[w == 0] == 0).all() and (pred.grad[w > 0].abs().sum(dim=(1, 2, 3)) > 0).all()


class LinearEps(torch.nn.Module):
    """eps(y) = a y + b: the family that holds the exact eps of 1-D Gaussian data."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.zeros(()))

    def forward(self, y, t, lam, tokens=None):
        return self.a * y + self.b


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_training_on_tilted_own_samples_learns_the_prox_of_the_tilted_distribution(beta):
    """Samples x ~ N(0, 1), reward r = x, one group. The tilt exp(beta A) with A = (r - mean) / std makes
    p* = N(beta, 1); at t = 0 (N = 1 step, lam = gamma_1) the exact eps of y = x + sqrt(lam) xi under p* is
    sqrt(lam) / (1 + lam) (y - beta). Learned with the weighted loss, the linear eps must reach it."""
    torch.manual_seed(0)
    n = 10_000
    x0 = torch.randn(n, 1)
    adv = ((x0 - x0.mean()) / x0.std()).view(1, n)
    weights = tilt_weights(adv, beta).view(n)
    model = LinearEps()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(1)
    tail = []
    for step in range(400):
        loss, _ = forward_loss(model, x0, None, weights, step_candidates=[1], variants=("hybrid",), zeta=1.0,
                               generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 300:
            tail.append((model.a.item(), model.b.item()))
    a, b = (sum(v) / len(v) for v in zip(*tail))
    lam = 0.1 + 0.5 * 19.9  # gamma of the single step, int_0^1 beta
    assert a == pytest.approx(math.sqrt(lam) / (1 + lam), abs=0.02)
    assert b == pytest.approx(-math.sqrt(lam) / (1 + lam) * beta, abs=0.03)


def test_the_anchor_pulls_towards_the_reference_on_the_same_inputs():
    x0 = torch.randn(64, 1)
    model, reference = LinearEps(), LinearEps()
    with torch.no_grad():
        reference.b.fill_(0.5)
    kwargs = dict(step_candidates=[5], variants=("hybrid",), zeta=1.0)
    plain, _ = forward_loss(model, x0, None, torch.ones(64), generator=torch.Generator().manual_seed(0), **kwargs)
    anchored, stats = forward_loss(model, x0, None, torch.ones(64), generator=torch.Generator().manual_seed(0),
                                   reference=reference, anchor=2.0, **kwargs)
    assert float(stats["anchor_mse"]) == pytest.approx(0.25)  # (0 - 0.5)^2, the same pairs as `plain`
    assert float(anchored) == pytest.approx(float(plain) + 0.5)
