"""A ProxRL checkpoint as a diffusers pipeline: `ProxT2IPipeline.from_pretrained(folder)` (the project's loader:
safetensors, no code from the folder) or `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` (runs
the folder's pipeline.py, which imports this class: only for folders you trust).

Components, each in diffusers' / transformers' own format: `unet` (diffusers.UNet2DConditionModel: t in its time
slot, lam in its class-embedding slot), `text_encoder` (transformers.CLIPTextModel for the built-in text transformer
and `pretrained: clip`), `scheduler` (ProxScheduler: no arrays, just the settings the project's samplers read:
the VP schedule, the prox parameterisation, sigma_data, the trained step counts and samplers). The tokenizer is the
model's own (open_clip's CLIP BPE for the built-in encoder), rebuilt from `proxrl_model.text`, so `tokenizer` is
null. `proxrl_model` in model_index.json is the rest of the model config (sizes, text encoder, VAE path).

Calling the pipeline runs the project's policy sampler (proxmodel/policy.py), the one GRPO trains: the stochastic
hybrid prox sampler for a prox model, Euler-Maruyama for a score model.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

from proxmodel.config import ModelConfig
from proxmodel.model import ProxT2I
from proxmodel.policy import Policy

# The ModelConfig keys kept in scheduler_config.json (how the network's output is read and sampled); every other key
# is in model_index.json's `proxrl_model`. Each key lives in exactly one of the two.
SCHEDULER_KEYS = ("kind", "prox_param", "sigma_data", "trained_steps", "trained_variants")


class ProxScheduler(SchedulerMixin, ConfigMixin):
    """The sampling settings of a ProxT2I checkpoint (diffusers' scheduler slot; the sampler itself is proxmodel's)."""

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, kind: str = "prox", prox_param: str = "precond", sigma_data: Optional[float] = None,
                 trained_steps: Optional[list[int]] = None, trained_variants: Optional[list[str]] = None,
                 schedule: str = "vp", embed_scale: float = 1000.0, sampler: Optional[str] = None,
                 num_inference_steps: int = 10, eta: float = 1.0, guidance_scale: float = 1.0):
        pass


def model_config(architecture: dict, scheduler: dict) -> ModelConfig:
    """The ModelConfig of a checkpoint from model_index.json's `proxrl_model` and scheduler_config.json."""
    return ModelConfig.model_validate({**architecture, **{k: scheduler[k] for k in SCHEDULER_KEYS if k in scheduler}})


def split_config(cfg: ModelConfig) -> tuple[dict, dict]:
    """(proxrl_model, scheduler settings): the inverse of model_config."""
    full = cfg.model_dump(mode="json")
    return ({k: v for k, v in full.items() if k not in SCHEDULER_KEYS},
            {k: v for k, v in full.items() if k in SCHEDULER_KEYS})


class ProxT2IPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet"
    _optional_components = ["tokenizer", "text_encoder"]

    def __init__(self, unet: UNet2DConditionModel, scheduler: ProxScheduler, text_encoder=None, tokenizer=None,
                 proxrl_model: Optional[dict] = None):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(proxrl_model=proxrl_model)
        self._model: Optional[ProxT2I] = None

    @classmethod
    def from_pretrained(cls, folder, torch_dtype: Optional[torch.dtype] = None, **unsupported) -> "ProxT2IPipeline":
        """The checkpoint in `folder` (a local path; either layout), read by proxmodel.model.load_model: weights from
        safetensors, no code from the folder. (diffusers' loader would need trust_remote_code, since the index
        names the folder's pipeline.py.)"""
        if unsupported:
            raise TypeError(f"ProxT2IPipeline.from_pretrained takes a folder and torch_dtype only, not "
                            f"{sorted(unsupported)}; move the pipeline with .to(device) after loading.")
        from proxmodel.model import load_model

        pipe = cls.from_model(load_model(folder).eval())
        return pipe.to(torch_dtype) if torch_dtype is not None else pipe

    @classmethod
    def from_model(cls, model: ProxT2I) -> "ProxT2IPipeline":
        """The pipeline view of a ProxT2I (sharing its modules): what checkpoints are saved through."""
        architecture, settings = split_config(model.cfg)
        text = model.text if isinstance(model.text, torch.nn.Module) and hasattr(model.text, "save_pretrained") else None
        pipe = cls(unet=model.unet, scheduler=ProxScheduler(**settings), text_encoder=text, proxrl_model=architecture)
        pipe._model = model
        return pipe

    @property
    def model(self) -> ProxT2I:
        """The ProxT2I these components make up, built once around the pipeline's own U-Net (shared, so `pipe.to()`
        moves what samples; the text encoder's weights are copied into the model's encoder class), and kept on the
        U-Net's device and dtype."""
        if self._model is None:
            cfg = model_config(self.config.proxrl_model, dict(self.scheduler.config))
            if self.text_encoder is None and cfg.text.train:
                raise ValueError("this checkpoint's trained text encoder is not a transformers model (text_encoder is "
                                 "null): load it with proxmodel.model.load_model(folder), not the diffusers pipeline.")
            with torch.random.fork_rng(devices=[]):  # its random init is replaced: the caller's seed stays in force
                model = ProxT2I(cfg)
            model.unet = self.unet
            if self.text_encoder is not None:
                model.text.load_state_dict(self.text_encoder.state_dict())
            self._model = model.eval()
        return self._model.to(self.unet.device, self.unet.dtype)  # a no-op unless the pipeline was moved

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], num_images_per_prompt: int = 1,
                 num_inference_steps: Optional[int] = None, eta: Optional[float] = None,
                 guidance_scale: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 output_type: str = "pil") -> ImagePipelineOutput:
        """Images of `prompt` with the policy sampler; defaults from scheduler_config.json. `generator`: one
        torch.Generator for the whole batch (None: torch's global random state, as in diffusers). output_type:
        pil | pt ([B, C, H, W] in [0, 1])."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError("generator must be one torch.Generator for the whole batch (a list of generators, one "
                            "per image, is not supported); seed it for reproducible images.")
        s = self.scheduler.config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        model = self.model
        device = self.unet.device
        policy = Policy.of(model, num_inference_steps or s.num_inference_steps, s.eta if eta is None else eta,
                           s.guidance_scale if guidance_scale is None else guidance_scale, s.sampler or "hybrid")
        context = model.encode_text(model.tokenize(prompts, device))
        traj = policy.sample(model, {"context": context}, model.sample_shape(len(prompts)),
                             generator, device)
        images = model.to_images(traj.images).cpu()
        return ImagePipelineOutput(images=self.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
                                   if output_type == "pil" else images)
