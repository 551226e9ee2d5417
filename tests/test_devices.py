"""The device boundary: rollouts, the learner's loss and evaluation compute on the model's device, whatever device
their inputs start on (prompts, noise, stream entries: the CPU), and what they send out is on the CPU.

A CPU machine has no second real device, so the model goes on `meta` and the code runs under tests/device_audit.py's
OnDevice: an op mixing devices fails as it would on a GPU, and the network must have run on meta only.
"""

import os

import pytest
import ray
import torch

from actors.experience import Group
from actors.reward import RewardActor
from actors.rollout import RolloutActor
from actors.stream import ExperienceStream
from learner.evaluation import evaluate
from proxmodel.generate import hacking_monitors
from learner.forward_objective import ForwardBatch, forward_loss
from learner.grpo_learner import TrainGroup, transition_loss
from learner.policy_loss import compute_advantages
from proxmodel.model import ProxT2I, save_model
from proxmodel.policy import Policy
from rewards import build
from tests.device_audit import OnDevice
from tests.grpo_batch import PROMPTS, WEIGHTS, write_batch

STEPS, G, GUIDANCE = 3, 2, 2.0


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return str(save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "c"))


def on_meta(model: ProxT2I) -> ProxT2I:
    import copy

    return copy.deepcopy(model).to("meta").eval()


def test_rollout_actor_samples_and_evaluates_on_its_device_and_sends_cpu_results(checkpoint, server):
    env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "TRANSFORMERS_", "MLFLOW_", "DS_", "TOKENIZERS"))}
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})
    try:
        scorer = ray.remote(RewardActor).options(num_cpus=0.5).remote([{"name": "compositional"}], 16, 1)
        actor = RolloutActor(checkpoint, STEPS, G, 1.0, GUIDANCE, [scorer], WEIGHTS, 600.0, 0, server.address, "r",
                             torch_threads=1, device="meta")
        stream = ExperienceStream(server.address, "r")
        stream.create()
        audit = OnDevice()
        with audit:
            result = actor.rollout(PROMPTS[:2], [0, 1], iteration=0, seed=0)
            held_out = actor.evaluate(PROMPTS, STEPS, [5, 6], 1.0, "hybrid", GUIDANCE, ["compositional"])
            monitors = actor.monitors(PROMPTS[:2], STEPS, 0, 1.0, G, GUIDANCE)
    finally:
        ray.shutdown()
    assert audit.network_devices() == {"meta"}
    assert result["groups"] == 2 and result["dropped"] == 0
    # GRPO's evaluation runs here too: images and scores come back on the CPU
    assert held_out["scores"]["compositional"].shape == (len(PROMPTS), 2)
    assert held_out["images"].device.type == "cpu" and held_out["images"].dtype == torch.uint8
    assert held_out["images"].shape[0] == len(PROMPTS)
    assert set(monitors) == {"diversity", "saturation", "kl_ref", "kl_ref_per_transition"}
    for _, group in stream.read("rank0", count=2, timeout_s=5):  # the wire carries CPU tensors
        assert group.states.device.type == "cpu" and group.states.shape[:2] == (G, STEPS)


@pytest.mark.parametrize("kind", ["prox", "score"])
def test_learner_loss_with_guidance_and_kl_runs_on_the_engine_device(checkpoint, server, tiny_model_config, kind):
    torch.manual_seed(0)
    model = ProxT2I(tiny_model_config.model_copy(update={"kind": kind}))
    path = save_model(model, f"{checkpoint}-{kind}")
    write_batch(path, server.address, kind, steps=STEPS, group_size=G, guidance=GUIDANCE)
    entries = ExperienceStream(server.address, kind).read("rank0", count=len(PROMPTS), timeout_s=5)
    groups: list[Group] = [group for _, group in entries]  # on the CPU, as the stream delivers them
    rewards = {"compositional": torch.stack([g.scores["compositional"] for g in groups])}
    advantages = compute_advantages(rewards, WEIGHTS, [g.prompt for g in groups])

    learner, reference = on_meta(model).train(), on_meta(model)
    policy = Policy.of(learner, STEPS, guidance=GUIDANCE)
    audit = OnDevice()
    with audit:
        batch = [TrainGroup.of(g, a, learner, torch.device("meta")) for g, a in zip(groups, advantages)]
        loss, stats = transition_loss(learner, reference, policy, batch, 0, clip_range=1e-3, kl_coef=0.5)
        loss.backward()
    assert loss.device.type == "meta" and "kl" in stats
    assert audit.network_devices() == {"meta"}
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in learner.unet.parameters())


def test_forward_objective_loss_runs_on_the_engine_device(checkpoint, server, tiny_model):
    write_batch(checkpoint, server.address, "fwd", steps=STEPS, group_size=G, trajectory=False)
    entries = ExperienceStream(server.address, "fwd").read("rank0", count=len(PROMPTS), timeout_s=5)
    groups: list[Group] = [group for _, group in entries]
    advantages = compute_advantages({"compositional": torch.stack([g.scores["compositional"] for g in groups])},
                                    WEIGHTS, [g.prompt for g in groups])
    learner, reference = on_meta(tiny_model).train(), on_meta(tiny_model)
    audit = OnDevice()
    with audit:
        batch = [TrainGroup.of(g, a, learner, torch.device("meta")) for g, a in zip(groups, advantages)]
        pairs = ForwardBatch.build(learner, torch.cat([b.samples for b in batch]), torch.cat([b.tokens for b in batch]),
                                   torch.cat([b.advantages for b in batch]), step_candidates=[STEPS],
                                   variants=("hybrid", "flow"), adv_scale=1.0, generator=torch.Generator())
        loss, stats = forward_loss(learner, pairs, 1.0, reference, anchor=0.5)
        loss.backward()
    assert loss.device.type == "meta" and "anchor_mse" in stats
    assert audit.network_devices() == {"meta"}


@pytest.mark.parametrize("kind", ["prox", "score"])
def test_evaluation_runs_on_the_models_device(tiny_model_config, kind):
    torch.manual_seed(0)
    model = on_meta(ProxT2I(tiny_model_config.model_copy(update={"kind": kind})))
    stochastic, deterministic = ("hybrid", "hybrid") if kind == "prox" else ("sde", "ddim")
    audit = OnDevice()
    with audit:
        images, scores = evaluate(model, PROMPTS, STEPS, 0, {"compositional": build("compositional")}, 1.0,
                                  stochastic, GUIDANCE)
        _, det = evaluate(model, PROMPTS, STEPS, 0, {"compositional": build("compositional")}, 0.0, deterministic,
                          GUIDANCE)
        monitors = hacking_monitors(model, model, PROMPTS[:2], STEPS, 0, 1.0, G, GUIDANCE)
    assert images.device.type == "cpu" and images.shape[0] == len(PROMPTS)  # out to the rewards on the CPU
    assert set(scores) == set(det) == {"compositional"}
    assert set(monitors) == {"diversity", "saturation", "kl_ref", "kl_ref_per_transition"}
    assert audit.network_devices() == {"meta"}


def test_an_actor_given_no_gpu_sees_none():
    """Ray >= 2.49 leaves CUDA_VISIBLE_DEVICES unset for an actor with num_gpus=0, so on a GPU node a CPU learner
    rank or reward actor would see every GPU and take cuda:0 (another actor's). The runs' Ray restores the empty
    list (on this CPU machine the variable is the evidence: unset without the setting, empty with it)."""
    from learner.cluster import start_ray
    from learner.config import load_config
    from tests.cli import SMOKE

    ray_, started = start_ray(load_config(SMOKE))
    try:
        @ray_.remote(num_cpus=0.1, num_gpus=0)
        class Probe:
            def visible(self):
                return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available()

        assert ray_.get(Probe.remote().visible.remote()) == ("", False)
    finally:
        if started:
            ray_.shutdown()
