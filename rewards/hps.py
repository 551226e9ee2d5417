"""HPSv2 / HPSv2.1: human-preference score from the `hpsv2` package's ViT-H-14 (its own open_clip fork).

Score = cosine of the image and caption embeddings, computed as `hpsv2.score` does (model(image, text) with
output_dict, then the diagonal of image_features @ text_features.T; no logit scale). The checkpoint
(HPS_v2_compressed.pt or HPS_v2.1_compressed.pt from the hub repo xswu/HPSv2) holds the whole model, so the
laion ViT-H-14 weights the package would also download are not needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from rewards import compat
from rewards.base import RewardModel, register, to_uint8_images

CHECKPOINTS = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def check_hps_checkpoint(checkpoint: str | None) -> None:
    """Raise FileNotFoundError naming the file, its hub source and the config key."""
    if checkpoint and Path(checkpoint).expanduser().is_file():
        return
    raise FileNotFoundError(
        f"the hpsv2 reward needs an HPS checkpoint: missing {checkpoint or '(options.checkpoint is not set)'}. "
        f"Download {CHECKPOINTS['v2.1']} (HPSv2.1) or {CHECKPOINTS['v2']} (HPSv2) from the Hugging Face repo "
        f"xswu/HPSv2 (hf download xswu/HPSv2 {CHECKPOINTS['v2.1']} --local-dir /models/hps) and set "
        f"its path as the reward's options.checkpoint "
        f"(rewards: [{{name: hpsv2, options: {{checkpoint: /models/hps/{CHECKPOINTS['v2.1']}}}}}])."
    )


@register("hpsv2")
class HPSv2(RewardModel):
    """HPS of each (image, caption); about 0.2-0.35 for real models. v2 or v2.1 depends on the checkpoint file."""

    def __init__(self, checkpoint: str, architecture: str = "ViT-H-14", batch_size: int = 16, device: str = "cpu"):
        self.preflight(checkpoint)
        open_clip = compat.hpsv2_open_clip()
        # The arguments hpsv2.img_score.initialize_model passes, minus the pretrained tag (the checkpoint is complete).
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            architecture, None, precision="amp", device=device, jit=False, force_quick_gelu=False,
            force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
            image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
            with_score_predictor=False, with_region_predictor=False,
        )
        state = torch.load(Path(checkpoint).expanduser(), map_location="cpu", weights_only=True, mmap=True)
        self.model.load_state_dict(state.get("state_dict", state))
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(architecture)
        self.device, self.batch_size = torch.device(device), batch_size

    @staticmethod
    def preflight(checkpoint: str | None = None, **_) -> None:
        compat.require("hpsv2")
        check_hps_checkpoint(checkpoint)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            arr = to_uint8_images(images[i : i + self.batch_size])
            pixels = torch.stack([self.preprocess(Image.fromarray(a)) for a in arr]).to(self.device)
            tokens = self.tokenizer(list(prompts[i : i + self.batch_size])).to(self.device)
            # hpsv2 scores under CUDA autocast (fp16); on CPU it runs in float32.
            with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
                outputs = self.model(pixels, tokens)
                cos = (outputs["image_features"] * outputs["text_features"]).sum(dim=-1)
            out.append(cos.float().cpu())
        return torch.cat(out)
