"""CLIP score through a small open_clip model of the real architecture, saved the way open_clip hub repos are."""

import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from rewards import build
from rewards.base import preflight
from rewards.scenes import scene_batch
from tests.conftest import TINY_CLIP as TINY


def test_scores_equal_open_clips_own_pipeline(clip_dir):
    images, captions = scene_batch(seed=2, start=0, count=5, side=32)
    images = torch.from_numpy(images)
    reward = build("clip_score", path=str(clip_dir), batch_size=2)
    scores = reward.score(images, captions)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and bool(scores.abs().le(100).all())
    # The reference: open_clip's own model, transform and tokenizer, loaded independently.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images]
    with torch.no_grad():
        img = model.eval().encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        txt = model.encode_text(tokenizer(captions), normalize=True)
    assert torch.allclose(scores, 100 * (img * txt).sum(-1), atol=1e-4)
    assert torch.equal(reward.score(images, captions), scores)  # deterministic


def test_missing_weights_name_the_files_the_source_and_the_key(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        preflight("clip_score", {"path": str(tmp_path)})
    message = str(info.value)
    for fragment in ("open_clip_config.json", "open_clip_model.safetensors", "Hugging Face",
                     "options.path"):
        assert fragment in message
    with pytest.raises(TypeError):
        preflight("clip_score", {"path": str(clip_dir), "no_such_option": 1})
    preflight("clip_score", {"path": str(clip_dir)})  # all there: no error


def test_cli_fails_before_any_actor_starts(tmp_path):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "learner.main", "--mode", "grpo", "--config", "configs/smoke.yaml",
         "rewards=[{name: clip_score, options: {path: /nonexistent/clip}}]", f"run_dir={tmp_path / 'r'}"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "rewards[0] (clip_score)" in proc.stderr and "options.path" in proc.stderr
    assert "Ray" not in proc.stderr and not (tmp_path / "r").exists()


def test_aesthetic_head_path_may_start_at_home(clip_dir, tmp_path, monkeypatch):
    """preflight expands ~ in head_path: so must the loader, or every reward actor fails after preflight passed."""
    from rewards.aesthetic import aesthetic_head, load_head

    monkeypatch.setenv("HOME", str(tmp_path))
    head = aesthetic_head(TINY["model_cfg"]["embed_dim"])
    torch.save(head.state_dict(), tmp_path / "head.pth")
    preflight("aesthetic", {"clip_path": str(clip_dir), "head_path": "~/head.pth"})
    loaded = load_head("~/head.pth")
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))


def test_aesthetic_head_on_clip_features(clip_dir, tmp_path):
    from rewards.aesthetic import aesthetic_head

    torch.manual_seed(1)
    head = aesthetic_head(TINY["model_cfg"]["embed_dim"])
    head_file = tmp_path / "head.pth"
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, head_file)  # the released file's layout
    images, _ = scene_batch(seed=3, start=0, count=4, side=32)
    images = torch.from_numpy(images)
    reward = build("aesthetic", clip_path=str(clip_dir), head_path=str(head_file), batch_size=3)
    scores = reward.score(images, [""] * 4)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images]
    with torch.no_grad():
        expected = head.eval()(model.eval().encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True))
    assert torch.allclose(scores, expected.squeeze(-1), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="options.head_path"):
        preflight("aesthetic", {"clip_path": str(clip_dir), "head_path": str(tmp_path / "nope.pth")})
    with pytest.raises(FileNotFoundError, match="options.clip_path"):
        preflight("aesthetic", {"clip_path": str(tmp_path / "none"), "head_path": str(head_file)})
    with pytest.raises(FileNotFoundError, match=r"options.clip_path is not set.*timm/vit_large_patch14_clip_224"
                                                r".openai.*; and its head weights: missing options.head_path"):
        preflight("aesthetic", {})  # both named at once, and an unset option said as such (it read "folder None")
    narrow = tmp_path / "narrow.pth"  # a head for another CLIP's width (the public one takes ViT-L/14's 768)
    torch.save(aesthetic_head(TINY["model_cfg"]["embed_dim"] // 2).state_dict(), narrow)
    with pytest.raises(ValueError, match="takes 16-d CLIP embeddings, but the CLIP at .* gives 32-d"):
        preflight("aesthetic", {"clip_path": str(clip_dir), "head_path": str(narrow)})
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")  # tensors, but not the head's layers
    with pytest.raises(ValueError, match="is not the aesthetic MLP head"):
        preflight("aesthetic", {"clip_path": str(clip_dir), "head_path": str(tmp_path / "other.pth")})
