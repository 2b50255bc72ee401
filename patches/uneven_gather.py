"""Uneven all-gather / reduce-scatter along the first dimension on gloo.

With TP > 1 and EP > 1 the alltoall dispatcher gathers token blocks of different sizes per rank.
megatron-core calls ``dist.all_gather`` / ``dist.reduce_scatter`` with uneven tensor lists, which gloo
rejects ("invalid tensor size") or does not implement. The replacements pad to the largest split and use
the even collectives, then slice; equal-size calls keep megatron's own path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from patches import Patch

_orig_gather = None
_orig_reduce_scatter = None


def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
    if output_split_sizes is None or group.size() == 1:
        return _orig_gather(input_, group, output_split_sizes, use_global_buffer)
    width = max(output_split_sizes)
    padded = input_.new_zeros((width, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    out = input_.new_empty((width * group.size(), *input_.shape[1:]))
    dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
    chunks = [out[i * width : i * width + n] for i, n in enumerate(output_split_sizes)]
    return torch.cat(chunks, dim=0)


def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
    if input_split_sizes is None or group.size() == 1:
        return _orig_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
    total = input_.contiguous().clone()
    dist.all_reduce(total, group=group)
    start = sum(input_split_sizes[: group.rank()])
    return total[start : start + input_split_sizes[group.rank()]].contiguous()


def _apply() -> None:
    global _orig_gather, _orig_reduce_scatter
    from megatron.core.tensor_parallel import mappings

    _orig_gather = mappings._gather_along_first_dim
    _orig_reduce_scatter = mappings._reduce_scatter_along_first_dim
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


PATCH = Patch(
    name="uneven_gather",
    fixes="gloo rejects uneven all_gather/reduce_scatter used by the alltoall dispatcher with TP>1, EP>1",
    versions=">=0.16,<0.20",
    cpu_only=True,
    apply_fn=_apply,
)
