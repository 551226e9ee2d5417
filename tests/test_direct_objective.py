"""The direct objective (learner/direct_objective.py): the replay of the last K sampler steps and its gradient."""

import copy

import pytest
import torch

from learner.direct_objective import direct_loss, replay
from proxmodel.model import prox_fn
from proxmodel.policy import Policy
from proxmodel.sampler import half_step, hybrid_step, initial_state
from rewards import build

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
CAPTIONS = ["a small red circle at the top left, on a white background", "a large blue square, on a black background",
            "a green triangle at the bottom right", "a yellow circle, on a gray background"]


@pytest.fixture()
def model(tiny_model):
    return copy.deepcopy(tiny_model)


def shape_of(model, batch):
    c, s = model.cfg.channels, model.cfg.image_size
    return (batch, c, s, s)


def sample_with_grad(model, policy, tokens, noises, last_steps):
    """The sampler run from scratch with the given noises (x_N, z_N, z_{N-1}..z_1), gradients only through its last
    `last_steps` network calls: the reparameterised gradient the replay must reproduce."""
    prox = prox_fn(model, policy.guidance, tokens=tokens)
    grid = policy.grid
    y = initial_state(noises[0], noises[1], grid, policy.eta)
    for i, k in enumerate(range(STEPS, 0, -1)):
        with torch.set_grad_enabled(k <= last_steps):
            out = hybrid_step(prox, y, grid, k, eta=policy.eta, noise=noises[2 + i] if k > 1 else None)
        if k == 1:
            return out.x
        y = out.y


def recorded(model, policy, tokens, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = shape_of(model, len(tokens))
    noises = [torch.randn(shape, generator=generator) for _ in range(STEPS + 1)]
    with torch.no_grad():
        prox = prox_fn(model, policy.guidance, tokens=tokens)
        y = initial_state(noises[0], noises[1], policy.grid, policy.eta)
        states = [y]
        for i, k in enumerate(range(STEPS, 1, -1)):
            y = hybrid_step(prox, y, policy.grid, k, eta=policy.eta, noise=noises[2 + i]).y
            states.append(y)
    return torch.stack(states, dim=1), noises


@pytest.mark.parametrize("last_steps", [1, 2, STEPS])
def test_the_replay_is_the_recorded_sample_with_the_samplers_own_gradient(model, last_steps):
    """On policy the replay gives the recorded final image, and its gradient equals that of the sampler run from
    scratch with the same noise, differentiated through its last K calls. Would catch: an off-by-one in which state
    the replay starts from or compares with, a detached path between steps (K > 1 would then lose the earlier
    steps' gradient), or a replay that resamples instead of reusing the recorded noise."""
    policy = Policy.of(model, STEPS)
    tokens = model.tokenize(CAPTIONS)
    states, noises = recorded(model, policy, tokens)
    weight = torch.randn(shape_of(model, len(CAPTIONS)), generator=torch.Generator().manual_seed(9))

    def gradient(x0):
        model.zero_grad()
        (x0 * weight).sum().backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    x0, means = replay(model, policy, tokens, states, last_steps)
    expected_x0 = sample_with_grad(model, policy, tokens, noises, last_steps)
    assert len(means) == last_steps - 1
    torch.testing.assert_close(x0, expected_x0, rtol=0, atol=1e-5)
    got, expected = gradient(x0), gradient(sample_with_grad(model, policy, tokens, noises, last_steps))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    if last_steps > 1:  # and the earlier calls do contribute: the one-step gradient is a different one
        one_step = gradient(replay(model, policy, tokens, states, 1)[0])
        assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(got, one_step))


@pytest.mark.parametrize("last_steps, trained", [(2, None), (STEPS, None), (STEPS, [4, 2])])
def test_detached_inputs_keep_the_sample_and_carry_each_steps_gradient_along_the_linear_path(model, last_steps,
                                                                                              trained):
    """With the networks' inputs detached (DRTune) the replay still gives the recorded image, and its gradient is
    computed independently here: step k's prox output reaches x_0 times the half-step scales after it,
    dx_0/dx_k = prod_{j<k} scale_j, with no network Jacobian between. Would catch: a detach that also cuts the skip
    path (the earlier steps would get nothing), a detach that is not applied (the later networks' Jacobians would
    enter), or a scale applied at the wrong step. A trained subset: only its steps' terms, times K / len(subset)
    (an unscaled or unmasked subset fails)."""
    policy = Policy.of(model, STEPS)
    tokens = model.tokenize(CAPTIONS)
    states, _ = recorded(model, policy, tokens)
    weight = torch.randn(shape_of(model, len(CAPTIONS)), generator=torch.Generator().manual_seed(9))
    start = states.clone().requires_grad_(True)
    x0, _ = replay(model, policy, tokens, start, last_steps, detach_inputs=True, trained=trained)
    full_x0, _ = replay(model, policy, tokens, states, last_steps)
    torch.testing.assert_close(x0, full_x0, rtol=0, atol=1e-6)
    model.zero_grad()
    (x0 * weight).sum().backward()
    got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    n, grid, prox = STEPS, policy.grid, prox_fn(model, policy.guidance, tokens=tokens)
    factors = {k: torch.prod(torch.tensor([half_step(grid, j).scale for j in range(1, k)], dtype=torch.float64))
               for k in range(1, last_steps + 1)}
    # the recorded y_K reaches x_0 along the linear path only: a constant, whatever the network
    torch.testing.assert_close(start.grad[:, n - last_steps], weight * float(factors[last_steps]), rtol=1e-5, atol=0)
    model.zero_grad()
    surrogate, subset = 0.0, trained or range(1, last_steps + 1)
    for k in subset:
        t = torch.full((len(CAPTIONS),), grid.t_at(k - 1))
        lam = torch.full((len(CAPTIONS),), half_step(grid, k).lam)
        term = float(factors[k]) * (prox(states[:, n - k], t, lam) * weight).sum()
        surrogate = surrogate + term * last_steps / len(subset)
    surrogate.backward()
    scale = max(float(g.abs().max()) for g in got)  # biases a norm layer cancels get ~1e-5 of float noise, not 0
    for g, p in zip(got, model.parameters()):
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6 * scale)


def test_a_step_along_the_gradient_raises_the_differentiable_reward(model):
    """The loss is minus the reward: a small gradient step must raise the reward of the same replayed images (a sign
    error, or a clamp that zeroes the gradient of out-of-range pixels, would not)."""
    policy = Policy.of(model, STEPS)
    tokens = model.tokenize(CAPTIONS)
    states, _ = recorded(model, policy, tokens)
    reward = build("compositional_soft")
    loss, stats = direct_loss(model, None, policy, tokens, states, CAPTIONS, reward, last_steps=2)
    model.zero_grad()
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad / norm
    _, after = direct_loss(model, None, policy, tokens, states, CAPTIONS, reward, last_steps=2)
    assert float(loss.detach()) == pytest.approx(-float(stats["direct_reward"]))
    assert float(after["direct_reward"]) > float(stats["direct_reward"])


def test_the_kl_is_zero_at_the_reference_and_grows_as_the_policy_moves(model, tiny_model):
    policy = Policy.of(model, STEPS)
    tokens = model.tokenize(CAPTIONS)
    states, _ = recorded(model, policy, tokens)
    reward = build("compositional_soft")
    _, at_start = direct_loss(model, tiny_model, policy, tokens, states, CAPTIONS, reward, STEPS, kl_coef=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss, moved = direct_loss(model, tiny_model, policy, tokens, states, CAPTIONS, reward, STEPS, kl_coef=1.0)
    assert float(at_start["kl"]) == 0.0 and float(moved["kl"]) > 0.0
    assert float(loss.detach()) == pytest.approx(-float(moved["direct_reward"]) + float(moved["kl"]), rel=1e-5)
    # Its value, by hand: the step at k (making y_{k-1}) has variance eta^2 gamma_{k-1}; the final x_0 the last
    # stochastic step's, eta^2 gamma_1 (an index off by one, or one variance for all, scales the terms apart).
    eta = 0.7
    policy = Policy.of(model, STEPS, eta=eta)
    _, moved = direct_loss(model, tiny_model, policy, tokens, states, CAPTIONS, reward, STEPS, kl_coef=1.0)
    with torch.no_grad():
        x0, means = replay(model, policy, tokens, states, STEPS)
        ref_x0, ref_means = replay(tiny_model, policy, tokens, states, STEPS)
    gammas = [policy.grid.gamma_at(k - 1) for k in range(STEPS, 1, -1)] + [policy.grid.gamma_at(1)]
    terms = [((m - r) ** 2).flatten(1).mean(1).mean() / (2 * eta**2 * g)
             for m, r, g in zip(means + [x0], ref_means + [ref_x0], gammas)]
    assert float(moved["kl"]) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-4)


def test_a_trajectory_with_a_nonfinite_state_is_left_out_before_the_network_sees_it(model):
    policy = Policy.of(model, STEPS)
    tokens = model.tokenize(CAPTIONS)
    states, _ = recorded(model, policy, tokens)
    states[1, -1] = float("nan")  # y_1 of the second image: its x_0 and reward are NaN
    loss, stats = direct_loss(model, None, policy, tokens, states, CAPTIONS, build("compositional_soft"), 1)
    assert torch.isfinite(loss) and float(stats["direct_images_dropped"]) == 1.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_score_model_or_a_replay_longer_than_the_chain_is_refused(model, tiny_model_config):
    from proxmodel.model import ProxT2I

    tokens = model.tokenize(CAPTIONS[:1])
    states = torch.zeros(1, STEPS, *shape_of(model, 1)[1:])
    with pytest.raises(ValueError, match="direct_steps=5: between 1 and grpo.steps=4"):
        replay(model, Policy.of(model, STEPS), tokens, states, STEPS + 1)
    with pytest.raises(ValueError, match="only with detached inputs"):
        replay(model, Policy.of(model, STEPS), tokens, states, STEPS, trained=[1])
    score = ProxT2I(tiny_model_config.model_copy(update={"kind": "score"}))
    with pytest.raises(ValueError, match="score model"):
        replay(score, Policy.of(score, STEPS), tokens, states, 1)


def test_a_trained_subset_changes_the_gradient_and_not_the_values(model):
    """With a random subset of the steps trained (DRTune, train_step_fraction), each trained step's gradient is scaled
    by K / len(subset) while its value stays what the sampler computes: the replayed x_0 and the policy means (what
    the KL compares with the reference) are those of the full replay. Would catch the scale applied to the value too
    (a trained final step doubling x_0, a trained earlier step doubling its mean in the KL)."""
    policy = Policy.of(model, STEPS)
    tokens = model.tokenize(CAPTIONS)
    states, _ = recorded(model, policy, tokens)
    with torch.no_grad():
        full_x0, full_means = replay(model, policy, tokens, states, STEPS)
    x0, means = replay(model, policy, tokens, states, STEPS, detach_inputs=True, trained=[1, 3])
    torch.testing.assert_close(x0, full_x0, rtol=0, atol=1e-6)
    for got, expected in zip(means, full_means, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
