"""PickScore: a CLIP-H model fine-tuned on Pick-a-Pic preferences, through transformers' CLIPModel + CLIPProcessor.

Score = logit_scale.exp() x cosine(image, caption), as PickScore's reference code computes it (about 18-23 for
real images). Files: the model folder of hub repo yuvalkirstain/PickScore_v1 and the processor (tokenizer +
image processor) of laion/CLIP-ViT-H-14-laion2B-s32B-b79K; they may share one folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from rewards.base import RewardModel, register, to_uint8_images

MODEL_FILES = ("config.json", "model.safetensors | pytorch_model.bin")
PROCESSOR_FILES = ("preprocessor_config.json (or processor_config.json)", "tokenizer.json | vocab.json + merges.txt")


def check_pickscore_folders(model: str | None, processor: str | None) -> None:
    """Raise FileNotFoundError naming the missing files, their hub repos and the config keys."""
    missing = []
    m = Path(model).expanduser() if model else None
    if m is None or not (m / "config.json").is_file() or not any(
        (m / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")
    ):
        missing.append(f"options.model = {model} needs {' and '.join(MODEL_FILES)} from yuvalkirstain/PickScore_v1")
    p = Path(processor).expanduser() if processor else m
    if p is None or not any((p / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")) or not (
        (p / "tokenizer.json").is_file() or (p / "vocab.json").is_file()
    ):
        missing.append(f"options.processor = {processor or model} needs {' and '.join(PROCESSOR_FILES)} from "
                       f"laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    if missing:
        raise FileNotFoundError(
            "the pickscore reward needs its files: " + "; ".join(missing) + ". On a machine with internet: "
            "hf download yuvalkirstain/PickScore_v1 --local-dir /models/pickscore && "
            "hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json tokenizer.json "
            "tokenizer_config.json special_tokens_map.json vocab.json merges.txt --local-dir /models/pickscore; then "
            "set options.model (and options.processor if it is another folder) in the config."
        )


def _embedding(output) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and an output whose pooler_output it is in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@register("pickscore")
class PickScore(RewardModel):
    """PickScore of each (image, caption)."""

    def __init__(self, model: str, processor: str | None = None, batch_size: int = 16, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.preflight(model, processor)
        self.processor = CLIPProcessor.from_pretrained(str(Path(processor or model).expanduser()))
        self.model = CLIPModel.from_pretrained(str(Path(model).expanduser())).to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size

    @staticmethod
    def preflight(model: str | None = None, processor: str | None = None, **_) -> None:
        check_pickscore_folders(model, processor)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            pil = [Image.fromarray(a) for a in to_uint8_images(images[i : i + self.batch_size])]
            pixels = self.processor(images=pil, return_tensors="pt").to(self.device)
            text = self.processor(text=list(prompts[i : i + self.batch_size]), padding=True, truncation=True,
                                  max_length=77, return_tensors="pt").to(self.device)
            image = _embedding(self.model.get_image_features(**pixels))
            caption = _embedding(self.model.get_text_features(**text))
            image = image / image.norm(dim=-1, keepdim=True)
            caption = caption / caption.norm(dim=-1, keepdim=True)
            out.append((self.model.logit_scale.exp() * (image * caption).sum(-1)).float().cpu())
        return torch.cat(out)
