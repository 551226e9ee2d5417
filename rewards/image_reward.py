"""ImageReward: the `image-reward` package's BLIP (ViT-L + cross-attention BERT) with its MLP head.

Scores come from the package's own batched `score_gard` (normalised by the package's mean and std), images go
through its own `preprocess` transform and captions through its BLIP tokenizer (max 35 tokens), exactly as
`ImageReward.score(prompt, image)` does one image at a time. Files: ImageReward.pt and med_config.json (hub repo
THUDM/ImageReward) and the bert-base-uncased tokenizer files (hub repo google-bert/bert-base-uncased).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from rewards import compat
from rewards.base import RewardModel, register, to_uint8_images

SCORING_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")


def check_imagereward_files(checkpoint: str | None, med_config: str | None, tokenizer: str | None) -> None:
    """Raise FileNotFoundError naming every missing file, its hub source and the config key."""
    missing = []
    if not checkpoint or not Path(checkpoint).expanduser().is_file():
        missing.append(f"options.checkpoint = {checkpoint} (ImageReward.pt from THUDM/ImageReward)")
    if not med_config or not Path(med_config).expanduser().is_file():
        missing.append(f"options.med_config = {med_config} (med_config.json from THUDM/ImageReward)")
    folder = Path(tokenizer).expanduser() if tokenizer else None
    if folder is None or not (folder / "vocab.txt").is_file():
        missing.append(f"options.tokenizer = {tokenizer} (a folder with vocab.txt and tokenizer_config.json from "
                       f"google-bert/bert-base-uncased)")
    if missing:
        raise FileNotFoundError(
            "the image_reward reward needs its files: missing " + "; ".join(missing) + ". On a machine with internet: "
            "hf download THUDM/ImageReward ImageReward.pt med_config.json --local-dir /models/imagereward "
            "&& hf download google-bert/bert-base-uncased vocab.txt tokenizer_config.json "
            "--local-dir /models/bert-base-uncased; then set those paths as the reward's options in the config."
        )


@register("image_reward")
class ImageRewardScore(RewardModel):
    """ImageReward of each (image, caption): a standardised human-preference score (about -2..2)."""

    def __init__(self, checkpoint: str, med_config: str, tokenizer: str, batch_size: int = 16, device: str = "cpu"):
        self.preflight(checkpoint, med_config, tokenizer)
        module, _ = compat.imagereward_modules()
        with compat.blip_tokenizer_from(Path(tokenizer).expanduser()):
            self.model = module.ImageReward(med_config=str(Path(med_config).expanduser()), device=device)
        state = torch.load(Path(checkpoint).expanduser(), map_location="cpu", weights_only=True, mmap=True)
        # strict=False as ImageReward.load does; but every weight scoring uses must be in the file.
        missing = [k for k in self.model.load_state_dict(state, strict=False).missing_keys
                   if k.startswith(SCORING_PREFIXES) and not k.endswith("position_ids")]
        if missing:
            raise ValueError(f"{checkpoint} is not an ImageReward checkpoint: it lacks {missing[:5]} ...")
        self.model.to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size

    @staticmethod
    def preflight(checkpoint: str | None = None, med_config: str | None = None, tokenizer: str | None = None,
                  **_) -> None:
        compat.require("ImageReward")
        check_imagereward_files(checkpoint, med_config, tokenizer)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            arr = to_uint8_images(images[i : i + self.batch_size])
            pixels = torch.stack([self.model.preprocess(Image.fromarray(a)) for a in arr]).to(self.device)
            text = self.model.blip.tokenizer(list(prompts[i : i + self.batch_size]), padding="max_length",
                                             truncation=True, max_length=35, return_tensors="pt").to(self.device)
            rewards = self.model.score_gard(text.input_ids, text.attention_mask, pixels)
            out.append(rewards.squeeze(-1).float().cpu())
        return torch.cat(out)
