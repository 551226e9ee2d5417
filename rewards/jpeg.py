"""JPEG (in)compressibility (DDPO's simplest rewards): the size of the image saved as JPEG, in kilobytes."""

from __future__ import annotations

import io
from typing import Sequence

import torch
from PIL import Image

from rewards.base import RewardModel, nan_where_nonfinite, register, to_uint8_images


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image ([B, 3, H, W] in [0, 1]) as a JPEG at `quality`; NaN for a non-finite image."""
    arr = to_uint8_images(images)
    sizes = []
    for image in arr:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return nan_where_nonfinite(images, torch.tensor(sizes, dtype=torch.float32))


@register("jpeg_compressibility")
class JpegCompressibility(RewardModel):
    """-kB: rewards images that compress well (flat, simple)."""

    def __init__(self, quality: int = 95):
        self.quality = quality

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -jpeg_kilobytes(images, self.quality)


@register("jpeg_incompressibility")
class JpegIncompressibility(RewardModel):
    """+kB: rewards images that compress badly (detailed, textured)."""

    def __init__(self, quality: int = 95):
        self.quality = quality

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return jpeg_kilobytes(images, self.quality)
