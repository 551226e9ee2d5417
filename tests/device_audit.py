"""Run code as if a model's device were an accelerator, on a CPU-only machine.

The model goes on torch's `meta` device (shapes, no data: its compute costs nothing) and the code runs inside
`OnDevice`, a TorchDispatchMode that sees every aten op: an op whose tensors sit on two devices fails, as it would
with a GPU (on meta, torch itself lets many such ops through), and `ran` records where each op computed, so a test
can check that the network ran on the chosen device and not quietly on the CPU. Copies from meta to the CPU (the
boundary out: images for rewards, stream entries, logged numbers) arrive as zeros, so the code can carry on.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
COPIES = {aten._to_copy.default, aten.copy_.default}
NETWORK_OPS = ("convolution", "mm", "addmm", "bmm", "baddbmm", "embedding", "native_group_norm", "native_layer_norm")


class OnDevice(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ran: dict[str, set[str]] = defaultdict(set)  # op name -> device types it computed on

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        if func in COPIES:  # the one way between devices
            source = args[1] if func is aten.copy_.default else args[0]
            target = args[0].device if func is aten.copy_.default else kwargs.get("device", source.device)
            if source.is_meta and torch.device(target).type == "cpu":
                if func is aten.copy_.default:
                    return args[0].zero_()
                return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
            return func(*args, **kwargs)
        devices = {t.device.type for t in tensors if t.dim() > 0}  # 0-dim CPU tensors are scalars, allowed anywhere
        if len(devices) > 1:
            raise AssertionError(f"aten.{name} got tensors on {sorted(devices)}: a missing .to(device)")
        self.ran[name] |= devices
        if func is aten._local_scalar_dense.default and args[0].is_meta:  # .item() / float() of a meta tensor
            return torch.zeros((), dtype=args[0].dtype).item()
        return func(*args, **kwargs)

    def network_devices(self) -> set[str]:
        """The device types the network's heavy ops (convolutions, matmuls, norms, embeddings) ran on."""
        return set().union(*(self.ran[op] for op in NETWORK_OPS if op in self.ran))
