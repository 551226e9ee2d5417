"""HPSv2, ImageReward and PickScore through small models of their real architectures, built with each package's
own classes and saved in the released file layouts; every score is checked against the package's own scoring."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from rewards import build, weighted_sum
from rewards.base import preflight, to_uint8_images
from rewards.scenes import scene_batch

ROOT = Path(__file__).resolve().parent.parent


def scenes(count: int, seed: int = 5, side: int = 40):
    images, captions = scene_batch(seed=seed, start=0, count=count, side=side)
    return torch.from_numpy(images), captions


def pil(images):
    return [Image.fromarray(a) for a in to_uint8_images(images)]


# --- HPSv2 --------------------------------------------------------------------------------------------------------

HPS_TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
    from rewards import compat

    open_clip = compat.hpsv2_open_clip()
    configs = tmp_path_factory.mktemp("hps_configs")
    (configs / "hps-tiny.json").write_text(json.dumps(HPS_TINY))
    open_clip.add_model_config(configs)  # the fork's own registry, as for ViT-H-14
    torch.manual_seed(0)
    model = open_clip.create_model("hps-tiny", None, precision="amp", output_dict=True)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)  # the released file's layout
    return path


def test_hpsv2_equals_the_packages_own_score(hps_checkpoint):
    import hpsv2.img_score as img_score
    from rewards import compat

    images, captions = scenes(5)
    reward = build("hpsv2", checkpoint=str(hps_checkpoint), architecture="hps-tiny", batch_size=2)
    scores = reward.score(images, captions)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and bool(scores.abs().le(1 + 1e-5).all())
    assert torch.equal(reward.score(images, captions), scores)  # deterministic
    # The reference: hpsv2.score's own code path (transform, tokenizer, forward), one image at a time.
    model, _, preprocess_val = compat.hpsv2_open_clip().create_model_and_transforms(
        "hps-tiny", None, precision="amp", light_augmentation=True, aug_cfg={}, output_dict=True)
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)  # what initialize_model() caches
    try:
        expected = [img_score.score(p, c, cp=str(hps_checkpoint))[0] for p, c in zip(pil(images), captions)]
    finally:
        img_score.model_dict.clear()
    assert torch.allclose(scores, torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert scores.std() > 0


def test_hpsv2_missing_checkpoint_fails_in_the_cli_before_any_actor(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        preflight("hpsv2", {"checkpoint": str(tmp_path / "HPS_v2.1_compressed.pt")})
    for fragment in ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt", "xswu/HPSv2", "options.checkpoint"):
        assert fragment in str(info.value)
    proc = subprocess.run(
        [sys.executable, "-m", "learner.main", "--mode", "grpo", "--config", "configs/smoke.yaml",
         "rewards=[{name: hpsv2}]", f"run_dir={tmp_path / 'r'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error:") == 1 and "rewards[0] (hpsv2)" in proc.stderr
    assert "xswu/HPSv2" in proc.stderr and "options.checkpoint" in proc.stderr
    assert "Ray" not in proc.stderr and not (tmp_path / "r").exists()


# --- ImageReward --------------------------------------------------------------------------------------------------

MED_TINY = {  # BLIP's med_config.json with a 1-layer text tower (hidden 768: the package's MLP(768) expects it)
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 128,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 0, "encoder_width": 768,
    "add_cross_attention": True,
}


@pytest.fixture
def small_vit(monkeypatch):
    """The package's VisionTransformer with one 64-wide block in place of its hard-coded ViT-L (24 x 1024)."""
    from rewards import compat

    compat.imagereward_modules()
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    monkeypatch.setattr(blip_pretrain, "create_vit", lambda *a, **k: (
        VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=1, num_heads=2), 64))


@pytest.fixture
def imagereward_files(tmp_path, small_vit):
    from rewards import compat

    words = sorted({w for c in scenes(40)[1] for w in c.lower().replace(",", " ").split()})
    tokenizer = tmp_path / "bert-base-uncased"
    tokenizer.mkdir()
    (tokenizer / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    med = tmp_path / "med_config.json"
    med.write_text(json.dumps({**MED_TINY, "vocab_size": len(words) + 7}))  # + [DEC], [ENC]
    module, _ = compat.imagereward_modules()
    torch.manual_seed(0)
    with compat.blip_tokenizer_from(tokenizer):
        model = module.ImageReward(med_config=str(med))
    for p in model.mlp.parameters():  # the package's head init makes every random-weight reward equal
        torch.nn.init.normal_(p, std=0.05)
    checkpoint = tmp_path / "ImageReward.pt"
    torch.save(model.state_dict(), checkpoint)
    return {"checkpoint": str(checkpoint), "med_config": str(med), "tokenizer": str(tokenizer)}


def test_image_reward_equals_the_packages_own_score(imagereward_files):
    from rewards import compat

    images, captions = scenes(5)
    reward = build("image_reward", batch_size=2, **imagereward_files)
    scores = reward.score(images, captions)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and scores.std() > 0
    assert torch.equal(reward.score(images, captions), scores)
    assert torch.allclose(build("image_reward", batch_size=16, **imagereward_files).score(images, captions), scores,
                          atol=1e-5)  # batching does not change scores
    # The reference: the package's own ImageReward.score(prompt, PIL image), loaded independently.
    module, _ = compat.imagereward_modules()
    with compat.blip_tokenizer_from(imagereward_files["tokenizer"]):
        model = module.ImageReward(med_config=imagereward_files["med_config"])
    model.load_state_dict(torch.load(imagereward_files["checkpoint"], weights_only=True), strict=False)
    with torch.no_grad():
        expected = [model.eval().score(c, p) for p, c in zip(pil(images), captions)]
    assert torch.allclose(scores, torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_image_reward_missing_files_are_named(imagereward_files, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        preflight("image_reward", {**imagereward_files, "tokenizer": str(tmp_path / "none"),
                                   "med_config": str(tmp_path / "none.json")})
    message = str(info.value)
    for fragment in ("options.tokenizer", "options.med_config", "THUDM/ImageReward", "med_config.json",
                     "google-bert/bert-base-uncased", "vocab.txt"):
        assert fragment in message
    assert "options.checkpoint" not in message  # the one that is there is not reported
    with pytest.raises(TypeError):
        preflight("image_reward", {**imagereward_files, "no_such_option": 1})


# --- PickScore ----------------------------------------------------------------------------------------------------

def clip_bpe_files(folder: Path) -> None:
    """CLIP's real BPE vocabulary (shipped in open_clip) in the vocab.json + merges.txt layout of the hub."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = [tuple(m.split()) for m in gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    assert open_clip  # the vocabulary's source


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("pickscore")
    clip_bpe_files(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "projection_dim": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "projection_dim": 16},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_pickscore_equals_the_reference_computation(pickscore_dir):
    from transformers import AutoProcessor, CLIPModel

    images, captions = scenes(5)
    reward = build("pickscore", model=str(pickscore_dir), batch_size=2)
    scores = reward.score(images, captions)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and scores.std() > 0
    assert torch.equal(reward.score(images, captions), scores)
    # The reference: PickScore's published recipe (AutoProcessor + CLIPModel, one prompt against its image).
    processor = AutoProcessor.from_pretrained(pickscore_dir)
    model = CLIPModel.from_pretrained(pickscore_dir).eval()
    expected = []
    with torch.no_grad():
        for image, caption in zip(pil(images), captions):
            image_inputs = processor(images=[image], padding=True, truncation=True, max_length=77, return_tensors="pt")
            text_inputs = processor(text=caption, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = model.get_image_features(**image_inputs).pooler_output
            text_embs = model.get_text_features(**text_inputs).pooler_output
            image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
            text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
            expected.append((model.logit_scale.exp() * (text_embs @ image_embs.T))[0, 0].item())
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-4)


def test_a_learned_reward_scores_a_nonfinite_image_nan_and_an_empty_batch_empty(pickscore_dir):
    """The uint8 conversion every learned reward makes turned a NaN image into a black one with an ordinary score,
    so a bf16 rollout that overflowed was trained on instead of dropped. Would catch the guard missing for the
    learned rewards (it was written into the verifier and JPEG rewards only)."""
    images, captions = scenes(3)
    broken = images.clone()
    broken[1, :, 4, 4] = float("nan")
    reward = build("pickscore", model=str(pickscore_dir), batch_size=2)
    clean, scored = reward.score(images, captions), reward.score(broken, captions)
    assert scored.isnan().tolist() == [False, True, False] and torch.equal(scored[[0, 2]], clean[[0, 2]])
    assert reward.score(images[:0], []).shape == (0,)


def test_pickscore_missing_processor_is_named(pickscore_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        preflight("pickscore", {"model": str(pickscore_dir), "processor": str(tmp_path)})
    message = str(info.value)
    assert "options.processor" in message and "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in message
    assert "yuvalkirstain/PickScore_v1" in message and "options.model =" not in message


def test_weighted_mix_of_preference_rewards(pickscore_dir, hps_checkpoint):
    images, captions = scenes(4)
    pick = build("pickscore", model=str(pickscore_dir)).score(images, captions)
    hps = build("hpsv2", checkpoint=str(hps_checkpoint), architecture="hps-tiny").score(images, captions)
    mixed = weighted_sum({"pickscore": pick, "hpsv2": hps}, {"pickscore": 0.05, "hpsv2": 2.0})
    assert torch.allclose(mixed, 0.05 * pick + 2.0 * hps)
    assert torch.equal(weighted_sum({"pickscore": pick, "hpsv2": hps}, {"hpsv2": 1.0}), hps)


def test_check_command_scores_generated_images(pickscore_dir, capsys):
    from rewards.check import main

    assert main(["pickscore", f"model={pickscore_dir}", "--images", "2", "--side", "32"]) == 0
    out = capsys.readouterr().out
    assert "loaded pickscore" in out and "ms per image" in out and len(out.strip().splitlines()) == 4
    assert main(["pickscore", f"model={pickscore_dir / 'missing'}"]) == 2
    assert "yuvalkirstain/PickScore_v1" in capsys.readouterr().err
    assert main(["no_such_reward"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["image_reward", "hpsv2", "pickscore"])
def test_real_size_models_load_from_released_layouts(name, tmp_path):
    """Full-size random-weight models (4-5 GB RSS each), saved as released and loaded through the reward class."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reward_costs import prepare

    try:
        options = prepare(name, tmp_path)
        reward = build(name, **options)
    finally:  # 2-4 GB of weights per model: a CI disk holding all three at once runs out
        shutil.rmtree(tmp_path, ignore_errors=True)
    images, captions = scenes(2, side=64)
    scores = reward.score(images, captions)
    assert scores.shape == (2,) and bool(torch.isfinite(scores).all())
    assert torch.equal(reward.score(images, captions), scores)


def test_image_reward_rejects_a_checkpoint_without_its_weights(imagereward_files, tmp_path):
    state = torch.load(imagereward_files["checkpoint"], weights_only=True)
    wrong = tmp_path / "other.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("mlp.")}, wrong)
    with pytest.raises(ValueError, match="mlp.layers"):
        build("image_reward", **{**imagereward_files, "checkpoint": str(wrong)})
