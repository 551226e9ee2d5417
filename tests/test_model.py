import pytest
import torch

from proxmodel.losses import LossSchedule, make_training_pairs, proximal_matching_loss
from proxmodel.model import load_model, save_model
from proxmodel.schedule import VPSchedule


def test_save_load_round_trip_is_exact(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.cfg == tiny_model.cfg
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_missing_and_corrupt_checkpoints_say_what_to_do(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    save_model(tiny_model, tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not be read"):
        load_model(tmp_path / "c")


def test_prox_parameterisation_and_loss_schedule():
    sched = LossSchedule(total_steps=90, l1_frac=1 / 3, zeta0=2.0)
    assert [sched.stage(s) for s in (0, 29, 30, 59, 60, 89)] == [
        ("l1", 0.0), ("l1", 0.0), ("pm", 2.0), ("pm", 2.0), ("pm", 1.0), ("pm", 1.0)]
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1
    y, t, lam, xi = make_training_pairs(x0, VPSchedule(), [5], torch.Generator().manual_seed(0))
    alpha = VPSchedule().alpha(t).view(-1, 1, 1, 1)
    # y - sqrt(lam) xi is exactly x_t, whose mean given x0 is sqrt(alpha) x0: the eps target recovers the prox target.
    x_t = y - lam.sqrt().view(-1, 1, 1, 1) * xi
    noisy = t > 0  # at t = 0 the target is the data itself
    assert torch.allclose(x_t[~noisy], x0[~noisy], atol=1e-6)
    resid = ((x_t - alpha.sqrt() * x0) / (1 - alpha).sqrt())[noisy]
    assert abs(float(resid.mean())) < 0.1 and abs(float(resid.std()) - 1) < 0.1
    # Proximal matching is bounded in [0, 1) and zero only at a perfect match.
    assert float(proximal_matching_loss(xi, xi, 0.5)) == 0.0
    assert 0.0 < float(proximal_matching_loss(xi + 10, xi, 0.5)) <= 1.0
