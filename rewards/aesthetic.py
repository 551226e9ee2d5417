"""The LAION aesthetic predictor: an MLP head on L2-normalised CLIP image embeddings (ViT-L/14 for the public head).

Weights: the CLIP folder (open_clip `local-dir:`, e.g. ViT-L-14 openai) and the head file
`sac+logos+ava1-l14-linearMSE.pth` from github.com/christophschuhmann/improved-aesthetic-predictor (loaded with
torch.load(weights_only=True): tensors only, no code), or the same tensors as `.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from proxmodel.openclip import CONFIG_FILE
from rewards.base import RewardModel, register
from rewards.clip_score import OpenClipLocal, missing_open_clip_files

HEAD_SOURCE = "sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor"
CLIP_SOURCE = "the hub repository timm/vit_large_patch14_clip_224.openai (OpenAI's ViT-L/14, open_clip's layout)"


def aesthetic_head(embed_dim: int) -> nn.Sequential:
    """The published architecture (dropouts are inactive in eval); `layers.N` keys match the released file."""
    return nn.Sequential(
        nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )


def head_state(path: str) -> dict[str, torch.Tensor]:
    path = str(Path(path).expanduser())  # as preflight checked it
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("layers."): v.float() for k, v in state.items()}


def head_input_width(path: str) -> int:
    """The CLIP embedding width the head takes (its first layer's input); ValueError if the file is not such a head."""
    try:
        return int(head_state(path)["0.weight"].shape[1])
    except Exception as e:  # not tensors (weights_only refuses code), another layout, a truncated file, ...
        raise ValueError(f"options.head_path={path} is not the aesthetic MLP head ({type(e).__name__}: {e}); "
                         f"get {HEAD_SOURCE}") from None


def load_head(path: str) -> nn.Sequential:
    state = head_state(path)
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
        """Both files named at once if missing; then the head must take the CLIP's embedding width (the public
        head is for ViT-L/14's 768; a ViT-B/32 folder, 512, failed at the first scoring in every reward actor)."""
        problems = []
        missing = missing_open_clip_files(clip_path, "clip_path")
        if missing:
            problems.append(f"its CLIP weights: missing {'; '.join(missing)}. Get them from {CLIP_SOURCE} into one "
                            f"folder, set as options.clip_path")
        if not head_path or not Path(head_path).expanduser().is_file():
            problems.append(f"its head weights: missing {head_path or 'options.head_path (not set)'}. Get "
                            f"{HEAD_SOURCE} and set its path as options.head_path")
        if problems:
            raise FileNotFoundError(f"the aesthetic reward needs {'; and '.join(problems)}.")
        config = json.loads((Path(clip_path).expanduser() / CONFIG_FILE).read_text())
        width = config.get("model_cfg", {}).get("embed_dim")
        takes = head_input_width(head_path)
        if width is not None and width != takes:
            raise ValueError(f"the aesthetic head {head_path} takes {takes}-d CLIP embeddings, but the CLIP at "
                             f"options.clip_path={clip_path} gives {width}-d ones. Use the CLIP the head was trained "
                             f"on ({CLIP_SOURCE}).")

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = [self.head(self.clip.image_features(images[i : i + self.batch_size])).squeeze(-1).cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out)
