"""Map ``device='cuda'`` (and integer devices) to the CPU for the whole run.

megatron-core writes ``device='cuda'`` / ``torch.cuda.current_device()`` literally inside the forward
pass (tensor-parallel mappings, grad clipping, token dispatch, pipeline schedules). A TorchFunctionMode
that rewrites the device argument catches every such call; it costs about 5% of a CPU step.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from patches import Patch

_CPU = torch.device("cpu")


def _is_cuda(dev) -> bool:
    if isinstance(dev, int) and not isinstance(dev, bool):
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


class CpuDeviceMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func in (torch.Tensor.to, torch.Tensor.cuda) and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


_mode: CpuDeviceMode | None = None


def _apply() -> None:
    global _mode
    _mode = CpuDeviceMode()
    _mode.__enter__()


PATCH = Patch(
    name="device_mode",
    fixes="device='cuda' literals in megatron-core's forward/backward and schedules",
    versions=">=0.16,<0.20",
    cpu_only=True,
    apply_fn=_apply,
)
