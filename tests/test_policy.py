"""The sampler as a policy, for both model kinds: what a rollout records is exactly what the learner re-scores."""

import copy

import pytest
import torch

from proxmodel.model import ProxT2I
from proxmodel.policy import Policy
from proxmodel.sampler import gaussian_log_prob
from proxmodel.score import eps_fn, sample_score

G, STEPS = 3, 4


@pytest.fixture(scope="module", params=["prox", "score"])
def model(request, tiny_model_config):
    torch.manual_seed(2)
    return ProxT2I(tiny_model_config.model_copy(update={"kind": request.param})).eval()


def shape_of(model):
    cfg = model.cfg
    return (G, cfg.channels, cfg.image_size, cfg.image_size)


@pytest.mark.parametrize("guidance,block,eta", [(1.0, 1, 1.0), (2.5, 1, 1.0), (1.0, 4, 1.0), (1.0, 1, 0.6)])
def test_recorded_log_probs_equal_the_learners_recomputation(model, guidance, block, eta):
    """Rollout (no grad, context) and learner (grad, tokens) agree bit for bit: the on-policy ratio is exactly 1,
    with the log-probs of block means (grpo.credit_block) too; the variance the KL uses is the sampler's, eta^2
    gamma_{k-1} for the prox (at eta = 0.6: a variance without eta, or with eta not squared, scales the KL)."""
    policy = Policy.of(model, STEPS, guidance=guidance, credit_block=block, eta=eta)
    tokens = model.tokenize(["a red circle", "a blue square", ""])
    traj = policy.sample(model, {"context": model.encode_text(tokens)}, shape_of(model), torch.Generator().manual_seed(0))
    assert traj.states.shape == (G, STEPS, *shape_of(model)[1:]) and traj.log_probs.shape == (G, STEPS - 1)
    model.train()
    try:
        for j in range(STEPS - 1):
            step = policy.transition(model, {"tokens": tokens}, traj.states, j)
            assert step.log_prob.requires_grad
            assert torch.equal(step.log_prob.detach(), traj.log_probs[:, j]), f"transition {j}"
            # the variance it reports is the one its log-prob uses, so the closed-form KL is consistent
            expected = gaussian_log_prob(traj.states[:, j + 1], step.mean.detach(), step.var, block)
            assert torch.allclose(step.log_prob.detach(), expected, atol=1e-6)
            if model.cfg.kind == "prox":
                assert step.var == pytest.approx(eta**2 * policy.grid.gamma_at(STEPS - j - 1), rel=1e-9)
    finally:
        model.eval()


def test_score_policy_samples_exactly_the_euler_maruyama_baseline(tiny_model_config):
    model = ProxT2I(tiny_model_config.model_copy(update={"kind": "score"})).eval()
    tokens = model.tokenize(["a green triangle"] * G)
    traj = Policy.of(model, STEPS).sample(model, {"tokens": tokens}, shape_of(model), torch.Generator().manual_seed(5))
    baseline = sample_score(eps_fn(model, tokens=tokens), shape_of(model), STEPS, method="sde",
                            generator=torch.Generator().manual_seed(5))
    assert torch.equal(traj.images, baseline.images) and torch.equal(traj.log_probs, baseline.log_probs)


def test_the_zero_noise_limit_of_the_policy_is_its_deterministic_chain(model):
    """method.md sec. 4: noise -> 0 reproduces the deterministic sampler. With the same starting draw x_N, eta = 1e-6
    must land on the eta = 0 images and eta = 1 far from them; a noise term not scaled by eta (or one added at
    eta = 0) breaks the first, a policy that ignores its noise breaks the second."""
    tokens = model.tokenize(["a red circle"] * G)
    shape = shape_of(model)

    def images(eta: float) -> torch.Tensor:
        traj = Policy.of(model, STEPS, eta=eta).sample(model, {"tokens": tokens}, shape, torch.Generator().manual_seed(0))
        assert (traj.log_probs is None) == (eta == 0.0)
        return traj.images

    deterministic = images(0.0)
    assert (images(1e-6) - deterministic).abs().max() < 1e-4
    assert (images(1.0) - deterministic).abs().max() > 1e-2


def test_transition_index_is_checked(model):
    states = torch.zeros(G, STEPS, *shape_of(model)[1:])
    with pytest.raises(IndexError, match="has 3"):
        Policy.of(model, STEPS).transition(model, {"tokens": model.tokenize([""] * G)}, states, STEPS - 1)


@pytest.mark.parametrize("k", [1, STEPS - 1])
def test_a_policy_stochastic_only_early_records_and_rescores_just_those_transitions(model, k):
    """grpo.stochastic_steps: K log-probs, each equal to the learner's recomputation; transition K is not a policy
    action. K = N-1 is the fully stochastic policy, draw for draw (an off-by-one that made the last step flow fails)."""
    if model.cfg.kind == "score":
        with pytest.raises(ValueError, match="for prox models"):
            Policy.of(model, STEPS, stochastic_steps=k)
        return
    tokens = model.tokenize(["a red circle", "a blue square", ""])
    policy = Policy.of(model, STEPS, stochastic_steps=k)
    traj = policy.sample(model, {"tokens": tokens}, shape_of(model), torch.Generator().manual_seed(3))
    assert traj.states.shape[1] == STEPS and traj.log_probs.shape == (G, k) and policy.transitions == k
    for j in range(k):
        step = policy.transition(model, {"tokens": tokens}, traj.states, j)
        assert torch.allclose(step.log_prob.detach(), traj.log_probs[:, j], atol=1e-6), f"transition {j}"
    if k < STEPS - 1:
        with pytest.raises(IndexError, match=f"has {k}"):
            policy.transition(model, {"tokens": tokens}, traj.states, k)
    full = Policy.of(model, STEPS).sample(model, {"tokens": tokens}, shape_of(model), torch.Generator().manual_seed(3))
    if k == STEPS - 1:
        assert torch.equal(traj.images, full.images) and torch.equal(traj.log_probs, full.log_probs)
    else:  # the later steps follow the ODE: the same first draws, other images
        assert torch.equal(traj.states[:, : k + 1], full.states[:, : k + 1])
        assert not torch.allclose(traj.images, full.images)
    with pytest.raises(ValueError, match="use 1.."):
        Policy.of(model, STEPS, stochastic_steps=STEPS)


def test_the_flow_steps_drift_is_zero_at_the_reference_and_grows_with_the_network_moving(model):
    """The KL term's stand-in on the probability-flow transitions: flow_step re-runs the recorded ODE steps exactly
    (a wrong lam at the switch, transition K, or an index off by one would not reproduce them); flow_drift is 0
    against the sampling network itself and positive, with a gradient, for a moved one."""
    if model.cfg.kind == "score":
        return
    steps = 5
    tokens = model.tokenize(["a red circle", "a blue square", ""])
    policy = Policy.of(model, steps, stochastic_steps=1)
    traj = policy.sample(model, {"tokens": tokens}, shape_of(model), torch.Generator().manual_seed(4))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for j in range(1, steps - 1):
        with torch.no_grad():
            assert torch.allclose(policy.flow_step(model, {"tokens": tokens}, traj.states, j), traj.states[:, j + 1],
                                  atol=1e-6), f"transition {j}"
            assert torch.equal(policy.flow_drift(model, model, {"tokens": tokens}, traj.states, j), torch.zeros(G))
        drift = policy.flow_drift(moved, model, {"tokens": tokens}, traj.states, j)
        assert drift.shape == (G,) and bool((drift > 0).all()) and drift.requires_grad
        with torch.no_grad():  # its scale: the trained step's KL there, squared gap over 2 eta^2 gamma_{N-j-1}
            gap = policy.flow_step(moved, {"tokens": tokens}, traj.states, j) - traj.states[:, j + 1]
        by_hand = (gap**2).flatten(1).mean(1) / (2 * policy.grid.gamma_at(steps - j - 1))
        assert torch.allclose(drift.detach(), by_hand, rtol=1e-4, atol=1e-7), f"transition {j}"
    with pytest.raises(IndexError, match="not a probability-flow step"):
        policy.flow_step(model, {"tokens": tokens}, traj.states, 0)
    with pytest.raises(IndexError, match="not a probability-flow step"):
        Policy.of(model, steps).flow_step(model, {"tokens": tokens}, traj.states, 2)


def test_a_group_with_a_shared_start_differs_by_the_policys_own_noise_only(model):
    """grpo.shared_start: every row of one sample() starts from the same state, the actions after it are drawn per
    row, and the log-probs are still the learner's recomputation. Would catch sharing nothing (the start's noise
    stays in the advantage) or sharing every draw (a group of identical images: no advantage at all)."""
    tokens = model.tokenize(["a red circle"] * G)
    shared = Policy.of(model, STEPS, shared_start=True)
    traj = shared.sample(model, {"tokens": tokens}, shape_of(model), torch.Generator().manual_seed(6))
    start = traj.states[:, 0]
    assert torch.equal(start, start[:1].expand_as(start))
    assert all(not torch.allclose(traj.states[0, 1], traj.states[i, 1]) for i in range(1, G))
    assert all(not torch.allclose(traj.images[0], traj.images[i]) for i in range(1, G))
    for j in range(STEPS - 1):
        step = shared.transition(model, {"tokens": tokens}, traj.states, j)
        assert torch.allclose(step.log_prob.detach(), traj.log_probs[:, j], atol=1e-6), f"transition {j}"
    own = Policy.of(model, STEPS).sample(model, {"tokens": tokens}, shape_of(model), torch.Generator().manual_seed(6))
    assert not torch.allclose(own.states[0, 0], own.states[1, 0])


def test_a_backward_policys_transition_variance_is_the_backward_half_steps():
    """method.md sec. 3: the fully backward policy's variance is eta^2 gamma / (1 - gamma/2)^2 (gamma = gamma_{k-1},
    k = N - j), written out here; the KL and the flow drift divide by it. Would catch the variance taken from the
    hybrid half-step (eta^2 gamma) whatever the policy's variant: the backward KL would be off by up to 1/0.05^2."""
    eta, steps = 0.8, 10
    policy = Policy("prox", steps, eta=eta, variant="backward")
    for j in range(steps - 1):
        t_prev, t = (steps - j - 2) / steps, (steps - j - 1) / steps
        gamma = 0.1 * (t - t_prev) + 0.5 * 19.9 * (t * t - t_prev * t_prev)
        assert policy.variance(j) == pytest.approx(eta**2 * gamma / (1 - gamma / 2) ** 2, rel=1e-9), j
    assert Policy("prox", steps, eta=eta).variance(0) == pytest.approx(eta**2 * policy.grid.gamma_at(steps - 1))


def test_the_flow_drift_trains_the_model_and_leaves_the_reference_alone(model):
    """flow_drift's gradient goes through the trained network only: a reference whose parameters still require grad
    (a copy nobody froze) gets none, the model gets some. Would catch the reference's flow step computed with grad
    (the KL would also pull the reference toward the model, and accumulate gradients in it)."""
    if model.cfg.kind == "score":
        pytest.skip("a score model's policy has no probability-flow steps")
    tokens = model.tokenize(["a red circle", "a blue square", ""])
    policy = Policy.of(model, 5, stochastic_steps=1)
    traj = policy.sample(model, {"tokens": tokens}, shape_of(model), torch.Generator().manual_seed(4))
    trained, reference = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert all(p.requires_grad for p in reference.parameters())
    policy.flow_drift(trained, reference, {"tokens": tokens}, traj.states, 2).sum().backward()
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trained.unet.parameters())
