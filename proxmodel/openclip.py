"""open_clip models from a local folder (open_clip's `local-dir:` layout), for the text encoder and the CLIP rewards.

The folder is what open_clip's hub repositories hold: `open_clip_config.json` (model_cfg + preprocess_cfg) and
`open_clip_model.safetensors` (or `.bin`). It lives here, in the model family, so that rewards may build on it and
proxmodel never imports rewards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")
SOURCE = (
    "an open_clip model repository on the Hugging Face hub, e.g. laion/CLIP-ViT-B-32-laion2B-s34B-b79K "
    "(download open_clip_config.json and open_clip_model.safetensors on a machine with internet)"
)


def load_open_clip(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Callable, Callable]:
    """(model in eval mode, its image preprocessing transform, its tokenizer) from a `local-dir:` folder."""
    import open_clip

    folder = Path(path).expanduser().resolve()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")
