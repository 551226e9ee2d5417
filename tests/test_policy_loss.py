import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.policy_loss import clipped_policy_loss, group_advantages
from rewards import weighted_sum


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=2, max_size=16), st.floats(-5, 5), st.floats(0.1, 10))
def test_advantages_are_normalised_and_invariant_to_affine_rewards(rewards, shift, scale):
    r = torch.tensor(rewards, dtype=torch.float64)
    a = group_advantages(r, eps=1e-6)
    if float(r.std(unbiased=False)) > 1e-3:
        assert abs(float(a.mean())) < 1e-6
        assert abs(float(a.std(unbiased=False)) - 1) < 1e-3
        # Exact when eps scales with the rewards; a fixed eps would shrink a rescaled tiny group's advantages by
        # std / (std + eps), which is the eps's purpose, not a failure of invariance.
        b = group_advantages(r * scale + shift, eps=1e-6 * scale)
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_equal_rewards_give_zero_advantage_per_group():
    r = torch.tensor([[0.5, 0.5, 0.5], [0.0, 1.0, 0.5]])
    a = group_advantages(r, eps=1e-4)
    assert torch.equal(a[0], torch.zeros(3))
    assert a[1, 1] > 0 > a[1, 0]


def test_on_policy_gradient_is_the_policy_gradient():
    """At ratio 1 the clipped surrogate's gradient is -mean(A * grad log pi)."""
    lp = torch.randn(6, requires_grad=True)
    adv = torch.randn(6)
    loss, stats = clipped_policy_loss(lp, lp.detach(), adv, clip_range=1e-4)
    loss.backward()
    assert torch.allclose(lp.grad, -adv / 6)
    assert float(stats["ratio_max_dev"]) == 0.0 and float(stats["clip_frac"]) == 0.0


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    old = torch.zeros(4)
    lp = torch.tensor([0.5, 0.5, -0.5, -0.5], requires_grad=True)  # ratios far outside 1 +- 0.1
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, stats = clipped_policy_loss(lp, old, adv, clip_range=0.1)
    loss.backward()
    # Positive advantage with ratio > 1 + c and negative advantage with ratio < 1 - c are clipped: no gradient.
    assert lp.grad[0] == 0 and lp.grad[3] == 0
    assert lp.grad[1] != 0 and lp.grad[2] != 0
    assert float(stats["clip_frac"]) == 1.0


def test_weighted_sum_of_rewards():
    scores = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.5, 1.0])}
    assert torch.allclose(weighted_sum(scores, {"a": 0.7, "b": 0.3}), torch.tensor([0.85, 0.3]))


def test_advantage_options():
    from learner.policy_loss import PromptStats, compute_advantages

    a = {"a": torch.tensor([[0.0, 1.0], [0.0, 0.5]]), "b": torch.tensor([[1.0, 1.0], [0.0, 4.0]])}
    w = {"a": 1.0, "b": 0.5}
    prompts = ["p", "q"]
    # Sum the rewards, then normalise each group.
    reward_aggr = compute_advantages(a, w, prompts, aggregation="reward", eps=0.0)
    total = torch.tensor([[0.5, 1.5], [0.0, 2.5]])
    assert torch.allclose(reward_aggr, group_advantages(total, 0.0))
    # Normalise each reward, then sum: a constant reward (b in group 0) contributes nothing.
    adv_aggr = compute_advantages(a, w, prompts, aggregation="advantage", eps=1e-12)
    assert torch.allclose(adv_aggr[0], torch.tensor([-1.0, 1.0]))
    assert torch.allclose(adv_aggr[1], torch.tensor([-1.5, 1.5]))
    # One std over the batch keeps the groups' relative scales.
    glob = compute_advantages({"a": total}, {"a": 1.0}, prompts, std="global", eps=0.0)
    assert torch.allclose(glob, (total - total.mean(1, keepdim=True)) / total.std(unbiased=False))
    # Clipping bounds |A|.
    assert compute_advantages({"a": total}, {"a": 1.0}, prompts, std="global", eps=0.0, clip=0.5).abs().max() == 0.5
    # Per-prompt running stats: the group's own stats until min_count rewards are seen, then the history's.
    stats = PromptStats(buffer=4, min_count=4)
    first = compute_advantages({"a": torch.tensor([[0.0, 1.0]])}, {"a": 1.0}, ["p"], std="prompt", prompt_stats=stats)
    assert torch.allclose(first, group_advantages(torch.tensor([[0.0, 1.0]]), 1e-4))
    second = compute_advantages({"a": torch.tensor([[1.0, 1.0]])}, {"a": 1.0}, ["p"], std="prompt", prompt_stats=stats)
    assert torch.allclose(second, torch.full((1, 2), 0.25 / (0.4330127 + 1e-4)), atol=1e-5)
    assert stats.state() == {"total|p": [0.0, 1.0, 1.0, 1.0]}


def test_train_step_selection():
    from learner.policy_loss import select_train_steps

    gen = torch.Generator().manual_seed(0)
    assert select_train_steps(9, None, 1.0, gen) == list(range(9))
    assert select_train_steps(9, [0, 1, 2], 1.0, gen) == [0, 1, 2]
    picks = [tuple(select_train_steps(9, None, 0.34, gen)) for _ in range(50)]
    assert all(len(p) == 3 and len(set(p)) == 3 and all(0 <= j < 9 for j in p) for p in picks)
    assert len(set(picks)) > 10  # a fresh subset each iteration
    import pytest

    with pytest.raises(ValueError, match="selects none"):
        select_train_steps(4, [7], 1.0, gen)


def test_the_clip_acts_exactly_at_its_boundary():
    """Ratios just inside 1 +- c keep their gradient, just outside lose it (where the advantage pushes them further).
    Would catch a clip range off by a factor (the test above uses ratios far outside any reasonable range)."""
    c = 0.1
    ratios = torch.tensor([1 + 0.9 * c, 1 + 1.1 * c, 1 - 0.9 * c, 1 - 1.1 * c])
    lp = ratios.log().requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = clipped_policy_loss(lp, torch.zeros(4), adv, clip_range=c)
    loss.backward()
    assert lp.grad[0] != 0 and lp.grad[2] != 0 and lp.grad[1] == 0 and lp.grad[3] == 0
    expected = -(ratios[0] * 1 + (1 + c) * 1 - ratios[2] - (1 - c)) / 4  # the clipped ones at their bound
    assert torch.allclose(loss, expected) and float(stats["clip_frac"]) == 0.5


def test_prompt_stats_keep_the_latest_rewards_of_each_prompt():
    """The running statistics of a prompt are its last `buffer` rewards. Would catch the buffer keeping the oldest
    (a prompt's baseline frozen at its first rewards while the policy improves)."""
    from learner.policy_loss import PromptStats

    stats = PromptStats(buffer=4, min_count=4)
    stats.normalise("p", torch.tensor([0.0, 0.0, 0.0, 0.0]), eps=0.0)
    out = stats.normalise("p", torch.tensor([1.0, 3.0]), eps=0.0)
    assert stats.history["p"] == [0.0, 0.0, 1.0, 3.0]
    hist = torch.tensor([0.0, 0.0, 1.0, 3.0])
    assert torch.allclose(out, (torch.tensor([1.0, 3.0]) - hist.mean()) / hist.std(unbiased=False))


def test_update_statistics_on_a_policy_that_moved_both_ways():
    """Ratios below and above 1 in one pass: the worst deviation is |ratio - 1| whichever side it is on, the
    |log-ratio| mean does not let the two sides cancel, and approx_kl is the second-order estimate 1/2 E[log r^2] of
    the KL (exact to second order for a small move). Would catch a deviation without abs() (a ratio of 0.5 reported
    as 0.1 from the ratio 1.1 beside it), an |log-ratio| mean of signed values or an approx_kl without its 1/2."""
    log_ratio = torch.tensor([0.5, 1.1], dtype=torch.float64).log()
    _, stats = clipped_policy_loss(log_ratio, torch.zeros(2), torch.tensor([1.0, -1.0]), clip_range=0.2)
    l2, l11 = math.log(2), math.log(1.1)
    assert float(stats["ratio_max_dev"]) == pytest.approx(0.5)
    assert float(stats["ratio_mean"]) == pytest.approx(0.8)
    assert float(stats["log_ratio_abs_max"]) == pytest.approx(l2)
    assert float(stats["log_ratio_abs_mean"]) == pytest.approx((l2 + l11) / 2)
    assert float(stats["approx_kl"]) == pytest.approx((l2**2 + l11**2) / 4)
    assert float(stats["clip_frac"]) == 0.5  # 0.5 is outside 1 +- 0.2, 1.1 inside


def test_the_trained_share_of_the_transitions_is_the_nearest_count_and_at_least_one():
    """grpo.train_step_fraction f of n transitions trains round(f n) of them, never none. Would catch the count
    truncated (f = 0.75 of 9 training 6, not 7) or a small fraction selecting no transition at all (an update that
    trains nothing)."""
    from learner.policy_loss import select_train_steps

    gen = torch.Generator().manual_seed(0)
    assert len(select_train_steps(9, None, 0.75, gen)) == 7
    assert len(select_train_steps(4, [0, 1, 2], 0.9, gen)) == 3
    assert len(select_train_steps(9, None, 0.01, gen)) == 1


def test_a_step_window_keeps_only_transitions_that_exist():
    """train_step_window entries past the last transition (index n - 1) are dropped, and a window of only those is
    refused. Would catch the upper bound off by one (transition n, which does not exist, selected and then
    re-scored out of range)."""
    from learner.policy_loss import select_train_steps

    gen = torch.Generator().manual_seed(0)
    assert select_train_steps(4, [2, 3, 4], 1.0, gen) == [2, 3]
    with pytest.raises(ValueError, match="selects none"):
        select_train_steps(4, [4], 1.0, gen)
