"""The LAION aesthetic predictor: an MLP head on L2-normalised CLIP image embeddings (ViT-L/14 for the public head).

Weights: the CLIP folder (open_clip `local-dir:`, e.g. ViT-L-14 openai) and the head file
`sac+logos+ava1-l14-linearMSE.pth` from github.com/christophschuhmann/improved-aesthetic-predictor (loaded with
torch.load(weights_only=True): tensors only, no code), or the same tensors as `.safetensors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from rewards.base import RewardModel, register
from rewards.clip_score import OpenClipLocal, check_open_clip_folder

HEAD_SOURCE = "sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor"


def aesthetic_head(embed_dim: int) -> nn.Sequential:
    """The published architecture (dropouts are inactive in eval); `layers.N` keys match the released file."""
    return nn.Sequential(
        nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )


def load_head(path: str) -> nn.Sequential:
    path = str(Path(path).expanduser())  # as preflight checked it
    state = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("layers."): v.float() for k, v in state.items()}
    head = aesthetic_head(state["0.weight"].shape[1])
    head.load_state_dict(state)
    return head.eval()


@register("aesthetic")
class AestheticScore(RewardModel):
    """Predicted aesthetic rating (about 1..10 for the public head) of each image; prompts are ignored."""

    def __init__(self, clip_path: str, head_path: str, batch_size: int = 32, device: str = "cpu"):
        self.preflight(clip_path, head_path)
        self.clip = OpenClipLocal(clip_path, device)
        self.head = load_head(head_path).to(device)
        self.batch_size = batch_size

    @staticmethod
    def preflight(clip_path: str | None = None, head_path: str | None = None, **_) -> None:
        check_open_clip_folder(clip_path, "aesthetic", key="clip_path")
        if not head_path or not Path(head_path).expanduser().is_file():
            raise FileNotFoundError(
                f"the aesthetic reward needs its head weights: missing {head_path}. Get {HEAD_SOURCE} and set "
                f"its path as the reward's options.head_path in the config."
            )

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = [self.head(self.clip.image_features(images[i : i + self.batch_size])).squeeze(-1).cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out)
