"""EMA of the pretraining weights through a real DeepSpeed engine: arithmetic, export, caption dropout."""

import math

import pytest
import torch

from learner.ema import make_ema, update_ema, warmed_decay
from learner.engine import build_engine, full_state_dict, init_distributed
from learner.data import drop_captions
from learner.pretrain import export
from proxmodel.model import ProxT2I, load_model

DECAY = 0.9


def _engine(model, zero_stage: int = 2):
    init_distributed()
    return build_engine(model, lr=0.05, weight_decay=0.0, grad_clip=1.0, zero_stage=zero_stage, bf16=False,
                        micro_batch=4)


def _train_step(engine, model_input):
    loss = engine(model_input).pow(2).mean()
    engine.backward(loss)
    engine.step()


@pytest.mark.parametrize("zero_stage", [2, 3])  # ZeRO-3 shards the live weights; the average stays whole
def test_ema_follows_the_closed_form_through_deepspeed_steps(zero_stage):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 2))
    ema = make_ema(model, DECAY)
    engine = _engine(model, zero_stage)
    history = []
    for _ in range(5):
        _train_step(engine, torch.randn(4, 3))
        update_ema(ema, engine)
        history.append(full_state_dict(engine))
    # e_1 = p_1, e_k = d_k e_{k-1} + (1 - d_k) p_k  =>  e_K = sum_k w_k p_k with w_1 = prod_{j=2..K} d_j and
    # w_k = (1 - d_k) prod_{j=k+1..K} d_j; d_k = min(decay, k / (k + 9)) = 2/11, 3/12, 4/13, 5/14 here.
    last = len(history)
    d = {k: min(DECAY, k / (k + 9)) for k in range(2, last + 1)}
    assert [warmed_decay(DECAY, k - 1) for k in d] == list(d.values())
    weights = [math.prod(d[j] for j in range(2, last + 1))]
    weights += [(1 - d[k]) * math.prod(d[j] for j in range(k + 1, last + 1)) for k in range(2, last + 1)]
    assert sum(weights) == pytest.approx(1.0)
    for name, averaged in ema.module.state_dict().items():
        expected = sum(w * p[name] for w, p in zip(weights, history))
        assert torch.allclose(averaged, expected, atol=1e-6), name
        assert not torch.allclose(averaged, history[-1][name])  # it lags the live weights
    assert int(ema.n_averaged) == last


def test_ema_off_and_bf16_parameters():
    assert make_ema(torch.nn.Linear(2, 2), 0.0) is None
    live = torch.nn.Linear(2, 2)
    ema = make_ema(live, 0.5)
    ema.update_parameters(live)
    ema.update_parameters(live.to(torch.bfloat16))  # d_2 = min(0.5, 2/11)  # DeepSpeed bf16 keeps bf16 weights; the average stays fp32
    assert ema.module.weight.dtype == torch.float32
    assert torch.allclose(ema.module.weight, live.weight.float(), atol=1e-2)


def test_exported_checkpoint_holds_the_ema_weights(tiny_model_config, tmp_path):
    torch.manual_seed(0)
    model = ProxT2I(tiny_model_config)
    ema = make_ema(model, DECAY)
    engine = _engine(model)
    tokens = model.tokenize(["a small red circle"] * 4)
    for _ in range(3):
        y, t = torch.randn(4, 3, 8, 8), torch.rand(4)
        loss = engine(y, t, t, tokens=tokens).pow(2).mean()
        engine.backward(loss)
        engine.step()
        update_ema(ema, engine)
    path = export(engine, ema, DECAY, tmp_path / "checkpoint")
    loaded = load_model(path).state_dict()
    live = engine.module.state_dict()
    moved = 0
    for name, averaged in ema.module.state_dict().items():
        assert torch.equal(loaded[name], averaged), name
        moved += not torch.equal(loaded[name], live[name])
    assert moved > 0  # the export is the average, not the live weights
    card = (path / "README.md").read_text()  # the model card records the average it holds
    assert "- ema_updates: 3\n" in card and f"- ema_decay: {DECAY}\n" in card


def test_caption_dropout_rate():
    captions = ["a caption"] * 20000
    dropped = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    rate = sum(c == "" for c in dropped) / len(captions)
    assert rate == pytest.approx(0.1, abs=4 * (0.1 * 0.9 / len(captions)) ** 0.5)  # 4 standard errors
    assert set(dropped) == {"", "a caption"}
    assert drop_captions(captions[:50], 0.0, torch.Generator()) == captions[:50]


def test_export_without_ema_under_zero3_writes_the_whole_weights(tiny_model_config, tmp_path):
    torch.manual_seed(0)
    model = ProxT2I(tiny_model_config)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    engine = _engine(model, zero_stage=3)  # from here on the module holds only this rank's (empty) shards
    loaded = load_model(export(engine, None, 0.0, tmp_path / "checkpoint")).state_dict()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
