"""Where an actor computes: chosen once, from what Ray gave it.

Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned, so an actor with a GPU sees it as cuda:0. Each actor moves its
model there once and moves what it receives there; what it sends (stream entries, images for the reward actors,
weights) is on the CPU, so any node can read it.
"""

from __future__ import annotations

from typing import Optional

import torch


def actor_device(requested: Optional[str] = None) -> torch.device:
    """`requested` if given (tests, or forcing the CPU); else the GPU Ray assigned, if torch sees it; else the CPU."""
    if requested is not None:
        return torch.device(requested)
    import ray

    if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")
