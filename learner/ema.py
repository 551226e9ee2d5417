"""Exponential moving average of the weights in pretraining (docs/method.md sec. 5), via torch's AveragedModel.

The average is a full fp32 copy of the model made BEFORE DeepSpeed wraps it, so it holds whole tensors under every
ZeRO stage. ZeRO-1/2 keep the full parameters on every rank, so the update reads them directly; under ZeRO-3 the
shards are gathered for the update (every rank keeps the same full average). bf16 parameters are cast to the
average's fp32 before the lerp. Update rule, with the usual warm-up of the decay (as diffusers' EMAModel) so that a
short run's average is not dominated by the random initial weights:

    e_1 = p_1,   e_k = d_k e_{k-1} + (1 - d_k) p_k,   d_k = min(decay, k / (k + 9))   (k = 2, 3, ...)
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Optional

import deepspeed
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def warmed_decay(decay: float, updates_so_far: int) -> float:
    """d_k for the k-th update (updates_so_far = k - 1 >= 1): min(decay, k / (k + 9))."""
    return min(decay, (1.0 + updates_so_far) / (10.0 + updates_so_far))


def make_ema(model: nn.Module, decay: float, warmup: bool = True) -> Optional[AveragedModel]:
    """An fp32 EMA of `model` (call before DeepSpeed partitions it); None when decay is 0 (EMA off).

    warmup=False: the average starts AT the model's current weights and every update uses `decay` itself,
    e_k = decay e_{k-1} + (1 - decay) p_k (fine-tuning: the average stays anchored to the starting model)."""
    if decay == 0.0:
        return None

    # torch's get_ema_multi_avg_fn has a fixed decay and needs equal dtypes: this adds the warm-up and the cast.
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        weight = 1.0 - (warmed_decay(decay, int(n_averaged)) if warmup else decay)
        for a, p in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(p.to(a.dtype), weight)
            else:  # integer buffers (e.g. CLIP's position ids) are constants, not averaged
                a.copy_(p)

    ema = AveragedModel(copy.deepcopy(model).float(), multi_avg_fn=update, use_buffers=True)
    if not warmup:  # the copy is the first average: AveragedModel's first update would overwrite it otherwise
        ema.n_averaged += 1
    return ema.eval().requires_grad_(False)


def update_ema(ema: AveragedModel, engine) -> None:
    """Fold the engine's current weights into the average (gathering ZeRO-3 shards if need be)."""
    module = engine.module
    zero3 = getattr(engine, "zero_optimization_stage", lambda: 0)() == 3
    gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) if zero3 else nullcontext()
    with gather:
        ema.update_parameters(module)


def ema_metadata(ema: AveragedModel, decay: float) -> dict[str, str]:
    """What a checkpoint written from the average records about it."""
    return {"ema_decay": str(decay), "ema_updates": str(int(ema.n_averaged))}
