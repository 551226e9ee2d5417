"""Checkpoints in the ecosystem's layout: diffusers and transformers load their parts and compute what ProxT2I
computes; the whole model round-trips bit for bit; the earlier flat layout (and the shipped builtin) still loads
exactly; broken folders are refused naming the file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from proxmodel.checkpoint import missing_files, read_state
from proxmodel.model import EMBED_SCALE, ProxT2I, load_model, prox_fn, save_model
from tests.test_model import save_old_layout

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "proxmodel" / "weights" / "scenes-base"
CAPTIONS = ["a red circle at the top left, on a white background", ""]


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    return save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "c")


def assert_same_weights(a: ProxT2I, b: ProxT2I) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def test_the_unet_loads_in_diffusers_and_computes_what_the_model_computes(tiny_model, saved):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(saved, subfolder="unet").eval()
    assert unet.config.class_embed_type == "timestep" and unet.config.class_embeddings_concat
    torch.manual_seed(1)
    y, t, lam = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        context = tiny_model.encode_text(tiny_model.tokenize(CAPTIONS))
        ours = tiny_model.eval().unet(y, t * EMBED_SCALE, encoder_hidden_states=context,
                                      class_labels=lam * EMBED_SCALE).sample
        theirs = unet(y, t * EMBED_SCALE, encoder_hidden_states=context, class_labels=lam * EMBED_SCALE).sample
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, unet(y, t * EMBED_SCALE, encoder_hidden_states=context,
                                      class_labels=lam * 0).sample.detach())  # lam reaches the output


def test_the_text_encoder_loads_in_transformers_and_gives_the_same_features(tiny_model, saved):
    from transformers import CLIPTextModel

    text = CLIPTextModel.from_pretrained(saved, subfolder="text_encoder").eval()
    tokens = tiny_model.tokenize(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(text(input_ids=tokens).last_hidden_state, tiny_model.eval().encode_text(tokens))


def test_the_folder_has_the_diffusers_layout_and_its_settings(tiny_model, saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    scheduler = json.loads((saved / "scheduler" / "scheduler_config.json").read_text())
    for key in ("prox_param", "sigma_data", "trained_steps", "trained_variants", "kind"):
        assert scheduler[key] == getattr(tiny_model.cfg, key), key
        assert key not in index["proxrl_model"]  # each setting is stored once
    assert (saved / "README.md").read_text().startswith("---\nlibrary_name: diffusers")


def test_the_whole_model_round_trips_bit_for_bit_and_so_does_fp16_storage(tiny_model, saved, tmp_path):
    loaded = load_model(saved)
    assert loaded.cfg == tiny_model.cfg
    assert_same_weights(tiny_model, loaded)
    half = load_model(save_model(tiny_model, tmp_path / "half", torch.float16))
    assert all(v.dtype == torch.float16 for v in read_state(tmp_path / "half").values())
    for name, value in half.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, tiny_model.state_dict()[name].half().float()), name


def test_an_old_layout_folder_still_loads_exactly(tiny_model, tmp_path):
    old = load_model(save_old_layout(tiny_model, tmp_path / "old"))
    assert old.cfg == tiny_model.cfg
    assert_same_weights(tiny_model, old)


def test_the_builtin_loads_as_stored_and_converts_without_changing_a_bit(tmp_path):
    builtin = load_model(BUILTIN)
    stored = load_file(str(BUILTIN / "model.safetensors"))
    for name, value in builtin.state_dict().items():
        assert torch.equal(value, stored[name].float()), name
    proc = subprocess.run([sys.executable, "-m", "proxmodel.convert", str(BUILTIN), str(tmp_path / "new"), "--fp16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    converted = load_model(tmp_path / "new")
    assert converted.cfg == builtin.cfg
    assert_same_weights(builtin, converted)
    assert "converted_from: " in (tmp_path / "new" / "README.md").read_text()
    y, t, lam = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.8]), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        tokens = builtin.tokenize(CAPTIONS)
        assert torch.equal(prox_fn(builtin.eval(), tokens=tokens)(y, t, lam),
                           prox_fn(converted.eval(), tokens=tokens)(y, t, lam))


@pytest.mark.parametrize("broken", ["text_encoder/model.safetensors", "scheduler/scheduler_config.json"])
def test_a_missing_part_is_named(tiny_model, tmp_path, broken):
    folder = save_model(tiny_model, tmp_path / "c")
    (folder / broken).unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {broken}"):
        load_model(folder)


def test_convert_refuses_a_broken_checkpoint_with_exit_2(tiny_model, tmp_path):
    folder = save_model(tiny_model, tmp_path / "c")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    proc = subprocess.run([sys.executable, "-m", "proxmodel.convert", str(folder), str(tmp_path / "new")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and str(weights) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "new").exists()


def test_diffusion_pipeline_loads_the_folder_and_samples_as_the_project_does(tiny_model, saved):
    from diffusers import DiffusionPipeline

    from proxmodel.generate import generate

    pipe = DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)
    assert type(pipe).__name__ == "ProxT2IPipeline"
    images = pipe(CAPTIONS[0], num_images_per_prompt=2, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(7), output_type="pt").images
    expected = generate(tiny_model, [CAPTIONS[0]] * 2, 4, seed=7)
    assert images.shape == (2, 3, 8, 8) and torch.equal(images, expected)
    assert len(pipe(CAPTIONS[0], num_inference_steps=2).images) == 1  # PIL by default


def test_the_pipeline_class_loads_a_folder_without_its_code_and_follows_moves(tiny_model, saved):
    """ProxT2IPipeline.from_pretrained(folder), as documented, needed trust_remote_code (the index names the
    folder's pipeline.py); a loaded pipeline sampled with a private copy of the U-Net that pipe.to() never reached
    (a second U-Net in memory, the dtype asked for ignored, a device mismatch after .to('cuda'))."""
    from diffusers import DiffusionPipeline

    from proxmodel.generate import generate
    from proxmodel.pipeline import ProxT2IPipeline

    seeded = dict(num_images_per_prompt=2, num_inference_steps=4, output_type="pt")
    direct = ProxT2IPipeline.from_pretrained(saved)
    images = direct(CAPTIONS[0], generator=torch.Generator().manual_seed(7), **seeded).images
    assert torch.equal(images, generate(tiny_model, [CAPTIONS[0]] * 2, 4, seed=7))
    with pytest.raises(TypeError, match="torch_dtype only"):
        ProxT2IPipeline.from_pretrained(saved, revision="main")
    pipe = DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)
    pipe(CAPTIONS[0], num_inference_steps=2)
    assert pipe.model.unet is pipe.unet  # one U-Net
    pipe.to(torch.bfloat16)
    low = pipe(CAPTIONS[0], generator=torch.Generator().manual_seed(7), **seeded).images
    assert {p.dtype for p in pipe.model.parameters()} == {torch.bfloat16}
    assert not torch.equal(low, images) and (low - images).abs().max() < 0.2  # bf16 rounding, the same images
    unseeded = [pipe(CAPTIONS[0], **seeded).images for _ in range(2)]
    assert not torch.equal(*unseeded)  # no generator: torch's random state, not a fixed seed 0
    with pytest.raises(TypeError, match="one torch.Generator"):
        pipe(CAPTIONS[0], generator=[torch.Generator(), torch.Generator()])


def test_a_global_seed_alone_makes_the_first_pipeline_call_repeatable(saved):
    """diffusers' convention: no generator, torch.manual_seed(s) fixes the images. The first call builds the model,
    whose random init (replaced by the checkpoint's weights) drew from the global stream and shifted the noise."""
    from diffusers import DiffusionPipeline

    calls = []
    for _ in range(2):
        pipe = DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)
        torch.manual_seed(3)
        calls.append(pipe(CAPTIONS[0], num_inference_steps=2, output_type="pt").images)
    torch.manual_seed(3)
    calls.append(pipe(CAPTIONS[0], num_inference_steps=2, output_type="pt").images)  # its model already built
    assert torch.equal(calls[0], calls[1]) and torch.equal(calls[1], calls[2])


def test_saving_leaves_the_callers_random_stream_alone(tiny_model, tmp_path):
    """Saving builds a model to hold the weights; its random init must not shift the RNG of a training run that
    exports mid-way (a resumed run would otherwise draw other numbers than an uninterrupted one)."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    save_model(tiny_model, tmp_path / "c")
    assert torch.equal(torch.rand(3), expected)


def test_a_flat_checkpoint_leaves_a_frozen_pretrained_encoder_out_and_the_loader_rebuilds_it(tiny_model_config, tmp_path):
    """The builtin weights' layout: a frozen MiniLM is not stored (45 MB) but comes back from its package exactly."""
    from proxmodel.checkpoint import save_flat
    from tests.test_latent_text import with_text

    model = ProxT2I(with_text(tiny_model_config, pretrained="minilm"))
    with torch.no_grad():  # weights unlike a fresh init, so a loader that ignored the file would show
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_flat(model, tmp_path / "flat")
    stored = load_file(str(tmp_path / "flat" / "model.safetensors"))
    assert stored and not any(k.startswith("text.") for k in stored)
    assert all(v.dtype == torch.float16 for v in stored.values())
    loaded = load_model(tmp_path / "flat")
    assert loaded.cfg == model.cfg
    for name, value in model.state_dict().items():
        expected = value if name.startswith("text.") else value.half().float()
        assert torch.equal(loaded.state_dict()[name], expected), name


def test_a_flat_checkpoint_keeps_a_trained_encoder_and_refuses_to_load_without_it(tiny_model, tmp_path):
    from safetensors.torch import save_file

    from proxmodel.checkpoint import save_flat

    save_flat(tiny_model, tmp_path / "flat", dtype=torch.float32)
    assert_same_weights(tiny_model, load_model(tmp_path / "flat"))
    weights = tmp_path / "flat" / "model.safetensors"
    stored = load_file(str(weights))
    assert any(k.startswith("text.") for k in stored)
    save_file({k: v for k, v in stored.items() if not k.startswith("text.")}, str(weights))
    with pytest.raises(ValueError, match="text"):  # a trainable encoder is never filled in from a fresh init
        load_model(tmp_path / "flat")


@pytest.mark.parametrize("name", ["scenes-minilm", "scenes-minilm-x0", "scenes-minilm-mirror", "scenes-minilm-x0-4200",
                                  "scenes-minilm-bind", "scenes-minilm-bind2", "scenes-minilm-bind3"])
def test_the_minilm_builtins_ship_only_their_unet_and_load_the_package_encoder(name):
    from proxmodel.text import minilm_folder
    from transformers import BertModel

    folder = ROOT / "proxmodel" / "weights" / name
    model = load_model(folder)
    stored = load_file(str(folder / "model.safetensors"))
    assert model.cfg.text.pretrained == "minilm" and not model.cfg.text.train
    assert stored and not any(k.startswith("text.") for k in stored)
    for name, value in stored.items():
        assert torch.equal(model.state_dict()[name], value.float()), name
    package = BertModel.from_pretrained(minilm_folder(), add_pooling_layer=False).state_dict()
    ours = model.text.bert.state_dict()
    assert all(torch.equal(ours[k], package[k]) for k in package)


def test_convert_never_replaces_a_folder_that_is_not_a_checkpoint(tiny_model, tmp_path, capsys):
    """The target is replaced whole: a parent folder given by mistake (holding the source, or other files) must be
    refused with nothing deleted; an old checkpoint folder is replaced as documented. (In process: the command's
    exit status and the absence of a traceback are test_convert_refuses_a_broken_checkpoint_with_exit_2's.)"""
    from proxmodel.convert import main

    parent = tmp_path / "models"
    source = save_model(tiny_model, parent / "src")
    (parent / "notes.txt").write_text("keep me")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.png").write_bytes(b"x")
    for target, fragment in [(parent, "is or contains the source"), (other, "holds files that are not a ProxRL"),
                             (other / "a.png", "is a file")]:
        assert main([str(source), str(target)]) == 2
        assert fragment in capsys.readouterr().err
    assert (parent / "notes.txt").read_text() == "keep me" and not missing_files(source)
    assert (other / "a.png").read_bytes() == b"x"
    old = save_model(tiny_model, tmp_path / "old")
    (old / "README.md").write_text("stale")
    assert main([str(source), str(old)]) == 0 and "stale" not in (old / "README.md").read_text()


def test_a_checkpoint_whose_encoder_folder_moved_says_which_path_to_fix(tiny_model_config, tmp_path):
    """A checkpoint records its pretrained encoder's folder; moved away, the advice was to re-export the checkpoint,
    which cannot help: the fix is the folder, or the path in the checkpoint's index."""
    from tests.test_latent_text import with_text

    folder = save_model(ProxT2I(with_text(tiny_model_config, pretrained="minilm")), tmp_path / "c")
    index = json.loads((folder / "model_index.json").read_text())
    index["proxrl_model"]["text"]["path"] = str(tmp_path / "moved-away")
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"refers to files that are not there .*moved-away.*model\.text\.path"):
        load_model(folder)
