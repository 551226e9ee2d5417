"""LoRA adapters on the U-Net (peft, through diffusers' adapter API): train and ship a few percent of the weights.

With `grpo.lora.rank > 0` the learner trains only the adapters; rollouts receive only the adapters' weights at each
publication (the base stays where it was loaded); the KL reference is the same network with the adapters switched
off (no second copy of the model); and the exported checkpoint is the base with the adapters merged in, a plain
checkpoint that loads without peft. Adapter weights are named `...<module>.lora_A.default.weight` (and lora_B) in
the model's state dict.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from proxmodel.config import DEFAULT_LORA_TARGETS as DEFAULT_TARGETS
from proxmodel.config import LoraSpec

__all__ = ["LoraSpec", "add_lora", "adapter_state", "adapters_off", "is_adapter", "load_adapters", "load_published", "merged", "BaseOf"]


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def add_lora(model: nn.Module, spec: LoraSpec) -> None:
    """Inject adapters into `model.unet` (lora_B starts at zero: the model computes exactly what it did) and make
    them the only trainable weights of `model`, the text encoder included."""
    from peft import LoraConfig

    require_targets(model, spec.targets, "grpo.lora.targets")
    model.unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                                      init_lora_weights=True))
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))


def with_lora(model: nn.Module, spec: LoraSpec | None) -> nn.Module:
    """`model` with adapters added if `spec` is given (a LoRA run's policy: published states hold only those)."""
    if spec:
        add_lora(model, spec)
    return model


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters' part of a state dict: what a LoRA run publishes to its rollouts."""
    return {k: v for k, v in state.items() if is_adapter(k)}


def load_adapters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load published adapter weights into a model that has the same adapters; any other key is an error."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    absent = [k for k in missing if is_adapter(k)]
    if unexpected or absent or not state:
        raise RuntimeError(f"adapter weights do not fit this model: unexpected {unexpected[:3]}, missing "
                           f"{absent[:3]} (were the adapters added with the same grpo.lora settings?)")


def load_published(model: nn.Module, state: dict[str, torch.Tensor], lora: LoraSpec | None) -> None:
    """Load what a learner published: the adapters alone in a LoRA run, every weight otherwise."""
    if lora:
        load_adapters(model, state)
    else:
        model.load_state_dict(state)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """`model` computes the base network inside the block (the KL reference of a LoRA run)."""
    model.unet.disable_adapters()
    try:
        yield
    finally:
        model.unet.enable_adapters()


class BaseOf(nn.Module):
    """The base network of a model with adapters, as a module: the KL reference without a second copy."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str):  # cfg, tokenize, ... of the wrapped model
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with its adapters merged into the base weights and removed: a plain model."""
    plain = copy.deepcopy(model)
    plain.unet.fuse_lora()
    plain.unet.unload_lora()
    return plain


def train_only(model: nn.Module, targets: Sequence[str]) -> int:
    """Freeze every U-Net weight outside the modules named by `targets` (full-rank training of a subset); returns
    how many weights still train. A target naming no module is an error, as for the adapters."""
    require_targets(model, targets, "grpo.train_modules")
    model.unet.requires_grad_(False)
    for name, module in model.unet.named_modules():
        if named_by(name, targets):
            module.requires_grad_(True)
    return sum(p.numel() for p in model.unet.parameters() if p.requires_grad)


def named_by(name: str, targets: Sequence[str]) -> bool:
    """Whether module `name` is one of `targets` (a whole name or its last dotted parts)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def require_targets(model: nn.Module, targets: Sequence[str], key: str) -> None:
    """Refuse, naming `key`, targets that name no module of `model.unet` (a misspelt one would silently adapt or
    train nothing)."""
    names = [name for name, _ in model.unet.named_modules()]
    unknown = [t for t in targets if not any(named_by(n, [t]) for n in names)]
    if unknown:
        raise ValueError(f"{key} {unknown} name no module of the U-Net; use module names such as "
                         f"{list(DEFAULT_TARGETS)} (the last parts of the names in model.unet.named_modules())")