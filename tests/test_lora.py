"""LoRA on the U-Net (grpo.lora): only adapters train and travel, the KL reference is the base, the export is plain."""

import pytest
import torch

from learner.config import LoraSettings, RunConfig
from learner.grpo_learner import GrpoLearner
from proxmodel.lora import LoraSpec, add_lora, adapter_state, is_adapter, load_adapters, merged
from proxmodel.model import load_model, save_model, save_state
from tests.grpo_batch import PROMPTS, write_batch

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, G = 3, 4
SPEC = LoraSettings(rank=2).spec()


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return str(save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "c"))


def inputs(model, batch=3):
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(batch, *model.sample_shape(1)[1:], generator=gen)
    return y, torch.full((batch,), 0.6), torch.full((batch,), 0.1), model.tokenize(["a red circle"] * batch)


def randomise_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_adapters_start_as_the_base_and_are_the_only_trainable_weights(checkpoint):
    base, model = load_model(checkpoint), load_model(checkpoint)
    add_lora(model, SPEC)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(n) for n in trainable)  # the text encoder and the base are frozen
    assert sum(n.startswith("unet.") for n in trainable) == len(trainable)
    with torch.no_grad():
        assert torch.equal(model(*inputs(model)[:3], tokens=inputs(model)[3]), base(*inputs(base)[:3], tokens=inputs(base)[3]))


def test_a_misspelt_target_is_refused_naming_it(checkpoint):
    with pytest.raises(ValueError, match=r"\['to_qq'\]"):
        add_lora(load_model(checkpoint), LoraSpec(2, 2.0, ("to_q", "to_qq")))


def test_merged_export_is_a_plain_model_computing_what_the_adapters_do(checkpoint, tmp_path):
    model = load_model(checkpoint)
    add_lora(model, SPEC)
    randomise_adapters(model)
    y, t, lam, tokens = inputs(model)
    plain = save_state(merged(model).state_dict(), model.cfg, tmp_path / "m")
    reloaded = load_model(plain)  # no adapters needed
    assert not any(is_adapter(k) for k in reloaded.state_dict())
    with torch.no_grad():
        expected, got = model(y, t, lam, tokens=tokens), reloaded(y, t, lam, tokens=tokens)
        base = load_model(checkpoint)(y, t, lam, tokens=tokens)
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapters change the function ...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # ... and the merge keeps the change


def test_adapter_weights_load_only_into_the_same_adapters(checkpoint):
    source, target = load_model(checkpoint), load_model(checkpoint)
    add_lora(source, SPEC)
    randomise_adapters(source)
    with pytest.raises(RuntimeError, match="do not fit"):
        load_adapters(target, adapter_state(source.state_dict()))  # no adapters on the target
    add_lora(target, LoraSettings(rank=2, targets=["to_q"]).spec())
    with pytest.raises(RuntimeError, match="do not fit"):
        load_adapters(target, adapter_state(source.state_dict()))  # adapters elsewhere


def make_learner(checkpoint, server, run_id, **grpo):
    cfg = RunConfig.model_validate({
        "grpo": {"steps": STEPS, "group_size": G, "prompts_per_iteration": len(PROMPTS), "lr": 1e-2,
                 "lora": {"rank": 2}, **grpo},
        "actors": {"torch_threads": 1},
    })
    return GrpoLearner(checkpoint, cfg.model_dump_json(), server.address, run_id)


def test_lora_learner_trains_and_publishes_only_adapters_and_rollouts_stay_on_policy(checkpoint, server):
    write_batch(checkpoint, server.address, "a", steps=STEPS, group_size=G, lora=SPEC)
    # recompute=group: the rollout's shapes, so any log-ratio is the adapters' doing, not kernel rounding
    learner = make_learner(checkpoint, server, "a", kl_coef=0.5, updates_per_batch=2, recompute="group")
    start = {k: v.clone() for k, v in learner.engine.module.state_dict().items()}
    metrics = learner.train(0, len(PROMPTS))
    assert metrics["first_pass_log_ratio_max"] == 0.0  # the rollout's zero-initialised adapters: the base exactly
    assert metrics["kl"] > 0.0  # to the base: adapters off on the second pass's reference
    published, version = learner.publish()
    assert published and all(is_adapter(k) for k in published)
    now = learner.engine.module.state_dict()
    assert all(torch.equal(start[k], now[k]) for k in now if not is_adapter(k))  # the base did not move
    assert any(not torch.equal(start[k], now[k]) for k in published)  # the adapters did
    full = sum(v.numel() for k, v in now.items() if not is_adapter(k))
    assert sum(v.numel() for v in published.values()) < 0.2 * full

    # A rollout actor given only the published adapters samples what the learner scores: the ratio is exactly 1.
    write_batch(checkpoint, server.address, "a", steps=STEPS, group_size=G, lora=SPEC, weights=published, iteration=1,
                seed=1)
    learner.version = 0  # the batch was written as version 0's
    metrics = learner.train(1, len(PROMPTS))
    assert metrics["first_pass_log_ratio_max"] == 0.0


def test_lora_and_train_text_together_are_refused():
    with pytest.raises(ValueError, match="grpo.train_text"):
        RunConfig.model_validate({"grpo": {"lora": {"rank": 4}, "train_text": True}})


@pytest.mark.slow
def test_lora_grpo_run_end_to_end_exports_a_plain_merged_checkpoint(pretrained, store):
    from mlflow.tracking import MlflowClient

    from tests.cli import SMOKE, run_cli, summary_of

    root, uri = store
    summary = summary_of(run_cli(
        "--mode", "grpo", "--config", str(SMOKE), f"run_dir={root / 'lora'}", f"mlflow.tracking_uri={uri}",
        f"init_from={pretrained['checkpoint']}", "grpo.lora.rank=2", "grpo.kl_coef=0.1", "grpo.lr=1e-2",
        "grpo.iterations=2", "grpo.eval_every=1",
    ))
    first_pass = MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "first_pass_log_ratio_max")
    # the rollouts' adapters are the learner's, every iteration (to the batched recomputation's rounding)
    assert len(first_pass) == 2 and max(m.value for m in first_pass) <= 1e-6
    trained, start = load_model(summary["checkpoint"]), load_model(pretrained["checkpoint"])
    assert not any(is_adapter(k) for k in trained.state_dict())
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert changed and all(k.startswith("unet.") for k in changed)  # the adapters merged in; the text encoder kept
