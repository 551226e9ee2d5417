"""The conditional proximal operator prox_theta(y; t, lam, c) = y - sqrt(lam) eps_theta(y; t, lam, c).

eps_theta is the network's output under `prox_param: eps` (ProxDM), or, under `precond` (the default for new
models), the exact eps of a Gaussian p_t plus a learned, scaled correction (`precond_coefficients`).

Backbone: diffusers' UNet2DConditionModel with text cross-attention, the sinusoidal embedding of t in its time slot
and that of lam in its class-embedding slot, concatenated (`class_embeddings_concat`), each scaled x1000 as in
ProxDM. With `kind: score` the same backbone is the score baseline eps_theta(x_t; t, c): its lam input is held at 0.
Classifier-free guidance (method.md sec. 5) mixes the conditional and empty-caption outputs. Text: a small trainable
CLIP text transformer, or a pretrained encoder (proxmodel/text.py); the U-Net's cross-attention width follows the
encoder's. With `position_channels` the U-Net also sees each pixel's coordinates. Optionally the model works in a frozen VAE's latent space (proxmodel/latent.py); `to_images` is the one
way from model-space samples to [0, 1] images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from proxmodel.config import ModelConfig, architecture_problem
from proxmodel.schedule import VPSchedule
from proxmodel.latent import decode, downscale, encode, load_vae
from proxmodel.text import build_text_encoder, frozen

EMBED_SCALE = 1000.0  # t and lam are embedded as sinusoids of 1000 t and 1000 lam (ProxDM)


class ProxT2I(nn.Module):
    """eps_theta(y; t, lam, c), and the prox built from it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        problem = architecture_problem(cfg)
        if problem:
            raise ValueError(problem)
        self.cfg = cfg
        self.tokenizer, self.text = build_text_encoder(cfg.text)
        # Frozen and kept out of the module tree (a plain attribute, not a submodule), so it is in neither the
        # optimiser, the state dict nor the weight broadcasts; checkpoints refer to it by its path in their config.
        object.__setattr__(self, "_vae", load_vae(cfg.vae) if cfg.vae else None)
        self.schedule = VPSchedule()
        shape = self.sample_shape(1)
        channels = [cfg.base_channels * m for m in cfg.channel_mults]
        levels = range(len(channels))
        attn = set(cfg.attention_levels)
        down = [("CrossAttnDownBlock2D" if i in attn else "DownBlock2D") for i in levels]
        up = [("CrossAttnUpBlock2D" if i in attn else "UpBlock2D") for i in reversed(levels)]
        # diffusers' `attention_head_dim` argument of this class is, for historical reasons, the number of heads.
        heads = [max(1, c // cfg.attention_head_dim) for c in channels]
        self.unet = UNet2DConditionModel(
            sample_size=shape[-1],
            in_channels=shape[1] + (2 if cfg.position_channels else 0),
            out_channels=shape[1],
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            mid_block_type="UNetMidBlock2DCrossAttn" if attn else None,
            block_out_channels=tuple(channels),
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=min(8, cfg.base_channels),
            cross_attention_dim=self.text.width,
            attention_head_dim=tuple(heads),
            class_embed_type="timestep",
            class_embeddings_concat=True,
        )

    def sample_shape(self, batch: int) -> tuple[int, int, int, int]:
        """Shape of a batch in model space: pixels, or the VAE's latents."""
        cfg = self.cfg
        if self._vae is None:
            return (batch, cfg.channels, cfg.image_size, cfg.image_size)
        f = downscale(self._vae)
        if cfg.image_size % f:
            raise ValueError(f"model.image_size={cfg.image_size} must be a multiple of the VAE's downscale factor {f}.")
        return (batch, self._vae.config.latent_channels, cfg.image_size // f, cfg.image_size // f)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Data images in [-1, 1] -> model space (the identity without a VAE)."""
        return images if self._vae is None else encode(self._vae, images)

    def to_images(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Model-space samples -> images in [0, 1]: what rewards score and grids show (decoded by the VAE if any).
        clamp=False: the same map without the clamp to [0, 1], for gradients that must reach every pixel."""
        return to_unit(x if self._vae is None else decode(self._vae, x), clamp)

    def train(self, mode: bool = True) -> "ProxT2I":
        super().train(mode)
        if frozen(self.cfg.text):
            self.text.eval()  # a frozen encoder never trains: no dropout either
        return self

    def tokenize(self, captions: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        return self.tokenizer(captions).to(device)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token text features [B, L, width] for cross-attention."""
        if frozen(self.cfg.text):
            with torch.no_grad():
                return self.text(tokens)
        return self.text(tokens)

    def forward(
        self,
        y: torch.Tensor,
        t: torch.Tensor,
        lam: torch.Tensor,
        tokens: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """eps_theta(y; t, lam, c). Give either caption `tokens` or their precomputed `context`."""
        if context is None:
            context = self.encode_text(tokens)
        if self.cfg.kind == "score":
            lam = torch.zeros_like(t)  # the score baseline is conditioned on t only
        view = (-1, *([1] * (y.dim() - 1)))
        if self.cfg.kind == "prox" and self.cfg.prox_param == "precond":
            c_skip_eps, c_in, c_out = precond_coefficients(self.schedule.alpha(t), lam, self.sigma_data)
            return c_skip_eps.view(view) * y + c_out.view(view) * self._net(y * c_in.view(view), t, lam, context)
        # ProxDM's parameterisation; its inputs are scaled by 1 / sqrt(1 + lam), the variance of y when p_t = N(0, I).
        return self._net(y * torch.rsqrt(1.0 + lam).view(view), t, lam, context)

    @property
    def sigma_data(self) -> float:
        return self.cfg.sigma_data or 1.0

    def _net(self, y_in: torch.Tensor, t: torch.Tensor, lam: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.conv_in.weight.dtype  # bf16 under mixed precision; the output comes back in float32
        if self.cfg.position_channels:
            y_in = torch.cat([y_in, position_grid(y_in)], dim=1)
        out = self.unet(
            y_in.to(dtype),
            t * EMBED_SCALE,
            encoder_hidden_states=context.to(dtype),
            class_labels=lam * EMBED_SCALE,
            return_dict=False,
        )
        return out[0].float()


def position_grid(y: torch.Tensor) -> torch.Tensor:
    """[B, 2, H, W]: each pixel's x (along the width) and y (along the height) in [-1, 1], left/top = -1."""
    b, _, h, w = y.shape
    ys = torch.linspace(-1.0, 1.0, h, device=y.device, dtype=y.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=y.device, dtype=y.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # [2, H, W]: grid[0] varies along W, grid[1] along H
    return grid.expand(b, -1, -1, -1)


def marginal_variance(alpha, sigma_data: float):
    """v_t = alpha_t sigma_data^2 + 1 - alpha_t: the per-dimension variance of x_t for data of variance sigma_data^2."""
    return alpha * sigma_data**2 + (1.0 - alpha)


def precond_coefficients(alpha: torch.Tensor, lam: torch.Tensor,
                         sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """eps = c_skip_eps y + c_out F(c_in y): the `precond` parameterisation, written in eps so loss and samplers stay.

    With p_t = N(0, v_t I), v_t = alpha_t sigma_data^2 + 1 - alpha_t, the prox is v_t / (v_t + lam) y, i.e.
    eps = sqrt(lam) / (v_t + lam) y: that is the skip term, so with F = 0 the prox is exact for Gaussian data and
    shrinks any input, however noisy, by the Gaussian's factor. c_in = 1 / sqrt(v_t + lam) gives F unit-variance
    inputs in training; c_out = sqrt(v_t / (v_t + lam)), the std of xi given y under the Gaussian, gives its target
    unit variance (docs/results.md, "Sampler calibration", derives both). The prox is
    c_skip y - sqrt(lam v_t / (v_t + lam)) F.
    """
    v = marginal_variance(alpha, sigma_data)
    total = v + lam
    return lam.sqrt() / total, total.rsqrt(), (v / total).sqrt()


def to_unit(x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Pixel space [-1, 1] to image space [0, 1]; samples go through ProxT2I.to_images, which decodes latents first."""
    unit = (x.float() + 1.0) / 2.0
    return unit.clamp(0.0, 1.0) if clamp else unit


def empty_condition(model: nn.Module, condition: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The empty-caption condition of the same kind and batch as `condition` (`tokens=` or `context=`); a context is
    one encoding of "" repeated (the encoder ran on B empty captions at every guided network call: a third of a
    guided call's cost with a CLIP-L encoder)."""
    base: ProxT2I = getattr(model, "module", model)  # a DeepSpeed engine wraps the ProxT2I
    (kind, value), = condition.items()
    if kind == "tokens":
        return {"tokens": base.tokenize([""] * value.shape[0], value.device)}
    empty = base.encode_text(base.tokenize([""], value.device))
    return {"context": empty.expand(value.shape[0], *empty.shape[1:])}


def guided_eps(model: nn.Module, y: torch.Tensor, t: torch.Tensor, lam: torch.Tensor, guidance: float,
               **condition) -> torch.Tensor:
    """eps_hat = eps(., empty) + w (eps(., c) - eps(., empty)); w = 1 is the plain conditional eps (one forward).

    The conditional and empty-caption halves go through the network as one batch.
    """
    if guidance == 1.0:
        return model(y, t, lam, **condition)
    (kind, value), = condition.items()
    both = {kind: torch.cat([empty_condition(model, condition)[kind], value])}
    eps_empty, eps_cond = model(torch.cat([y, y]), torch.cat([t, t]), torch.cat([lam, lam]), **both).chunk(2)
    return eps_empty + guidance * (eps_cond - eps_empty)


def prox_fn(model: nn.Module, guidance: float = 1.0, **condition):
    """prox(y, t, lam) = y - sqrt(lam) eps_hat for a fixed caption condition (`tokens=` or `context=`).

    `model` is a ProxT2I or anything that forwards like one, e.g. the DeepSpeed engine wrapping it; `guidance` is
    the classifier-free guidance scale w (1 = no guidance).
    """

    def prox(y: torch.Tensor, t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        eps = guided_eps(model, y, t, lam, guidance, **condition)
        return y - lam.sqrt().view(-1, *([1] * (y.dim() - 1))) * eps

    return prox


def save_model(model: ProxT2I, directory: str | Path, dtype: torch.dtype = torch.float32,
               card: Optional[dict] = None) -> Path:
    """Write `model` as a checkpoint folder in the diffusers layout (proxmodel/checkpoint.py), replaced whole."""
    return save_state(model.state_dict(), model.cfg, directory, dtype, card=card)


def save_state(state: dict[str, torch.Tensor], cfg: ModelConfig, directory: str | Path,
               dtype: torch.dtype = torch.float32, card: Optional[dict] = None) -> Path:
    """save_model for a full state dict held apart from its module (e.g. gathered from ZeRO-3 shards or an EMA);
    `card`: how it was made, for the folder's README.md."""
    from proxmodel.checkpoint import save_checkpoint

    return save_checkpoint(state, cfg, directory, dtype, card)


def load_model(directory: str | Path) -> ProxT2I:
    """A ProxT2I from a checkpoint folder: the diffusers layout or the earlier config.json + model.safetensors
    (safetensors and JSON only, no pickle)."""
    from proxmodel.checkpoint import load_checkpoint_folder

    return load_checkpoint_folder(directory)
