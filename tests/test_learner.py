"""The GRPO learner in this process: a real DeepSpeed engine (gloo, one rank) reading a real Redis stream."""

import copy
import json
from dataclasses import replace

import pytest
import torch

from actors.stream import ExperienceStream
from learner.config import RunConfig
from learner.grpo_learner import GrpoLearner, collect, rank_generator, reduce_stats
from learner.policy_loss import group_advantages
from proxmodel.model import save_model
from proxmodel.policy import Policy
from tests.grpo_batch import PROMPTS, WEIGHTS, write_batch

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, G = 3, 4


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return str(save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "c"))


def make_learner(checkpoint, server, run_id, zero_stage=2, **grpo):
    cfg = RunConfig.model_validate({
        "grpo": {"steps": STEPS, "group_size": G, "prompts_per_iteration": len(PROMPTS), "lr": 1e-3, **grpo},
        # The groups are on the stream before each update: a read that waits means the learner lost or skipped
        # them (e.g. a wrong idempotency key), which must fail in seconds, not after the default 10 minutes.
        "actors": {"torch_threads": 1, "stream_read_timeout_s": 20}, "deepspeed": {"zero_stage": zero_stage},
    })
    return GrpoLearner(checkpoint, cfg.model_dump_json(), server.address, run_id)


@pytest.mark.parametrize("recompute", ["group", "batch"])
def test_one_update_is_on_policy_and_acknowledges_the_batch(checkpoint, server, recompute):
    """group: the rollout's shapes, so the ratio is exactly 1. batch: one call over every group, which differs by
    kernel rounding only (2.4e-7 measured), far inside the trust region. Would catch: a merged batch whose states,
    captions and recorded log-probs are misaligned (ratios far from 1), or rounding that reaches the clip range."""
    write_batch(checkpoint, server.address, f"a-{recompute}", steps=STEPS, group_size=G)
    learner = make_learner(checkpoint, server, f"a-{recompute}", recompute=recompute)
    before = {k: v.clone() for k, v in learner.publish()[0].items()}
    metrics = learner.train(0, len(PROMPTS))
    bound = 0.0 if recompute == "group" else 1e-3 * learner.cfg.grpo.clip_range
    assert metrics["ratio_max_dev"] <= bound and metrics["first_pass_log_ratio_max"] <= bound
    assert metrics["clip_frac"] == 0.0
    assert metrics["acked"] == len(PROMPTS) and learner.stream.pending() == 0
    after, version = learner.publish()
    assert version == 1
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_several_updates_per_batch_go_off_policy_and_clip(checkpoint, server):
    write_batch(checkpoint, server.address, "b", steps=STEPS, group_size=G)
    learner = make_learner(checkpoint, server, "b", updates_per_batch=3, clip_range=1e-6)
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["ratio_max_dev"] > 0.0  # the later passes see a moved policy
    assert 0.0 < metrics["clip_frac"] <= 2 / 3 + 1e-6  # never on the first pass
    assert learner.engine.global_steps == 3


def test_kl_to_the_reference_is_zero_first_then_positive(checkpoint, server):
    write_batch(checkpoint, server.address, "c", steps=STEPS, group_size=G)
    learner = make_learner(checkpoint, server, "c", kl_coef=0.5, updates_per_batch=2)
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["kl"] > 0.0  # mean over passes: 0 on the first, positive on the second


def test_zero_std_groups_are_dropped_and_step_window_limits_the_transitions(checkpoint, server):
    flat = torch.full((G,), 0.5)
    rewards = [flat, torch.tensor([0.0, 1.0, 0.5, 0.25]), flat, torch.tensor([1.0, 0.0, 0.0, 0.0])]
    write_batch(checkpoint, server.address, "d", steps=STEPS, group_size=G, rewards=rewards)
    learner = make_learner(checkpoint, server, "d", train_step_window=[1])
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["groups"] == 4 and metrics["groups_trained"] == 2
    assert learner.engine.global_steps == 1 and learner.engine.gradient_accumulation_steps() == 1
    json.dumps(metrics)  # plain numbers, ready for MLflow


def test_a_policy_stochastic_only_early_trains_those_transitions_on_policy(checkpoint, server):
    """grpo.stochastic_steps=1: the rollouts log one transition, the learner re-scores that one alone (ratio exactly
    1, one micro-batch), and a learner of the fully stochastic sampler refuses the entries instead of misreading
    them. Would catch a learner still looping over N-1 transitions (IndexError) or mixing the two samplers."""
    write_batch(checkpoint, server.address, "k1", steps=STEPS, group_size=G, stochastic_steps=1)
    learner = make_learner(checkpoint, server, "k1", stochastic_steps=1, recompute="group")
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["ratio_max_dev"] == 0.0 and metrics["acked"] == len(PROMPTS)
    assert learner.engine.global_steps == 1 and learner.engine.gradient_accumulation_steps() == 1
    write_batch(checkpoint, server.address, "k2", steps=STEPS, group_size=G, stochastic_steps=1)
    with pytest.raises(RuntimeError, match="'stochastic_steps': 1"):
        make_learner(checkpoint, server, "k2").train(0, len(PROMPTS))


@pytest.fixture(scope="module")
def score_checkpoint(tiny_model_config, tmp_path_factory):
    from proxmodel.model import ProxT2I

    torch.manual_seed(3)
    model = ProxT2I(tiny_model_config.model_copy(update={"kind": "score"}))
    return str(save_model(model, tmp_path_factory.mktemp("score") / "c"))


def test_score_policy_baseline_trains_on_policy_with_kl_and_guidance(score_checkpoint, server):
    """The DDPO-style baseline: a score model's Euler-Maruyama chain through the same learner, CFG and KL included."""
    write_batch(score_checkpoint, server.address, "s", steps=STEPS, group_size=G, guidance=2.0)
    learner = make_learner(score_checkpoint, server, "s", guidance=2.0, kl_coef=0.5, updates_per_batch=2)
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["acked"] == len(PROMPTS) and learner.stream.pending() == 0
    assert metrics["kl"] > 0  # averaged over the two updates: 0 on the first, positive after it


def test_learner_refuses_entries_from_another_sampler(checkpoint, server):
    write_batch(checkpoint, server.address, "m", steps=STEPS, group_size=G, guidance=3.0)
    learner = make_learner(checkpoint, server, "m")
    with pytest.raises(RuntimeError, match="'guidance': 3.0"):
        learner.train(0, len(PROMPTS))


def test_forward_objective_trains_on_samples_alone_and_acknowledges_the_batch(checkpoint, server):
    write_batch(checkpoint, server.address, "f", steps=STEPS, group_size=G, trajectory=False)
    learner = make_learner(checkpoint, server, "f", objective="forward", updates_per_batch=2, kl_coef=0.5)
    before = {k: v.clone() for k, v in learner.publish()[0].items()}
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["acked"] == len(PROMPTS) and learner.stream.pending() == 0
    assert learner.engine.global_steps == 2 and metrics["forward_loss"] > 0 and metrics["anchor_mse"] > 0
    assert metrics["forward_step"] > 0  # the second pass sees eps moved away from the sampling policy's
    after, _ = learner.publish()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_forward_objective_measures_its_loss_in_x0_space_when_asked(checkpoint, server):
    """grpo.forward_loss_space=x0 reaches the update: on the same batch, weights and pairs the first pass's loss is
    larger (each pair's weight is x0_loss_scale^2 >= 1, > 100 at the noisiest pairs). Would catch the option being
    accepted and then dropped between the config and ForwardBatch."""
    losses = {}
    for space in ("eps", "x0"):
        write_batch(checkpoint, server.address, f"x-{space}", steps=STEPS, group_size=G, trajectory=False)
        learner = make_learner(checkpoint, server, f"x-{space}", objective="forward", forward_loss_space=space)
        losses[space] = learner.train(0, len(PROMPTS))["forward_loss"]
    assert losses["x0"] > 2 * losses["eps"] > 0


def test_forward_objective_sees_rewards_only_through_advantages(checkpoint, server):
    """Shifting each group's rewards by a constant leaves its advantages, and so the update, bit for bit the same;
    a reward that leaked in another way (unnormalised, or compared across groups) would make them differ."""
    base = [torch.tensor([0.0, 1.0, 0.25, 0.5]), torch.tensor([0.5, 0.0, 0.0, 1.0]),
            torch.tensor([0.125, 0.375, 0.625, 0.875]), torch.tensor([1.0, 0.0, 0.0, 0.0])]  # exact in binary
    results = []
    for run, shift in (("g0", 0.0), ("g1", 0.5)):
        rewards = [r + shift * i for i, r in enumerate(base)]  # a different level per group
        write_batch(checkpoint, server.address, run, steps=STEPS, group_size=G, rewards=rewards, trajectory=False)
        learner = make_learner(checkpoint, server, run, objective="forward")
        learner.train(0, len(PROMPTS))
        results.append(learner.publish()[0])
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("objective", ["policy_gradient", "direct"])
def test_the_update_does_not_depend_on_the_order_groups_reach_the_stream(checkpoint, server, objective):
    """Rollout actors finish in whatever order the machine lets them: the same groups arriving in another order must
    give bit-identical weights, or one seed gives a different run each time (measured: two runs of one recipe and
    seed drifted apart from the second iteration on). Would catch: a batch trained in arrival order."""
    published = []
    for name, order in (("o1", None), ("o2", list(reversed(range(len(PROMPTS)))))):
        write_batch(checkpoint, server.address, name + objective, steps=STEPS, group_size=G, order=order)
        learner = make_learner(checkpoint, server, name + objective, objective=objective, drop_zero_std_groups=False)
        learner.train(0, len(PROMPTS))
        published.append(learner.publish()[0])
    assert all(torch.equal(published[0][k], published[1][k]) for k in published[0])


@pytest.mark.parametrize("subset", [{}, {"direct_detach_inputs": True, "train_step_fraction": 0.5}])
def test_direct_objective_trains_every_group_on_its_replayed_trajectories(checkpoint, server, subset):
    """Groups whose verifier rewards are all equal still carry the differentiable reward's gradient, so none is
    dropped; the batch is acknowledged and the weights move, one optimiser step per pass. Would catch: direct runs
    losing the zero-std groups, or a pass that does not step; with a random half of the detached replayed steps
    trained, a step index mapped outside the replayed ones."""
    flat = torch.full((G,), 0.5)
    run = "dr" + str(len(subset))
    write_batch(checkpoint, server.address, run, steps=STEPS, group_size=G, rewards=[flat] * len(PROMPTS))
    learner = make_learner(checkpoint, server, run, objective="direct", direct_steps=2, updates_per_batch=3, **subset)
    before = {k: v.clone() for k, v in learner.publish()[0].items()}
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["groups_trained"] == len(PROMPTS) and metrics["acked"] == len(PROMPTS)
    assert learner.stream.pending() == 0 and learner.engine.global_steps == 3
    after, _ = learner.publish()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert 0.0 <= metrics["direct_reward"] <= 1.0 and metrics["loss"] < 0


def test_direct_learner_refuses_groups_without_trajectories(checkpoint, server):
    write_batch(checkpoint, server.address, "dn", steps=STEPS, group_size=G, trajectory=False)
    learner = make_learner(checkpoint, server, "dn", objective="direct")
    with pytest.raises(RuntimeError, match="objective direct replays"):
        learner.train(0, len(PROMPTS))


def test_policy_gradient_learner_refuses_groups_without_trajectories(checkpoint, server):
    write_batch(checkpoint, server.address, "h", steps=STEPS, group_size=G, trajectory=False)
    learner = make_learner(checkpoint, server, "h")
    with pytest.raises(RuntimeError, match="without its trajectory"):
        learner.train(0, len(PROMPTS))


def test_forward_with_ema_samples_from_the_average_anchored_at_the_start(checkpoint, server):
    """grpo.ema_decay: what is published (rollouts, evaluation, the checkpoint) is decay x start + (1 - decay) x
    the trained weights after one step, not the trained weights (a learner publishing its raw weights, or an EMA
    that starts from the first trained weights as pretraining's warmed-up one does, fails this)."""
    write_batch(checkpoint, server.address, "e", steps=STEPS, group_size=G, trajectory=False)
    learner = make_learner(checkpoint, server, "e", objective="forward", ema_decay=0.75)
    start = {k: v.clone() for k, v in learner.publish()[0].items()}
    learner.train(0, len(PROMPTS))
    published, _ = learner.publish()
    trained = learner.engine.module.state_dict()
    moved = [k for k in start if not torch.equal(start[k], trained[k].cpu())]
    assert moved
    for k in moved:
        expected = 0.75 * start[k] + 0.25 * trained[k].detach().cpu().float()
        assert torch.allclose(published[k], expected, atol=1e-6), k
    with pytest.raises(ValueError, match="ema_decay=0.5 needs grpo.objective=forward"):
        RunConfig.model_validate({"grpo": {"objective": "policy_gradient", "ema_decay": 0.5}})


def write_nonfinite_batch(checkpoint, server, run_id):
    """A real batch whose recorded log-probs are NaN (a corrupted entry): its loss and gradient are NaN."""
    write_batch(checkpoint, server.address, run_id + "-source", steps=STEPS, group_size=G)
    source, target = ExperienceStream(server.address, run_id + "-source"), ExperienceStream(server.address, run_id)
    target.create()
    for _, group in source.read("copy", len(PROMPTS), timeout_s=5):
        target.add(replace(group, log_probs=torch.full_like(group.log_probs, float("nan"))))


@pytest.mark.parametrize("zero_stage", [0, 2])  # 0: our optimizer's check; 2: DeepSpeed's overflow check
def test_a_nonfinite_update_is_skipped_and_counted_and_leaves_every_weight_as_it_was(checkpoint, server, zero_stage):
    learner = make_learner(checkpoint, server, f"nan{zero_stage}", zero_stage=zero_stage, max_staleness=5)
    before = {k: v.clone() for k, v in learner.publish()[0].items()}
    write_nonfinite_batch(checkpoint, server, f"nan{zero_stage}")
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["nonfinite_updates"] == 1 and metrics["nonfinite_in_a_row"] == 1
    assert metrics["acked"] == len(PROMPTS)  # the batch is consumed, not retried forever
    after = learner.publish()[0]
    assert all(torch.equal(before[k], after[k]) for k in before)
    write_batch(checkpoint, server.address, f"nan{zero_stage}", steps=STEPS, group_size=G, iteration=1)  # a good one
    metrics = learner.train(1, len(PROMPTS))
    assert metrics["nonfinite_updates"] == 1 and metrics["nonfinite_in_a_row"] == 0  # the streak is over
    trained = learner.publish()[0]
    assert any(not torch.equal(after[k], trained[k]) for k in after)
    assert all(bool(torch.isfinite(v).all()) for v in trained.values())


def test_a_group_written_twice_is_trained_once(checkpoint, server):
    """A write repeated after a lost reply (or a rollout sampled again) puts the same group in the stream twice."""
    write_batch(checkpoint, server.address, "dup", steps=STEPS, group_size=G)
    stream = ExperienceStream(server.address, "dup")
    first = stream.client.xrange(stream.key, count=1)[0][1]
    stream.client.xadd(stream.key, first)  # the same entry again, as a retried XADD would write it
    learner = make_learner(checkpoint, server, "dup")
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["groups"] == metrics["groups_trained"] == len(PROMPTS)
    with pytest.raises(TimeoutError):  # the copy is delivered next, recognised, acknowledged and never returned
        learner.stream.read("rank0", count=1, timeout_s=1)
    assert learner.stream.duplicates == 1 and learner.stream.pending() == 0 and stream.length() == len(PROMPTS) + 1


def test_data_anchor_weighs_each_optimiser_step_the_same_however_many_transitions_it_accumulates(checkpoint, server):
    """grpo.data_anchor with all advantages zero: the update is the anchor's alone (the policy loss has exactly zero
    gradient), and with an SGD-like Adam (eps far above every gradient entry) it is proportional to the gradient.
    Training one or both transitions per optimiser step must then move the weights the same: DeepSpeed divides each
    micro-step's loss by the number of micro-steps, so an anchor added once per step without undoing that would
    weigh half as much with two (and a learner that ignored data_anchor would not move at all)."""
    flat = [torch.full((G,), 0.5)] * len(PROMPTS)
    deltas = []
    for run, fraction in (("k1", 0.5), ("k2", 1.0)):
        write_batch(checkpoint, server.address, run, steps=STEPS, group_size=G, rewards=flat)
        learner = make_learner(checkpoint, server, run, drop_zero_std_groups=False, train_step_fraction=fraction,
                               data_anchor=2.0, data_anchor_batch=4, adam_eps=1e3)
        start = {k: v.clone() for k, v in learner.publish()[0].items()}
        metrics = learner.train(0, len(PROMPTS))
        assert learner.engine.gradient_accumulation_steps() == (1 if fraction == 0.5 else 2)
        assert metrics["anchor_loss"] > 0
        after = learner.publish()[0]
        deltas.append(torch.cat([(after[k] - start[k]).flatten() for k in start]))
    assert deltas[0].abs().max() > 0
    assert torch.allclose(deltas[0], deltas[1], rtol=1e-3, atol=1e-12)


def _gradients(model, batch, caption_contrast):
    from learner.grpo_learner import transition_loss
    from proxmodel.policy import Policy

    model.zero_grad()
    loss, stats = transition_loss(model, None, Policy.of(model, STEPS), batch, 0, 1e-3, 0.0, caption_contrast)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.unet.parameters()]), stats


@pytest.mark.parametrize("blind", [False, True])
def test_caption_contrast_trains_only_what_depends_on_the_caption(tiny_model, server, tmp_path, blind):
    """grpo.caption_contrast = 1 subtracts the actions' advantage-weighted log-likelihood under the empty caption.
    For a model that cannot see its caption (text embeddings zeroed: every caption encodes alike) the two terms are
    the same function, so the gradient must vanish; with the caption visible it must not. Would catch: the empty
    caption never reaching the network (no cancellation), a wrong sign (the caption-blind gradient doubled), or a
    contrast normalised differently from the policy loss (a residue)."""
    import copy

    from actors.experience import Group
    from learner.grpo_learner import TrainGroup
    from learner.policy_loss import compute_advantages

    model = copy.deepcopy(tiny_model)
    if blind:
        with torch.no_grad():
            model.text.embeddings.token_embedding.weight.zero_()
            model.text.embeddings.position_embedding.weight.zero_()
    checkpoint = str(save_model(model, tmp_path / f"blind{blind}"))
    write_batch(checkpoint, server.address, f"cc{blind}", steps=STEPS, group_size=G)
    groups: list[Group] = [g for _, g in ExperienceStream(server.address, f"cc{blind}").read("rank0", count=4,
                                                                                             timeout_s=5)]
    advantages = compute_advantages({"compositional": torch.stack([g.scores["compositional"] for g in groups])},
                                    {"compositional": 1.0}, [g.prompt for g in groups])
    batch = [TrainGroup.of(g, a, model, torch.device("cpu")) for g, a in zip(groups, advantages)]
    plain, _ = _gradients(model, batch, 0.0)
    contrast, stats = _gradients(model, batch, 1.0)
    assert plain.norm() > 0
    if blind:
        assert contrast.norm() <= 1e-5 * plain.norm()
        assert abs(float(stats["caption_log_ratio"])) < 1e-6
    else:
        assert contrast.norm() > 1e-2 * plain.norm()
        assert (contrast - plain).norm() > 1e-2 * plain.norm()


def test_learner_with_caption_contrast_updates_and_reports_the_caption_log_ratio(checkpoint, server):
    write_batch(checkpoint, server.address, "cc", steps=STEPS, group_size=G)
    learner = make_learner(checkpoint, server, "cc", caption_contrast=1.0)
    before = {k: v.clone() for k, v in learner.publish()[0].items()}
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["acked"] == len(PROMPTS) and "caption_log_ratio" in metrics
    after = learner.publish()[0]
    assert any(not torch.equal(before[k], after[k]) for k in before)


class MovedLate(torch.nn.Module):
    """A KL reference equal to `model` at the noisiest step's time and to `moved` at every later one."""

    def __init__(self, model, moved, t_first: float):
        super().__init__()
        self.model, self.moved, self.t_first = model, moved, t_first

    def forward(self, y, t, lam, **condition):
        return (self.model if abs(float(t[0]) - self.t_first) < 1e-6 else self.moved)(y, t, lam, **condition)


def test_the_kl_term_pulls_the_flow_steps_back_to_the_reference(checkpoint, server, tiny_model):
    """grpo.kl_flow_steps: equal rewards (zero advantages) and a reference that differs from the weights only at
    the probability-flow transition, so only the flow term can train: without it nothing moves, with it that
    transition's drift shrinks. Would catch the flow term dropped, given the wrong sign, or computed without a
    gradient."""
    policy = Policy.of(tiny_model, STEPS, stochastic_steps=1)
    condition = {"tokens": tiny_model.tokenize(PROMPTS)}
    shape = (len(PROMPTS), tiny_model.cfg.channels, tiny_model.cfg.image_size, tiny_model.cfg.image_size)
    states = policy.sample(tiny_model, condition, shape, torch.Generator().manual_seed(5)).states
    moved = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    # copies: requires_grad_(False) on the shared fixture itself would freeze it for every later test
    reference = MovedLate(copy.deepcopy(tiny_model), moved, policy.grid.t_at(STEPS - 1)).requires_grad_(False)

    def drift(net) -> float:
        with torch.no_grad():
            return float(policy.flow_drift(net, reference, condition, states, 1).mean())

    before, after, metrics = drift(tiny_model), {}, {}
    for on in (False, True):
        run = f"kl-flow-{on}"
        write_batch(checkpoint, server.address, run, steps=STEPS, group_size=G, stochastic_steps=1,
                    rewards=[torch.ones(G)] * len(PROMPTS))
        learner = make_learner(checkpoint, server, run, stochastic_steps=1, kl_coef=1.0, kl_flow_steps=on,
                               updates_per_batch=4, recompute="group")
        learner.reference = reference
        metrics[on] = learner.train(0, len(PROMPTS))
        after[on] = drift(learner.engine.module)
    assert "kl_flow" not in metrics[False] and metrics[False]["kl"] == 0 and metrics[True]["kl_flow"] > 0
    assert before > 0 and after[False] == before and after[True] < 0.8 * before, (before, after)


def test_groups_with_a_shared_start_reach_the_learner_and_train_on_policy(checkpoint, server):
    """grpo.shared_start through the rollout actor and the stream: each group's trajectories start from one state
    (and differ after it), and the learner re-scores them as any other group (ratio exactly 1). Would catch the
    option dropped between the actor and its policy, or a shared start the learner scores differently."""
    write_batch(checkpoint, server.address, "shared", steps=STEPS, group_size=G, shared_start=True)
    peek = ExperienceStream(server.address, "shared", group="peek")
    peek.create()  # a second consumer group reads every entry from the start, leaving them to the learner's
    for _, group in peek.read("peek", len(PROMPTS), 5.0):
        start = group.states[:, 0]
        assert torch.equal(start, start[:1].expand_as(start)) and not torch.allclose(group.samples[0], group.samples[1])
    learner = make_learner(checkpoint, server, "shared", recompute="group")
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["ratio_max_dev"] == 0.0 and metrics["acked"] == len(PROMPTS)


def test_block_credited_groups_train_on_policy_and_a_full_credit_learner_refuses_them(checkpoint, server):
    """grpo.credit_block through the rollout actor and the stream: the recorded block log-probs are what the learner
    re-scores (ratio exactly 1), and a learner that scores every dimension refuses them rather than reading a block
    log-prob as a full one (its ratios would be off by the fine noise's density). Would catch the option dropped
    between the config, the actor's policy, the stream's sampler record and the learner's policy."""
    write_batch(checkpoint, server.address, "block-full", steps=STEPS, group_size=G, credit_block=2)
    with pytest.raises(RuntimeError, match="'credit_block': 2"):
        make_learner(checkpoint, server, "block-full", recompute="group").train(0, len(PROMPTS))
    write_batch(checkpoint, server.address, "block", steps=STEPS, group_size=G, credit_block=2)
    learner = make_learner(checkpoint, server, "block", recompute="group", credit_block=2)
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["ratio_max_dev"] == 0.0 and metrics["acked"] == len(PROMPTS)


@pytest.mark.parametrize("train_text", [False, True])
def test_an_encoder_with_dropout_is_scored_as_it_sampled(tiny_model_config, tmp_path, server, train_text):
    """A checkpoint whose MiniLM was pretrained with model.text.train (so not 'frozen', and its 0.1 dropout live in
    train mode): the learner must re-score the rollouts' actions under the encoder the rollouts used, without
    dropout, whether or not GRPO trains the text. In train mode the first on-policy ratio was off by ~2.5e-4."""
    from proxmodel.config import TextConfig
    from proxmodel.model import ProxT2I

    torch.manual_seed(0)
    cfg = tiny_model_config.model_copy(update={"text": TextConfig(**{**tiny_model_config.text.model_dump(),
                                                                     "pretrained": "minilm", "train": True})})
    path = str(save_model(ProxT2I(cfg), tmp_path / "c"))
    run = f"dropout-{train_text}"
    write_batch(path, server.address, run, steps=STEPS, group_size=G)
    metrics = make_learner(path, server, run, recompute="group", train_text=train_text).train(0, len(PROMPTS))
    assert metrics["ratio_max_dev"] == 0.0 and metrics["acked"] == len(PROMPTS)


def test_train_modules_moves_only_the_named_weights_and_stays_on_policy(checkpoint, server):
    """grpo.train_modules: one real update changes the cross-attention's keys and values (full rank) and no other
    weight, the text encoder included, and the first ratio is still exactly 1. Would catch: the option not reaching
    the learner (every weight moves), a suffix match that also takes the self-attention's to_k (attn1), or freezing
    that leaves the named weights out of the optimiser (nothing moves)."""
    write_batch(checkpoint, server.address, "modules", steps=STEPS, group_size=G)
    learner = make_learner(checkpoint, server, "modules", recompute="group", train_modules=["attn2.to_k", "attn2.to_v"])
    before = {k: v.clone() for k, v in learner.publish()[0].items()}
    metrics = learner.train(0, len(PROMPTS))
    after = learner.publish()[0]
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    named = {k for k in before if ".attn2.to_k." in k or ".attn2.to_v." in k}
    assert named and moved == named
    assert metrics["ratio_max_dev"] == 0.0 and metrics["acked"] == len(PROMPTS)


def test_train_modules_naming_no_module_is_refused(checkpoint):
    from proxmodel.lora import train_only
    from proxmodel.model import load_model

    with pytest.raises(ValueError, match=r"\['attn2.to_kk'\] name no module"):
        train_only(load_model(checkpoint), ["attn2.to_k", "attn2.to_kk"])


def _peek(server, run_id):
    """Every group of a run's stream, read through a consumer group of its own (the learner's stay unread)."""
    peek = ExperienceStream(server.address, run_id, group="peek")
    peek.create()
    return [group for _, group in peek.read("peek", len(PROMPTS), 5.0)]


@pytest.mark.parametrize("sign", [1, -1])
def test_one_update_makes_the_better_actions_of_each_group_more_likely(checkpoint, server, sign):
    """After one optimiser step the recorded actions, weighted by their group-relative advantage, are more likely:
    sum A (log pi_new - log pi_old) > 0 over the trained groups, for rewards and for the same rewards negated (so a
    learner moving one fixed way whatever the rewards fails one of the two). A group of equal rewards is dropped,
    so the others' advantages must stay with their own groups. Would catch a sign flip of the loss or advantages
    (advantages shifted onto the wrong groups can leave the sum positive: the next-but-one tests pin them)."""
    run_id = f"direction{sign}"
    rewards = [sign * torch.rand(G, generator=torch.Generator().manual_seed(i)) for i in range(len(PROMPTS))]
    rewards[1] = torch.full((G,), 0.5)
    write_batch(checkpoint, server.address, run_id, steps=STEPS, group_size=G, rewards=rewards)
    groups = _peek(server, run_id)
    learner = make_learner(checkpoint, server, run_id, recompute="group", lr=1e-4)
    assert learner.train(0, len(PROMPTS))["groups_trained"] == len(PROMPTS) - 1
    model, surrogate = learner.engine.module, 0.0
    with torch.no_grad():
        for group in groups:
            r = group.scores["compositional"]
            if float(r.std()) == 0:
                continue
            advantages = (r - r.mean()) / r.std()
            condition = {"tokens": model.tokenize([group.prompt] * G)}
            for j in range(STEPS - 1):
                new = learner.policy.transition(model, condition, group.states, j).log_prob
                surrogate += float((advantages * (new - group.log_probs[:, j])).sum())
    assert surrogate > 0, surrogate


def test_stale_groups_are_acknowledged_untrained_and_leave_the_weights(checkpoint, server):
    """Groups sampled by a policy more than grpo.max_staleness versions old are not trained on. Would catch the
    staleness bound dropped (the end-to-end runs never produce such a group)."""
    write_batch(checkpoint, server.address, "stale", steps=STEPS, group_size=G)  # sampled by version 0
    learner = make_learner(checkpoint, server, "stale", max_staleness=1)
    learner.version = 2
    before = {k: v.clone() for k, v in learner.publish()[0].items()}
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["groups_trained"] == 0 and metrics["groups_stale"] == len(PROMPTS)
    assert learner.stream.pending() == 0
    assert all(torch.equal(before[k], v) for k, v in learner.publish()[0].items())


def test_entries_stay_unacknowledged_when_the_update_fails(checkpoint, server, monkeypatch):
    """A learner that dies mid-update must leave its batch on the stream for the resumed run. Would catch the
    acknowledgement moved before the optimiser step."""
    from learner import engine as engine_module

    write_batch(checkpoint, server.address, "fails", steps=STEPS, group_size=G)
    rank = make_learner(checkpoint, server, "fails")

    def broken(*args, **kwargs):
        raise RuntimeError("the update failed")

    monkeypatch.setattr(engine_module, "train_step", broken)
    with pytest.raises(RuntimeError, match="the update failed"):
        rank.train(0, len(PROMPTS))
    assert rank.stream.pending() == len(PROMPTS)


def test_a_copy_inside_the_same_batch_is_trained_once(checkpoint, server):
    """A retried XADD lands right after its original, inside the batch being read. Would catch duplicates recognised
    only across reads (the copy trained twice, another group left for the next batch)."""
    write_batch(checkpoint, server.address, "dup-in", steps=STEPS, group_size=G, order=[0])  # group 0 only
    stream = ExperienceStream(server.address, "dup-in")
    first = stream.client.xrange(stream.key, count=1)[0][1]
    stream.client.xadd(stream.key, first)
    write_batch(checkpoint, server.address, "dup-in", steps=STEPS, group_size=G, order=[1, 2, 3])
    learner = make_learner(checkpoint, server, "dup-in")
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["groups_trained"] == len(PROMPTS) and learner.stream.duplicates == 1
    assert learner.stream.pending() == 0


def _kl_to(reference, rank, groups) -> float:
    """The policy's closed-form KL to `reference`, summed over the trained transitions, on the groups' states."""
    from learner.grpo_learner import TrainGroup, transition_loss

    batch = [TrainGroup.of(group, torch.zeros(G), rank.model, rank.device) for group in groups]
    with torch.no_grad():
        return sum(float(transition_loss(rank.engine.module, reference, rank.policy, batch, j, 1e-3, 1.0)[1]["kl"])
                   for j in range(STEPS - 1))


@pytest.mark.parametrize("kl_coef", [0.0, 0.5])
def test_the_kl_term_pulls_a_moved_policy_back_to_its_reference(checkpoint, server, kl_coef):
    """Equal rewards (no policy-gradient signal) and a policy moved off its start: with kl_coef > 0 the update
    brings it closer to the start, with 0 it stays. Would catch the KL's sign flipped (pushed away) or its gradient
    lost (detached), which the metric alone (computed before each step) does not show."""
    from proxmodel.model import load_model

    run_id = f"klpull{kl_coef}"
    write_batch(checkpoint, server.address, run_id, steps=STEPS, group_size=G, rewards=[torch.full((G,), 0.5)] * 4)
    groups = _peek(server, run_id)
    rank = make_learner(checkpoint, server, run_id, zero_stage=0, kl_coef=kl_coef, drop_zero_std_groups=False,
                        updates_per_batch=3, recompute="group")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in rank.engine.module.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    reference = load_model(checkpoint).eval()
    before = _kl_to(reference, rank, groups)
    rank.train(0, len(PROMPTS))
    after = _kl_to(reference, rank, groups)
    assert before > 0
    assert (after < 0.9 * before) if kl_coef else (after == before), (before, after)


@pytest.mark.parametrize("opts", [
    dict(advantage_std="prompt", prompt_stats_min_count=2, train_step_fraction=0.5, recompute="group", max_staleness=5),
    dict(objective="forward", forward_pairs=2, data_anchor=0.5, data_anchor_batch=4),
], ids=["policy_gradient", "forward"])
def test_a_learner_restored_from_its_state_trains_the_next_batch_as_if_never_stopped(checkpoint, server, opts):
    """Per-prompt running statistics (the same prompts in both batches) and a random half of the transitions: the
    second update depends on the PromptStats and the step RNG after the first; the forward objective's pairs and
    the data anchor draw from the rank's noise RNG. Would catch any of them left out of the run state (the
    end-to-end resume runs use group statistics and every transition, where neither matters)."""
    for run_id in ("res-a", "res-b"):  # the same two batches on two streams
        for iteration in (0, 1):
            write_batch(checkpoint, server.address, f"{run_id}-{opts.get('objective')}", steps=STEPS, group_size=G,
                        iteration=iteration, seed=iteration, version=iteration)
    straight = make_learner(checkpoint, server, f"res-a-{opts.get('objective')}", **opts)
    straight.train(0, len(PROMPTS))
    straight.train(1, len(PROMPTS))
    first = make_learner(checkpoint, server, f"res-b-{opts.get('objective')}", **opts)
    first.train(0, len(PROMPTS))
    state = first.save_state()
    restored = make_learner(checkpoint, server, f"res-b-{opts.get('objective')}", **opts)
    assert restored.load_state(state) == 1
    metrics = restored.train(1, len(PROMPTS))
    assert metrics["groups_trained"] == len(PROMPTS)
    expected, got = straight.publish()[0], restored.publish()[0]
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("space", ["eps", "x0"])
def test_the_data_anchor_is_pretrainings_loss_in_its_loss_space(tiny_model, space):
    """The anchor claims to be pretraining's last stage: with pretrain.loss_space x0 that is proximal matching on the
    x0-scaled residuals, which differs (proximal matching is not quadratic) from the eps-space value it gave."""
    from learner.anchor import DataAnchor
    from learner.config import load_config
    from learner.data import drop_captions
    from proxmodel.losses import make_training_pairs, proximal_matching_loss, x0_loss_scale
    from proxmodel.schedule import VPSchedule
    from tests.cli import SMOKE

    cfg = load_config(SMOKE, ["grpo.data_anchor=0.5", f"pretrain.loss_space={space}"])
    model = tiny_model.eval()
    anchor = DataAnchor(cfg, model)
    with torch.no_grad():
        got = anchor.loss(model, model, 3, torch.Generator().manual_seed(7), torch.device("cpu"))
        gen = torch.Generator().manual_seed(7)  # by hand: step 3's batch, the same draws in the same order
        images, captions = anchor.source.batch(cfg.data.cursor + 3 * anchor.batch, anchor.batch)
        tokens = model.tokenize(drop_captions(captions, cfg.pretrain.cfg_dropout, gen))
        y, t, lam, xi = make_training_pairs(model.encode_images(images), VPSchedule(), anchor.steps, gen,
                                            anchor.variants, target=cfg.pretrain.target)
        eps = model(y, t, lam, tokens=tokens)
        scale = x0_loss_scale(t, lam, VPSchedule()).view(-1, 1, 1, 1) if space == "x0" else 1.0
        expected = 0.5 * proximal_matching_loss(eps * scale, xi * scale, cfg.pretrain.zeta0 / 2)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def capture_advantages(monkeypatch):
    """(prompt, advantages) of every group the learner puts in its batch."""
    import learner.grpo_learner as gl

    seen, original = [], gl.TrainGroup.of.__func__

    def of(cls, group, advantages, model, device):
        seen.append((group.prompt, advantages.detach().cpu().clone()))
        return original(cls, group, advantages, model, device)

    monkeypatch.setattr(gl.TrainGroup, "of", classmethod(of))
    return seen


def test_each_trained_group_carries_its_own_advantages(checkpoint, server, monkeypatch):
    """Would catch advantages attached by position among the kept groups rather than by group index."""
    rewards = [torch.rand(G, generator=torch.Generator().manual_seed(i)) for i in range(len(PROMPTS))]
    rewards[1] = torch.full((G,), 0.5)  # dropped: the groups after it shift by one if matched by position
    write_batch(checkpoint, server.address, "own-adv", steps=STEPS, group_size=G, rewards=rewards)
    seen = capture_advantages(monkeypatch)
    make_learner(checkpoint, server, "own-adv").train(0, len(PROMPTS))
    expected = {p: group_advantages(r, 1e-4) for p, r in zip(PROMPTS, rewards)}
    assert [p for p, _ in seen] == [PROMPTS[i] for i in (0, 2, 3)]
    for prompt, adv in seen:
        assert torch.allclose(adv, expected[prompt], atol=1e-6), prompt


def test_adv_clip_reaches_the_learner(checkpoint, server, monkeypatch):
    """Would catch grpo.adv_clip accepted by the config and dropped before compute_advantages."""
    rewards = [torch.tensor([1.0, 0.0, 0.0, 0.0])] * len(PROMPTS)  # |A| = sqrt(3) for the outlier
    write_batch(checkpoint, server.address, "adv-clip", steps=STEPS, group_size=G, rewards=rewards)
    seen = capture_advantages(monkeypatch)
    make_learner(checkpoint, server, "adv-clip", adv_clip=0.5).train(0, len(PROMPTS))
    assert seen and max(float(a.abs().max()) for _, a in seen) == pytest.approx(0.5)


def test_a_group_with_one_nonfinite_reward_is_dropped(checkpoint, server):
    """Would catch the non-finite filter reduced with any() instead of all()."""
    from actors.rollout import RolloutActor

    actor = RolloutActor(checkpoint, STEPS, G, 1.0, 1.0, [], WEIGHTS, 1.0, 0, server.address, "nan1", torch_threads=1)

    class OneNaN:
        def score(self, images, prompts, names):
            s = torch.rand(len(prompts))
            s[1] = float("nan")  # one image of the first group
            return {"compositional": s}

    actor.rewards = OneNaN()
    ExperienceStream(server.address, "nan1").create()
    out = actor.rollout(PROMPTS[:2], [0, 1], iteration=0, seed=0)
    assert out["groups"] == 1 and out["dropped"] == 1


def test_each_prompt_and_iteration_gets_its_own_noise(checkpoint, server):
    """Would catch a group's noise does not depend on its prompt index."""
    from actors.rollout import RolloutActor

    actor = RolloutActor(checkpoint, STEPS, G, 1.0, 1.0, [], WEIGHTS, 1.0, 0, server.address, "noise", torch_threads=1)
    p = PROMPTS[0]
    a, b = actor.sample([p, p], [0, 1], 0, 0)
    c, = actor.sample([p], [0], 1, 0)
    again, = actor.sample([p], [0], 0, 0)
    assert not torch.equal(a.states[:, 0], b.states[:, 0])  # prompt index
    assert not torch.equal(a.states[:, 0], c.states[:, 0])  # iteration
    assert torch.equal(a.states, again.states)  # reproducible


def test_update_statistics_report_the_worst_deviation_and_the_mean_of_the_rest():
    """The statistics stay tensors through a pass and are reduced once: the ratio's worst deviation and the largest
    |log-ratio| must stay maxima (a mean would hide one transition that left the trust region), the rest means."""
    sums: dict = {}
    for dev, kl in ((0.5, 1.0), (0.1, 3.0), (0.0, 2.0)):
        collect(sums, {"ratio_max_dev": torch.tensor(dev), "log_ratio_abs_max": torch.tensor(dev / 2), "kl": kl})
    out = reduce_stats(sums)
    assert out == pytest.approx({"ratio_max_dev": 0.5, "log_ratio_abs_max": 0.25, "kl": 2.0})
    assert all(isinstance(v, float) for v in out.values()) and reduce_stats({}) == {}


def test_each_rank_draws_its_own_pair_and_anchor_noise(checkpoint, server):
    """Ranks train different groups; noise from one stream seeded alike on every rank (as it was) drew the same
    pairs on each, correlating estimates the gradient average treats as independent."""
    draws = [torch.randn(64, generator=rank_generator(0, rank)) for rank in range(3)]
    assert all(not torch.allclose(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])
    assert torch.randn(2, generator=rank_generator(2**62, 1)).isfinite().all()  # any seed the config allows
    write_batch(checkpoint, server.address, "own-noise", steps=STEPS, group_size=G)
    learner = make_learner(checkpoint, server, "own-noise", objective="forward", data_anchor=0.5, data_anchor_batch=4)
    noise, step = learner.noise_rng.get_state(), learner.step_rng.get_state()
    assert torch.equal(noise, rank_generator(0, 0).get_state())  # the learner of rank 0 holds rank 0's stream
    learner.train(0, len(PROMPTS))
    # The pairs and the anchor drew from the rank's own stream, and nothing from the one shared by every rank.
    assert not torch.equal(learner.noise_rng.get_state(), noise) and torch.equal(learner.step_rng.get_state(), step)


def test_a_single_informative_group_is_trained_alone(checkpoint, server):
    """drop_zero_std_groups keeps the informative groups whenever there are enough for every rank: one rank and one
    group with a reward spread is enough; the logged reward_std is the batch's population std, as the advantages use.
    Would catch the 'enough' bound off by one (more than world instead of at least world: three groups of all-zero
    advantages trained, diluting the batch's statistics) or reward_std logged as the sample std."""
    flat = torch.full((G,), 0.5)
    rewards = [flat, torch.tensor([0.0, 1.0, 0.5, 0.25]), flat, flat]
    write_batch(checkpoint, server.address, "one-informative", steps=STEPS, group_size=G, rewards=rewards)
    metrics = make_learner(checkpoint, server, "one-informative").train(0, len(PROMPTS))
    assert metrics["groups"] == 4 and metrics["groups_trained"] == 1
    assert metrics["reward_std"] == pytest.approx(float(torch.stack(rewards).std(unbiased=False)))


def test_the_first_pass_deviation_is_reported_as_the_worst_one():
    """first_pass_log_ratio_max says how far the learner's function is from the rollout's before any step: a mean
    over the pass's transitions would hide the one that is off. Would catch it left out of MAX_STATS."""
    sums: dict = {}
    for value in (0.0, 0.3, 0.0):
        collect(sums, {"first_pass_log_ratio_max": torch.tensor(value), "first_pass_log_ratio_mean": value / 2})
    assert reduce_stats(sums) == pytest.approx({"first_pass_log_ratio_max": 0.3, "first_pass_log_ratio_mean": 0.05})


def test_each_rank_anchors_on_its_own_slice_of_the_data(tiny_model):
    """grpo.data_anchor: rank r of W takes samples cursor + (step W + r) b .. + b of the data stream, so ranks see
    different data and a resumed run the same. Would catch the rank left out of the offset (every rank anchoring on
    the same batch) or the cursor ignored (a resumed run replaying the data from its start)."""
    from learner.anchor import DataAnchor
    from learner.config import load_config
    from tests.cli import SMOKE

    cfg = load_config(SMOKE, ["grpo.data_anchor=0.5", "data.cursor=11"])
    model = tiny_model.eval()
    anchors = [DataAnchor(cfg, model, rank=r, world=2) for r in range(2)]

    class Recording:  # the data stream, noting where each batch it serves starts
        def __init__(self, source):
            self.source, self.firsts = source, []

        def batch(self, first, n):
            self.firsts.append(first)
            return self.source.batch(first, n)

    firsts = []
    for anchor in anchors:
        anchor.source = Recording(anchor.source)
        with torch.no_grad():
            anchor.loss(model, model, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
        firsts += anchor.source.firsts
    b = anchors[0].batch
    assert firsts == [11 + (3 * 2 + 0) * b, 11 + (3 * 2 + 1) * b]


def test_the_kl_enters_the_loss_times_its_coefficient(checkpoint, server):
    """transition_loss adds kl_coef x the closed-form KL to the reference: the loss's excess over the coefficient-0
    loss is linear in grpo.kl_coef. Would catch the coefficient ignored (every kl_coef acting as 1)."""
    from learner.grpo_learner import TrainGroup, transition_loss
    from proxmodel.model import load_model

    write_batch(checkpoint, server.address, "klcoef", steps=STEPS, group_size=G)
    model, reference = load_model(checkpoint).eval(), load_model(checkpoint).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    groups = _peek(server, "klcoef")
    batch = [TrainGroup.of(g, torch.randn(G, generator=gen), model, torch.device("cpu")) for g in groups]
    policy = Policy.of(model, STEPS)
    with torch.no_grad():
        plain, stats = transition_loss(model, reference, policy, batch, 0, 1e-3, 0.0)
        for coef in (0.5, 3.0):
            loss, _ = transition_loss(model, reference, policy, batch, 0, 1e-3, coef)
            assert float(loss - plain) == pytest.approx(coef * float(stats["kl"]), rel=1e-4)
    assert float(stats["kl"]) > 0


def test_advantage_std_and_eps_reach_the_learner(checkpoint, server, monkeypatch):
    """grpo.advantage_std=global normalises by one std over the batch (groups' means still subtracted): a group with
    a small spread keeps small advantages; grpo.adv_eps is added to that std. Would catch either option accepted by
    the config and dropped before compute_advantages (every group scaled to unit std, or the default eps used)."""
    rewards = [torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 0.1, 0.0, 0.1])] * 2
    write_batch(checkpoint, server.address, "adv-std", steps=STEPS, group_size=G, rewards=rewards)
    seen = capture_advantages(monkeypatch)
    make_learner(checkpoint, server, "adv-std", advantage_std="global", adv_eps=0.25).train(0, len(PROMPTS))
    seen = dict(seen)
    total = torch.stack(rewards)
    expected = (total - total.mean(1, keepdim=True)) / (total.std(unbiased=False) + 0.25)
    for prompt, row in zip(PROMPTS, expected):
        assert torch.allclose(seen[prompt], row, atol=1e-5), prompt


def test_direct_objective_keeps_flat_groups_beside_informative_ones(checkpoint, server):
    """The direct objective trains on the reward's pixel gradient, which every image has, so a group whose verifier
    rewards are all equal is trained even when other groups in the batch differ (with every group flat, the
    zero-std filter falls back to all of them and cannot tell). Would catch drop_zero_std_groups applied to direct
    runs."""
    flat = torch.full((G,), 0.5)
    rewards = [flat, torch.tensor([0.0, 1.0, 0.5, 0.25]), flat, flat]
    write_batch(checkpoint, server.address, "dr-mixed", steps=STEPS, group_size=G, rewards=rewards)
    learner = make_learner(checkpoint, server, "dr-mixed", objective="direct", direct_steps=1)
    assert learner.train(0, len(PROMPTS))["groups_trained"] == len(PROMPTS)


def test_the_forward_learners_default_scale_makes_a_lone_success_fully_positive(checkpoint, server, monkeypatch):
    """With forward_adv_scale unset the learner scales advantages by sqrt(G - 1), the largest |A| a group-std
    advantage can take: the one success of a group gets r = 1 (all of its loss on the positive policy) and its
    failures r = 1/3, nothing clipped. Would catch another default (sqrt(G): r = 0.93, a weaker update for the same
    evidence)."""
    from learner.forward_objective import ForwardBatch

    seen, build = [], ForwardBatch.build.__func__

    def capture(cls, *args, **kwargs):
        batch = build(cls, *args, **kwargs)
        seen.append(batch.r)
        return batch

    monkeypatch.setattr(ForwardBatch, "build", classmethod(capture))
    rewards = [torch.tensor([1.0, 0.0, 0.0, 0.0])] * len(PROMPTS)
    write_batch(checkpoint, server.address, "fwd-scale", steps=STEPS, group_size=G, rewards=rewards)
    make_learner(checkpoint, server, "fwd-scale", objective="forward").train(0, len(PROMPTS))
    assert seen and torch.allclose(seen[0].view(-1, G), torch.tensor([[1.0, 1 / 3, 1 / 3, 1 / 3]]), atol=1e-3)


def test_reward_aggregation_reaches_the_learner(checkpoint, server, monkeypatch):
    """grpo.reward_aggregation=advantage normalises each reward within its group before the weighted sum: a reward
    constant in a group adds nothing, and each varying one adds weight x its unit-std advantage. Would catch the
    option accepted by the config and dropped before compute_advantages (the weighted sum normalised instead)."""
    write_batch(checkpoint, server.address, "aggr-src", steps=STEPS, group_size=G)
    weights = {"compositional": 1.0, "jpeg_compressibility": 0.5}
    first = torch.tensor([0.0, 1.0, 0.0, 1.0])
    second = [torch.tensor([0.0, 0.0, 0.3, 0.9]), torch.full((G,), 0.2)] * 2
    stream = ExperienceStream(server.address, "aggr")
    stream.create()
    for group, b in zip(_peek(server, "aggr-src"), second):
        stream.add(replace(group, scores={"compositional": first, "jpeg_compressibility": b}, weights=weights))
    cfg = RunConfig.model_validate({
        "grpo": {"steps": STEPS, "group_size": G, "prompts_per_iteration": len(PROMPTS), "lr": 1e-3,
                 "reward_aggregation": "advantage"},
        "rewards": [{"name": name, "weight": w} for name, w in weights.items()],
        "actors": {"torch_threads": 1}, "deepspeed": {"zero_stage": 2},
    })
    seen = capture_advantages(monkeypatch)
    GrpoLearner(checkpoint, cfg.model_dump_json(), server.address, "aggr").train(0, len(PROMPTS))
    seen = dict(seen)
    for prompt, b in zip(PROMPTS, second):
        expected = group_advantages(first, 1e-4) + 0.5 * group_advantages(b, 1e-4)
        assert torch.allclose(seen[prompt], expected, atol=1e-5), prompt


class RandomScores:
    """The reward client's place in a rollout actor of this process: random scores for the rewards asked."""

    def score(self, images, prompts, names):
        return {name: torch.rand(len(prompts)) for name in names}


def test_a_rollout_streams_groups_tagged_with_the_weights_that_sampled_them(checkpoint, server):
    """The learner skips a group sampled by weights older than it allows (stale): a group must carry the version of
    the weights it was sampled with. Would catch the version not kept by set_weights or not written into the group,
    and a forward-objective actor (keep_trajectory=False) sending the trajectories all the same."""
    from actors.rollout import RolloutActor

    actor = RolloutActor(checkpoint, STEPS, G, 1.0, 1.0, [], WEIGHTS, 1.0, 0, server.address, "tagged",
                         torch_threads=1, keep_trajectory=False)
    actor.rewards = RandomScores()
    stream = ExperienceStream(server.address, "tagged")
    stream.create()
    assert actor.set_weights(actor.model.state_dict(), 3) == 3
    assert actor.rollout(PROMPTS[:2], [0, 1], iteration=0, seed=0)["policy_version"] == 3
    groups = [group for _, group in stream.read("rank0", 2, 5)]
    assert [g.policy_version for g in groups] == [3, 3] and not any(g.has_trajectory for g in groups)


def test_held_out_images_are_the_first_seeds_rounded_to_eight_bits(checkpoint, server):
    """evaluate returns the images of its first seed (grids and the between-prompt diversity compare them across
    evaluations). Would catch the last seed's images returned, and values truncated instead of rounded."""
    from actors.rollout import RolloutActor
    from proxmodel.generate import generate

    actor = RolloutActor(checkpoint, STEPS, G, 1.0, 1.0, [], WEIGHTS, 1.0, 0, server.address, "held-out",
                         torch_threads=1)
    actor.rewards = RandomScores()
    out = actor.evaluate(PROMPTS[:2], STEPS, [5, 6], 1.0, "hybrid", 1.0, ["compositional"])
    first = generate(actor.model, PROMPTS[:2], STEPS, 5, 1.0, "hybrid", 1.0).float()
    assert torch.equal(out["images"], (first * 255).round().to(torch.uint8))
    assert out["scores"]["compositional"].shape == (2, 2)


def test_the_drift_monitor_measures_against_the_starting_weights(checkpoint, server):
    """kl_ref compares the current weights with those the actor started from. Would catch the reference being the
    live model (drift always 0, a hacked run never flagged)."""
    from actors.rollout import RolloutActor

    actor = RolloutActor(checkpoint, STEPS, G, 1.0, 1.0, [], WEIGHTS, 1.0, 0, server.address, "drift",
                         torch_threads=1)
    assert actor.monitors(PROMPTS[:1], STEPS, 0, 1.0, 2, 1.0)["kl_ref"] == pytest.approx(0.0, abs=1e-9)
    moved = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in actor.model.state_dict().items()}
    actor.set_weights(moved, 1)
    assert actor.monitors(PROMPTS[:1], STEPS, 0, 1.0, 2, 1.0)["kl_ref"] > 1e-6


def test_a_group_with_a_nonfinite_score_of_any_reward_is_dropped(checkpoint, server):
    """Would catch only the first weighted reward checked for non-finite scores (a NaN of a second reward reaching
    the learner's advantages)."""
    from actors.rollout import RolloutActor

    weights = {"compositional": 0.5, "jpeg_compressibility": 0.5}
    actor = RolloutActor(checkpoint, STEPS, G, 1.0, 1.0, [], weights, 1.0, 0, server.address, "nan2", torch_threads=1)

    class SecondNaN:
        def score(self, images, prompts, names):
            second = torch.rand(len(prompts))
            second[G] = float("nan")  # one image of the second group, in the second reward only
            return {"compositional": torch.rand(len(prompts)), "jpeg_compressibility": second}

    actor.rewards = SecondNaN()
    ExperienceStream(server.address, "nan2").create()
    out = actor.rollout(PROMPTS[:2], [0, 1], iteration=0, seed=0)
    assert out["groups"] == 1 and out["dropped"] == 1
