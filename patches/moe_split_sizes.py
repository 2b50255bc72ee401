"""Turn the alltoall dispatcher's split sizes into numbers on CPU.

``maybe_move_tensor_to_cpu`` only converts CUDA tensors, so on CPU the all-to-all split sizes stay
tensors and ``dist.all_to_all_single`` raises TypeError. The replacement converts CPU tensors too.
"""

from __future__ import annotations

import torch

from patches import Patch


def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    if torch.is_tensor(tensor):
        tensor = tensor.detach().to("cpu")
        if as_numpy:
            return tensor.numpy()
    return tensor


def _apply() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


PATCH = Patch(
    name="moe_split_sizes",
    fixes="EP>1 with the alltoall dispatcher: split sizes stay tensors on CPU and all_to_all fails",
    versions=">=0.16,<0.20",
    cpu_only=True,
    apply_fn=_apply,
)
