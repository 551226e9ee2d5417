"""The DeepSpeed engine every mode trains through: process-group setup, ZeRO config, full weights out.

Device-agnostic: on a machine without CUDA it selects DeepSpeed's CPU accelerator and the gloo backend; with GPUs
it uses nccl. The client optimizer is torch AdamW (no compiled op) that skips a step with a non-finite gradient.

Non-finite numbers never reach the weights: `train_step` makes a non-finite loss give NaN gradients, and an
optimiser step whose (all-reduced, so every rank agrees) gradients are not all finite is skipped: by DeepSpeed's
own overflow check under ZeRO 1-3, by `AdamWSkipNonFinite` without ZeRO. Either way DeepSpeed counts it in
`engine.skipped_steps` and `engine.was_step_applied()` is False, which is what the modes count (`NonFiniteSteps`).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from actors.net import free_port

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402  (DS_ACCELERATOR must be set before the import)
import torch.distributed as dist  # noqa: E402


def device() -> torch.device:
    """The device DeepSpeed's accelerator trains on (DS_ACCELERATOR=cpu on a GPU node means the CPU)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def prepare_ops() -> None:
    """Build the op DeepSpeed compiles on first use, saying so. On a CPU machine init_distributed JIT-compiles a
    shared-memory all-reduce (1-3 minutes on 2 cores) the first time, silently; later runs load it from torch's
    extension cache. Called by the drivers before any rank starts, so the wait is announced and never counted in an
    iteration."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: where the JIT cache keeps the op

        built = any(Path(_get_build_directory(builder.NAME, False)).glob("*.so"))
    except Exception:  # the cache layout changed: just build (a no-op if it is there)
        built = False
    if not built:
        print("DeepSpeed is building its CPU communication op once (1-3 minutes on 2 cores; later runs reuse it)",
              flush=True)
    builder.load(verbose=False)


def init_distributed(rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1", master_port: Optional[int] = None) -> None:
    """Join (or create) the process group; a no-op if this process already has one.

    LOCAL_RANK is 0: under Ray each rank is an actor that sees only the GPU(s) Ray gave it, as cuda:0. The
    rendezvous store listens on master_addr only (torch's own TCPStore listens on every interface, unauthenticated,
    whatever MASTER_ADDR says), and DeepSpeed adopts the group.
    """
    if dist.is_available() and dist.is_initialized():
        return
    port = master_port or free_port(master_addr)
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK="0",
                      WORLD_SIZE=str(world_size))
    from deepspeed.accelerator import get_accelerator  # its backend: nccl on CUDA, gloo (or oneCCL) on the CPU

    backend = get_accelerator().communication_backend_name()
    timeout = datetime.timedelta(minutes=30)  # DeepSpeed's own default for the group
    if rank == 0:
        family = socket.AF_INET6 if ":" in master_addr else socket.AF_INET
        _listening.append(socket.create_server((master_addr, port), family=family, backlog=max(128, world_size)))
        store = dist.TCPStore(master_addr, port, world_size, True, timeout, master_listen_fd=_listening[-1].fileno())
    else:
        store = dist.TCPStore(master_addr, port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


_listening: list[socket.socket] = []  # rank 0's store socket, open for the process's life (the store uses its fd)


class AdamWSkipNonFinite(torch.optim.AdamW):
    """AdamW that leaves the weights and its moments untouched when a gradient holds a NaN or inf, and says so in
    `overflow`: the flag DeepSpeed's engine reads to count a step as skipped (ZeRO's optimizers set their own)."""

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        return None if self.overflow else super().step(closure)


def train_step(engine, loss: torch.Tensor) -> None:
    """One micro-step: backward and step. A non-finite loss is multiplied by NaN first, so its gradient is NaN
    even where the loss's own gradient would be finite (an inf constant): the optimiser step it belongs to is then
    skipped on every rank, since the ranks' gradients are averaged before the check. (A multiplier of 1 or NaN,
    not an `if`: reading the flag on the host would wait for the GPU at every micro-step.)"""
    finite = torch.isfinite(loss.detach()).all()
    loss = loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)
    engine.backward(loss)
    engine.step()


@dataclass
class NonFiniteSteps:
    """Optimiser steps skipped for a non-finite loss or gradient: in total and in a row. `limit` in a row and the
    run stops (`exceeded`): one bad batch is survivable, a stream of them means the run is broken."""

    limit: int
    total: int = 0
    in_a_row: int = 0

    def record(self, applied: bool) -> None:
        self.total, self.in_a_row = (self.total, 0) if applied else (self.total + 1, self.in_a_row + 1)

    @property
    def exceeded(self) -> bool:
        return self.in_a_row >= self.limit


def build_engine(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    zero_stage: int,
    bf16: bool,
    grad_accum: int = 1,
    micro_batch: int = 1,
    lr_lambda: Optional[Callable[[int], float]] = None,
    adam_eps: float = 1e-8,
):
    """A DeepSpeed engine around `model` with AdamW; the lr follows `lr_lambda(step)` (x lr) if given."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # frozen parts (a pretrained encoder) stay out
    optimizer = AdamWSkipNonFinite(trainable, lr=lr, weight_decay=weight_decay, eps=adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda else None
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def full_state_dict(engine, keep: bool = True) -> Optional[dict[str, torch.Tensor]]:
    """The full weights as the module holds them, as fp32 on CPU, gathered once from ZeRO-3 shards if need be. Under
    deepspeed.bf16 they are the bf16-rounded weights the rollouts sample with, not the optimizer's fp32 master copy.
    keep=False: take part in the gather (every rank must) but copy nothing and return None (ranks whose copy no one
    reads: each copy is the whole model in host memory and, returned from a Ray actor, in the object store)."""
    module = engine.module

    def copy():
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if keep else None

    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return copy()
    return copy()
