"""Optional latent space: a frozen diffusers AutoencoderKL from a local folder (`model.vae`).

Latents are the encoder's posterior mean, shifted and scaled as diffusers pipelines do, z = (mean - shift) * scale
(scale = the VAE's scaling_factor, shift = its shift_factor or 0), so the prox model sees roughly unit-variance data.
The mean, not a posterior draw, keeps a data batch a pure function of the data cursor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL

VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def require_vae_files(path: str) -> Path:
    """The VAE folder, or a FileNotFoundError naming the files it must hold (nothing is loaded)."""
    folder = Path(path).expanduser()
    missing = [str(folder / f) for f in VAE_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"model.vae={path!r} is not a diffusers AutoencoderKL folder: missing {', '.join(missing)}. The folder needs "
            f"{' and '.join(VAE_FILES)}, as written by AutoencoderKL.save_pretrained(folder) or found in the vae/ "
            f"folder of a Stable Diffusion hub repository (e.g. stabilityai/sd-vae-ft-mse)."
        )
    return folder


def load_vae(path: str) -> AutoencoderKL:
    """A frozen AutoencoderKL in eval mode; a clear error naming the files a VAE folder must hold."""
    folder = require_vae_files(path)
    try:
        vae = AutoencoderKL.from_pretrained(folder)
    except Exception as e:  # a config of another class, or weights of another shape
        raise ValueError(f"model.vae={path!r} could not be loaded as an AutoencoderKL ({type(e).__name__}: {e}).") from e
    return vae.requires_grad_(False).eval()


def downscale(vae: AutoencoderKL) -> int:
    """Pixels per latent along a side: 2 per down block after the first."""
    return _downscale(vae.config.block_out_channels)


def _downscale(block_out_channels) -> int:
    return 2 ** (len(block_out_channels) - 1)


def vae_config(path: str) -> dict:
    """The VAE folder's config.json (no weights): FileNotFoundError naming missing files, ValueError if not JSON."""
    file = require_vae_files(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"model.vae={path!r}: {file} is not valid JSON ({e}); copy the VAE's folder again.") from None


def model_side(image_size: int, vae: str | None) -> int:
    """The side of the model's space: the image's, or the latents' read from the VAE folder's config (no weights)."""
    if vae is None:
        return image_size
    return image_size // _downscale(vae_config(vae)["block_out_channels"])


def _shift_scale(vae: AutoencoderKL) -> tuple[float, float]:
    return float(vae.config.get("shift_factor") or 0.0), float(vae.config.scaling_factor)


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] [B, C, H, W] -> scaled latents [B, latent_channels, H/f, W/f] (float32)."""
    vae.to(images.device)
    shift, scale = _shift_scale(vae)
    mean = vae.encode(images.to(vae.dtype)).latent_dist.mean
    return ((mean - shift) * scale).float()


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in roughly [-1, 1] (float32). Differentiable in the latents (the direct objective's
    reward gradient passes through it); the VAE is frozen, so no graph is kept unless the latents carry one."""
    vae.to(latents.device)
    shift, scale = _shift_scale(vae)
    return vae.decode((latents / scale + shift).to(vae.dtype)).sample.float()
