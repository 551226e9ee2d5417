"""CLIP score: 100 x cosine similarity of open_clip's image and text embeddings, from a local open_clip folder.

The folder is what open_clip calls `local-dir:` and what its hub repositories hold: `open_clip_config.json`
(model_cfg + preprocess_cfg) and `open_clip_model.safetensors` (or `.bin`). Images go through open_clip's own
preprocessing transform, so scores match the reference pipeline exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from proxmodel.openclip import CONFIG_FILE, SOURCE, WEIGHT_FILES, load_open_clip
from rewards.base import RewardModel, register, to_uint8_images


def missing_open_clip_files(path: str | None, key: str = "path") -> list[str]:
    """What an open_clip `local-dir:` folder given as options.`key` lacks (empty: nothing)."""
    if not path:
        return [f"options.{key} is not set"]
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return [f"the folder {folder}"]
    missing = [] if (folder / CONFIG_FILE).is_file() else [str(folder / CONFIG_FILE)]
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        missing.append(f"{folder / WEIGHT_FILES[0]} (or {', '.join(WEIGHT_FILES[1:])})")
    return missing


def check_open_clip_folder(path: str | None, reward: str, key: str = "path") -> None:
    """Raise FileNotFoundError naming what is missing, where to get it and the config key to set."""
    missing = missing_open_clip_files(path, key)
    if missing:
        raise FileNotFoundError(
            f"the {reward} reward needs its CLIP weights: missing {'; '.join(missing)}. Get them from {SOURCE}, "
            f"put both files in one folder and set that folder as the reward's options.{key} in the config "
            f"(rewards: [{{name: {reward}, options: {{{key}: /models/clip}}}}])."
        )


class OpenClipLocal:
    """An open_clip model, its preprocessing transform and tokenizer, from a `local-dir:` folder."""

    def __init__(self, path: str, device: str = "cpu"):
        self.model, self.preprocess, self.tokenizer = load_open_clip(path, device)
        self.device = device

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of images [B, 3, H, W] in [0, 1], through open_clip's own transform."""
        arr = to_uint8_images(images)
        pixels = torch.stack([self.preprocess(Image.fromarray(a)) for a in arr])
        return self.model.encode_image(pixels.to(self.device), normalize=True).float()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device), normalize=True).float()


@register("clip_score")
class ClipScore(RewardModel):
    """100 x cos(image, caption) under an open_clip model loaded from a local folder (`options.path`)."""

    def __init__(self, path: str, batch_size: int = 32, device: str = "cpu"):
        self.preflight(path)
        self.clip = OpenClipLocal(path, device)
        self.batch_size = batch_size

    @staticmethod
    def preflight(path: str | None = None, **_) -> None:
        """Fail before any actor starts if the weights are not where the config says."""
        check_open_clip_folder(path, "clip_score")

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            image = self.clip.image_features(images[i : i + self.batch_size])
            text = self.clip.text_features(prompts[i : i + self.batch_size])
            out.append(100.0 * (image * text).sum(dim=-1).cpu())
        return torch.cat(out)
