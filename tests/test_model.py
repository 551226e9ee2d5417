import json
import math

import pytest
import torch
from safetensors.torch import save_file

from proxmodel.losses import LossSchedule, conditional_noise, make_training_pairs, proximal_matching_loss
from proxmodel.model import ProxT2I, load_model, save_model
from proxmodel.schedule import VPSchedule


def save_old_layout(model, directory):
    """A checkpoint as ProxRL wrote them before the diffusers layout: config.json + model.safetensors."""
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"),
              metadata={"format": "proxrl"})
    (directory / "config.json").write_text(json.dumps(model.cfg.model_dump(), indent=2))
    return directory


def test_save_load_round_trip_is_exact(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.cfg == tiny_model.cfg
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_missing_and_corrupt_checkpoints_say_what_to_do(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):  # an empty folder: the old layout's files named
        load_model(tmp_path)
    save_model(tiny_model, tmp_path / "c")
    weights = tmp_path / "c" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: the file is named
    with pytest.raises(ValueError, match=f"could not be read.*{weights}.* is not a readable safetensors file"):
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
    # Its value: 1 - exp(-mean squared error / zeta^2) per sample, then the batch mean (a zeta not squared, or a sum
    # over dimensions, changes the effective zeta of the schedule's zeta0 / 2 stage).
    assert float(proximal_matching_loss(xi + 0.5, xi, 0.5)) == pytest.approx(1 - math.exp(-1.0), rel=1e-6)
    pred, target = torch.zeros(2, 1, 2, 2), torch.tensor([[0.2, 0.4, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]]).view(2, 1, 2, 2)
    per_sample = [1 - math.exp(-(0.04 + 0.16) / 4 / 0.09), 1 - math.exp(-0.09 / 0.09)]
    assert float(proximal_matching_loss(pred, target, 0.3)) == pytest.approx(sum(per_sample) / 2, rel=1e-6)


def test_the_conditional_target_keeps_the_regression_and_drops_the_noise_split():
    """E[xi | x0, y] as the eps target: on Gaussian data (x0 ~ N(0, s^2)) the best linear predictor of either target
    from y is the same (so is the MSE minimiser, the exact Gaussian eps), while the conditional target's residual
    variance is only the data's share. Would catch a wrong coefficient (e.g. 1/sqrt of the variance, or alpha for
    sqrt(alpha)): the slopes would differ, or the residual xi - target would correlate with y's noise."""
    g, s = torch.Generator().manual_seed(0), 0.8
    schedule = VPSchedule()
    x0 = s * torch.randn(4096, 1, 8, 8, generator=g)
    for t_value, lam_value in ((0.9, 1.9), (0.5, 1.1), (0.1, 0.3)):
        t, lam = torch.full((4096,), t_value), torch.full((4096,), lam_value)
        alpha = float(schedule.alpha(t[:1]))
        xi_t, xi = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
        n = (1 - alpha) ** 0.5 * xi_t + lam_value**0.5 * xi
        y = alpha**0.5 * x0 + n
        target = conditional_noise(y, x0, t, lam, schedule)
        # E[xi | n] is the projection: what is left is uncorrelated with n, and has the split's variance.
        left = xi - target
        assert abs(float((left * n).mean())) < 0.03
        assert abs(float(left.var()) - (1 - alpha) / (1 - alpha + lam_value)) < 0.03
        # Same regression on y: slope cov(target, y) / var(y) equals the exact Gaussian eps's, sqrt(lam) / (v + lam).
        v = alpha * s * s + 1 - alpha
        exact = lam_value**0.5 / (v + lam_value)
        for name, z in (("noise", xi), ("conditional", target)):
            slope = float((z * y).mean() / (y * y).mean())
            assert abs(slope - exact) < 0.02, (name, t_value, slope, exact)
        # ... and exactly the split's variance less noise around it (total variance: xi - target is orthogonal to
        # every function of (x0, y)).
        split = (1 - alpha) / (1 - alpha + lam_value)
        noise_var, target_var = float((xi - exact * y).var()), float((target - exact * y).var())
        assert abs(noise_var - target_var - split) < 0.03 and target_var < noise_var - 0.2
    # make_training_pairs(target="conditional") is the same draw with this target (what pretraining, the data
    # anchor and the forward objective train on).
    drawn = make_training_pairs(x0, schedule, [5, 10], torch.Generator().manual_seed(1))
    y, t, lam, target = make_training_pairs(x0, schedule, [5, 10], torch.Generator().manual_seed(1),
                                            target="conditional")
    assert all(torch.equal(a, b) for a, b in zip(drawn[:3], (y, t, lam)))
    assert torch.equal(target, conditional_noise(y, x0, t, lam, schedule)) and not torch.equal(target, drawn[3])


def _zero_correction(model):
    """F = 0: the U-Net's last convolution zeroed, so only the parameterisation's fixed part is left."""
    with torch.no_grad():
        model.unet.conv_out.weight.zero_()
        model.unet.conv_out.bias.zero_()
    return model


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_precond_prox_is_the_exact_gaussian_prox_when_the_correction_is_zero(tiny_model_config, sigma_data):
    """With F = 0 the precond prox is v_t / (v_t + lam) y (the prox of N(0, v_t I), v_t = alpha sigma^2 + 1 - alpha)
    for any input, however much noisier than in training; ProxDM's eps form would return y unchanged."""
    from proxmodel.model import ProxT2I, prox_fn

    cfg = tiny_model_config.model_copy(update={"prox_param": "precond", "sigma_data": sigma_data})
    model = _zero_correction(ProxT2I(cfg)).eval()
    b = 6
    y = 7.0 * torch.randn(b, 3, 8, 8)  # far off the training support
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.8, 0.95])
    lam = torch.tensor([0.05, 0.3, 1.0, 2.0, 3.6, 0.5])
    alpha = torch.exp(-(0.1 * t + 0.5 * 19.9 * t * t))  # alpha(t) of the VP schedule, written out
    v = alpha * sigma_data**2 + 1 - alpha
    expected = (v / (v + lam)).view(-1, 1, 1, 1) * y
    tokens = model.tokenize(["a red circle"] * b)
    with torch.no_grad():
        got = prox_fn(model, tokens=tokens)(y, t, lam)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    eps_model = _zero_correction(ProxT2I(cfg.model_copy(update={"prox_param": "eps"}))).eval()
    with torch.no_grad():
        assert torch.equal(prox_fn(eps_model, tokens=tokens)(y, t, lam), y)


def test_precond_correction_is_scaled_to_the_gaussian_residual(tiny_model_config):
    """prox = c_skip y - sqrt(lam v / (v + lam)) F(y / sqrt(v + lam)): checked against a direct call of the U-Net."""
    from proxmodel.model import EMBED_SCALE, ProxT2I, prox_fn

    model = ProxT2I(tiny_model_config.model_copy(update={"prox_param": "precond", "sigma_data": 0.8})).eval()
    b = 3
    y, t, lam = torch.randn(b, 3, 8, 8), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.4, 1.5, 3.0])
    tokens = model.tokenize(["a blue square"] * b)
    alpha = torch.exp(-(0.1 * t + 0.5 * 19.9 * t * t))
    v = (alpha * 0.64 + 1 - alpha).view(-1, 1, 1, 1)
    lv = lam.view(-1, 1, 1, 1)
    with torch.no_grad():
        f = model.unet(y / (v + lv).sqrt(), t * EMBED_SCALE, encoder_hidden_states=model.encode_text(tokens),
                       class_labels=lam * EMBED_SCALE).sample
        got = prox_fn(model, tokens=tokens)(y, t, lam)
    assert torch.allclose(got, v / (v + lv) * y - (lv * v / (v + lv)).sqrt() * f, atol=1e-5)


def test_checkpoints_without_prox_param_load_as_proxdm_eps_and_sample_as_before(tiny_model_config, tmp_path):
    import json

    from proxmodel.model import ProxT2I, prox_fn

    torch.manual_seed(0)
    old = ProxT2I(tiny_model_config.model_copy(update={"prox_param": "eps"})).eval()
    save_old_layout(old, tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("prox_param", "sigma_data", "trained_steps", "trained_variants"):  # as written before they existed
        raw.pop(key)
    (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
    loaded = load_model(tmp_path / "old").eval()
    assert loaded.cfg.prox_param == "eps"
    y, t, lam = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7]), torch.tensor([0.5, 2.0])
    tokens = old.tokenize(["a", "b"])
    with torch.no_grad():
        before, after = prox_fn(old, tokens=tokens)(y, t, lam), prox_fn(loaded, tokens=tokens)(y, t, lam)
        assert torch.equal(before, after)
        # the key matters: the same weights read as precond are another function
        loaded.cfg = loaded.cfg.model_copy(update={"prox_param": "precond"})
        assert not torch.allclose(prox_fn(loaded, tokens=tokens)(y, t, lam), before, atol=1e-3)


def test_position_channels_give_the_unet_each_pixels_place_and_survive_a_round_trip(tiny_model_config, tmp_path):
    """The two extra input channels are the pixel's (x, y), left/top = -1, unscaled by the prox's input scaling;
    a model without the option sees none; the option is part of the checkpoint."""
    from proxmodel.model import ProxT2I

    torch.manual_seed(0)
    model = ProxT2I(tiny_model_config.model_copy(update={"position_channels": True})).eval()
    seen = []
    model.unet.conv_in.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    y = 5.0 * torch.randn(2, 3, 8, 8)
    t, lam = torch.tensor([0.3, 0.7]), torch.tensor([0.1, 0.4])
    tokens = model.tokenize(["a red circle top left", "a blue square"])
    with torch.no_grad():
        out = model(y, t, lam, tokens)
    x_grid, y_grid = seen[0][:, 3], seen[0][:, 4]
    assert seen[0].shape == (2, 5, 8, 8)
    assert torch.allclose(x_grid[:, 0, 0], torch.tensor(-1.0)) and torch.allclose(x_grid[:, 0, -1], torch.tensor(1.0))
    assert torch.allclose(y_grid[:, 0, 0], torch.tensor(-1.0)) and torch.allclose(y_grid[:, -1, 0], torch.tensor(1.0))
    assert torch.equal(x_grid[:, 3], x_grid[:, 5]) and torch.equal(y_grid[:, :, 2], y_grid[:, :, 6])
    # The place is an input: zeroing the grid's weights changes the output (a grid the U-Net ignored would not).
    with torch.no_grad():
        model.unet.conv_in.weight[:, 3:] = 0.0
        assert not torch.allclose(model(y, t, lam, tokens), out)
        model.unet.conv_in.weight[:, 3:] = 1.0

    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.cfg.position_channels
    with torch.no_grad():
        assert torch.equal(loaded(y, t, lam, tokens), model(y, t, lam, tokens))
    assert ProxT2I(tiny_model_config).unet.conv_in.in_channels == 3


def test_the_x0_loss_scale_turns_the_conditional_targets_residual_into_the_clean_images_error():
    """pretrain.loss_space=x0: an eps prediction made from a wrong clean image x0 + delta has residual k delta
    against the conditional target; scaled, it is delta itself where k < 1 (the noisy pairs) and k delta elsewhere."""
    from proxmodel.losses import conditional_noise, x0_loss_scale

    schedule = VPSchedule()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 3, 8, 8, generator=gen) * 2 - 1
    y, t, lam, target = make_training_pairs(x0, schedule, [5, 10, 20], gen, ("hybrid", "flow"), target="conditional")
    delta = 0.1 * torch.randn(x0.shape, generator=gen)
    pred = conditional_noise(y, x0 + delta, t, lam, schedule)
    scale = x0_loss_scale(t, lam, schedule).view(-1, 1, 1, 1)
    alpha = schedule.alpha(t)
    k = ((lam * alpha).sqrt() / (1 - alpha + lam)).view(-1, 1, 1, 1)
    noisy = k.flatten() < 1
    assert noisy.any() and (~noisy).any()  # both regimes are in the batch
    scaled = (target - pred) * scale
    assert torch.allclose(scaled[noisy], delta[noisy], atol=1e-4)
    assert torch.allclose(scaled[~noisy], k[~noisy] * delta[~noisy], atol=1e-5)
    assert scale.max() > 50  # the noisiest pairs' residual is amplified by two orders of magnitude


def test_the_score_models_x0_loss_scale_turns_its_eps_residual_into_the_clean_images_error():
    """pretrain.loss_space=x0 for kind score: an eps prediction made from a wrong clean image x0 + delta (the eps
    that x_t and x0 + delta imply) has residual k delta, k = sqrt(alpha / (1 - alpha)); scaled, it is delta where
    k < 1 (the noisy half of t) and k delta elsewhere."""
    from proxmodel.losses import make_score_pairs, score_x0_loss_scale

    schedule = VPSchedule()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(256, 3, 8, 8, generator=gen) * 2 - 1
    x_t, t, eps = make_score_pairs(x0, schedule, 1e-3, gen)
    delta = 0.1 * torch.randn(x0.shape, generator=gen)
    alpha = schedule.alpha(t).view(-1, 1, 1, 1)
    pred = (x_t - alpha.sqrt() * (x0 + delta)) / (1 - alpha).sqrt()
    scale = score_x0_loss_scale(t, schedule).view(-1, 1, 1, 1)
    k = (alpha / (1 - alpha)).sqrt()
    noisy = k.flatten() < 1
    assert noisy.any() and (~noisy).any()  # both regimes are in the batch
    scaled = (eps - pred) * scale
    assert torch.allclose(scaled[noisy], delta[noisy], atol=1e-4)
    assert torch.allclose(scaled[~noisy], k[~noisy] * delta[~noisy], atol=1e-4)
    assert scale.max() > 50


def test_pretraining_measures_its_loss_in_x0_space_when_asked(tmp_path):
    """The option reaches the pretraining loop of both model kinds: the first step's loss (same weights, data and
    pairs) is larger in x0 space, where the noisy pairs' residuals are amplified, and a noise target is refused by name."""
    from learner.main import main

    first = {}
    for kind in ("prox", "score"):
        for space in ("eps", "x0"):
            run_dir = tmp_path / f"{kind}-{space}"
            code = main(["--mode", "pretrain", "--config", "configs/smoke.yaml", f"run_dir={run_dir}",
                         f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "pretrain.iterations=1",
                         "pretrain.l1_warmup_frac=0", f"pretrain.loss_space={space}", f"model.kind={kind}"])
            assert code == 0
            first[kind, space] = json.loads((run_dir / "summary.json").read_text())["loss_final"]
    assert first["prox", "x0"] > 1.5 * first["prox", "eps"]
    assert first["score", "x0"] > 1.5 * first["score", "eps"]  # the score model's loss is scaled too
    assert main(["--mode", "pretrain", "--config", "configs/smoke.yaml", f"run_dir={tmp_path / 'bad'}",
                 "pretrain.loss_space=x0", "pretrain.target=noise"]) == 2
    assert not (tmp_path / "bad").exists()


def test_pretraining_with_mirror_pairs_trains_each_scene_beside_its_mirror(tmp_path, monkeypatch):
    """pretrain.mirror_pairs reaches the loop: the batch the model trains on is half a batch of new scenes, each followed
    by its left-right mirror under the mirrored caption, the pair sharing its (t, lam); the data cursor that continues
    the run advances by half a batch per step. Would catch a loop that reads half a batch but forgets the mirrors,
    that drops the tie, or that mirrors the captions without the images."""
    import learner.pretrain as pretrain
    from learner.main import main
    from rewards.scenes import mirror_caption

    seen = []
    real_pairs = pretrain.make_training_pairs

    def recording_pairs(x0, *args, **kwargs):
        y, t, lam, xi = real_pairs(x0, *args, **kwargs)
        seen.append({"x0": x0.detach().clone(), "t": t.clone(), "lam": lam.clone()})
        return y, t, lam, xi

    real_drop = pretrain.drop_captions

    def recording_drop(captions, *args, **kwargs):
        seen.append({"captions": list(captions)})
        return real_drop(captions, *args, **kwargs)

    monkeypatch.setattr(pretrain, "make_training_pairs", recording_pairs)
    monkeypatch.setattr(pretrain, "drop_captions", recording_drop)
    run_dir = tmp_path / "mirror"
    assert main(["--mode", "pretrain", "--config", "configs/smoke.yaml", f"run_dir={run_dir}",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "pretrain.iterations=2",
                 "pretrain.l1_warmup_frac=0", "pretrain.mirror_pairs=true", "data.cursor=100"]) == 0
    captions = [r["captions"] for r in seen if "captions" in r]
    pairs = [r for r in seen if "x0" in r]
    assert len(pairs) == len(captions) == 2
    for batch, step in zip(captions, pairs):
        assert len(batch) == step["x0"].shape[0] == 8
        assert len(set(batch[0::2])) == 4  # four different scenes, not one repeated
        assert batch[1::2] == [mirror_caption(c) for c in batch[0::2]]
        assert any(a != b for a, b in zip(batch[0::2], batch[1::2]))  # some caption states a place to mirror
        torch.testing.assert_close(step["x0"][1::2], step["x0"][0::2].flip(-1))
        assert not torch.equal(step["x0"][1::2], step["x0"][0::2])
        torch.testing.assert_close(step["t"][1::2], step["t"][0::2])
        torch.testing.assert_close(step["lam"][1::2], step["lam"][0::2])
    assert captions[0] != captions[1]  # the second step read new scenes
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data_cursor"] == 100 + 2 * 8 // 2


def test_pretraining_measures_sigma_data_as_the_rms_of_the_encoded_data(tiny_model_config):
    """record_training encodes its 512 images in chunks (a VAE on all at once does not fit). Would catch: a chunked
    mean that weights chunks wrongly or drops the last one, against the one-pass RMS of the same images."""
    from learner.config import DataConfig, load_config
    from learner.data import ScenesSource
    from learner.pretrain import SIGMA_DATA_SAMPLES, record_training

    model = ProxT2I(tiny_model_config.model_copy(update={"prox_param": "precond", "sigma_data": None}))
    cfg = load_config(None, [])
    source = ScenesSource(DataConfig(), tiny_model_config.image_size, 3)
    measured = record_training(model, source, cfg).sigma_data
    images, _ = source.batch(cfg.data.cursor, SIGMA_DATA_SAMPLES)
    with torch.no_grad():
        expected = float(model.encode_images(images).double().pow(2).mean().sqrt())
    assert measured == round(expected, 4) and 0.1 < measured < 2.0


def test_proxdm_eps_prox_feeds_the_unet_its_input_scaled_by_the_std_of_y(tiny_model_config):
    """prox_param eps (ProxDM): prox = y - sqrt(lam) F(y / sqrt(1 + lam)), the input scaled by the std of y when
    p_t = N(0, I); checked against a direct call of the U-Net. Would catch the scaling dropped: the network would
    see inputs of variance 1 + lam (4.6 at the 5-step grid's last step) and checkpoints trained with it would break."""
    from proxmodel.model import EMBED_SCALE, prox_fn

    model = ProxT2I(tiny_model_config.model_copy(update={"prox_param": "eps"})).eval()
    b = 3
    y, t, lam = torch.randn(b, 3, 8, 8), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.4, 1.5, 3.0])
    tokens = model.tokenize(["a blue square"] * b)
    lv = lam.view(-1, 1, 1, 1)
    with torch.no_grad():
        f = model.unet(y / (1 + lv).sqrt(), t * EMBED_SCALE, encoder_hidden_states=model.encode_text(tokens),
                       class_labels=lam * EMBED_SCALE).sample
        got = prox_fn(model, tokens=tokens)(y, t, lam)
    assert torch.allclose(got, y - lv.sqrt() * f, atol=1e-5)


def test_unclamped_images_keep_every_pixel_and_its_gradient():
    """to_images(clamp=False), what grpo.objective direct backpropagates the reward through: the plain map
    [-1, 1] -> [0, 1] extended past the ends, with gradient 1/2 at every pixel; the clamped map stops at 0 and 1.
    Would catch clamp=False ignored (pixels past [0, 1] would get no gradient from the reward)."""
    from proxmodel.model import to_unit

    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0], requires_grad=True)
    unclamped = to_unit(x, clamp=False)
    assert torch.equal(unclamped.detach(), torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0]))
    unclamped.sum().backward()
    assert torch.equal(x.grad, torch.full((5,), 0.5))
    assert torch.equal(to_unit(x.detach()), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_the_l1_and_mse_losses_are_means_over_every_element():
    """The L1 warm-up and the score baseline's eps-MSE: mean |a - b| and mean (a - b)^2 over batch and dimensions,
    checked on values worked out by hand. Would catch the warm-up squaring its residual (it is L1 to be robust to
    the noise target's outliers) or the MSE summed over dimensions (its size then grows with the image, and the
    gradient clipping at 1.0 binds at every step)."""
    from proxmodel.losses import l1_loss, mse_loss

    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[3.0, -1.0, 0.0, 0.0], [2.0, 2.0, -2.0, 0.0]]).view(2, 1, 2, 2)
    assert float(l1_loss(pred, target)) == pytest.approx(10 / 8)
    assert float(mse_loss(pred, target)) == pytest.approx(22 / 8)
    assert float(mse_loss(pred.repeat(1, 1, 4, 4), target.repeat(1, 1, 4, 4))) == pytest.approx(22 / 8)
