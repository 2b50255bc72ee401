"""Make ``Tensor.type()`` report CPU float tensors as ``torch.cuda.*Tensor``.

megatron-core checks type strings in three places that every layout reaches: the assert in
``clip_grad_by_total_norm_fp32``, ``DistributedOptimizer._build_model_and_main_param_groups`` and the
fp16/bf16 branches of ``optimizer.py``. Only the no-argument form is changed; conversions such as
``.type(torch.float16)`` are untouched, and neither torch nor deepspeed calls the no-argument form on
these paths.
"""

from __future__ import annotations

import torch

from patches import Patch

_orig_type = torch.Tensor.type


def _type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs:
        t = _orig_type(self)
        if self.device.type == "cpu" and t.startswith("torch.") and not t.startswith("torch.cuda."):
            return "torch.cuda." + t[len("torch.") :]
        return t
    return _orig_type(self, dtype, non_blocking, **kwargs)


def _apply() -> None:
    torch.Tensor.type = _type


PATCH = Patch(
    name="tensor_type",
    fixes="type-string asserts (clip_grads, distributed optimizer, mixed-precision branches) reject CPU",
    versions=">=0.16,<0.20",
    cpu_only=True,
    apply_fn=_apply,
)
