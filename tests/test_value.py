"""The value-steered prox sampler: the base at scale 0, the h-transform's mean shift and its KL otherwise."""

import torch
from torch import nn

from proxmodel.policy import Policy
from proxmodel.sampler import half_step
from proxmodel.value import DenoisedValue, ValueModel, sample_steered, value_grad

STEPS = 5


class Linear(nn.Module):
    """V(y) = <w, y>: grad V = w everywhere, so the steering shift and its KL have closed forms."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, y, t, lam, context, k):
        return (y * self.w).flatten(1).sum(1)


def context_of(model, n=3):
    return model.encode_text(model.tokenize(["a red circle", "two blue squares", ""][:n]))


def test_scale_zero_is_the_base_policy_bit_for_bit(tiny_model):
    context = context_of(tiny_model)
    shape = tiny_model.sample_shape(3)
    policy = Policy.of(tiny_model, STEPS)
    base = policy.sample(tiny_model, {"context": context}, shape, torch.Generator().manual_seed(7))
    w = torch.randn(shape[1:])
    for value, scale in [(None, 1.0), (Linear(w), 0.0)]:
        out = sample_steered(tiny_model, value, context, shape, policy.grid, scale,
                             generator=torch.Generator().manual_seed(7))
        assert torch.equal(out.states, base.states)
        assert torch.equal(out.images, base.images)
        assert torch.equal(out.kl, torch.zeros(3, STEPS - 1))


def test_the_shift_is_scale_times_variance_times_the_value_gradient_and_its_kl_is_closed_form(tiny_model):
    context = context_of(tiny_model)
    shape = tiny_model.sample_shape(3)
    grid = Policy.of(tiny_model, STEPS).grid
    w = torch.randn(shape[1:])
    scale = 0.7
    base = sample_steered(tiny_model, None, context, shape, grid, 0.0, generator=torch.Generator().manual_seed(3))
    steered = sample_steered(tiny_model, Linear(w), context, shape, grid, scale,
                             generator=torch.Generator().manual_seed(3))
    var = half_step(grid, STEPS - 1).noise_std ** 2
    # the first transition starts from the same y_N with the same noise: only the shift differs, towards higher V
    torch.testing.assert_close(steered.states[:, 1] - base.states[:, 1], (scale * var * w).expand(3, *w.shape),
                               atol=1e-5, rtol=1e-4)
    variances = torch.tensor([half_step(grid, k - 1).noise_std ** 2 for k in range(STEPS, 1, -1)])
    expected = scale**2 * variances * w.pow(2).sum() / 2  # |s^2 scale w|^2 / (2 s^2) per transition
    torch.testing.assert_close(steered.kl, expected.expand(3, -1), rtol=1e-4, atol=1e-6)


def test_the_value_of_one_row_does_not_see_another(tiny_model):
    context = context_of(tiny_model)
    y = torch.randn(tiny_model.sample_shape(3))
    grid = Policy.of(tiny_model, STEPS).grid
    for value in [ValueModel(tiny_model), DenoisedValue(tiny_model, STEPS, width=8)]:
        together = value_grad(value, y, grid, 2, context)
        alone = torch.cat([value_grad(value, y[i:i + 1], grid, 2, context[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
        assert together.abs().sum() > 0
