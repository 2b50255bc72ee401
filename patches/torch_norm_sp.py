"""Allow sequence parallelism with the torch norms of megatron-core's local layer spec.

``WrappedTorchNorm`` asserts ``not config.sequence_parallel``, but MoE with TP > 1 requires sequence
parallelism, so the local (non-TransformerEngine) spec cannot run TP at all. The replacement builds the
same torch norm and marks its weights ``sequence_parallel`` exactly as TE's and Apex's norms do, which is
what makes ``finalize_model_grads`` all-reduce their gradients over the TP group.
"""

from __future__ import annotations

import torch

from patches import Patch


def _new(
    cls,
    config,
    hidden_size,
    eps=1e-5,
    persist_layer_norm=False,
    zero_centered_gamma=False,
    normalization="LayerNorm",
):
    assert not config.layernorm_zero_centered_gamma, "zero_centered_gamma not supported by torch norms"
    kind = config.normalization
    if kind == "LayerNorm":
        norm = torch.nn.LayerNorm(hidden_size, eps=eps)
    elif kind == "RMSNorm":
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
    else:
        raise ValueError(f"normalization {kind!r} is not supported by the torch norm wrapper")
    for p in norm.parameters():
        p.sequence_parallel = bool(config.sequence_parallel)
    return norm


def _apply() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    WrappedTorchNorm.__new__ = _new


PATCH = Patch(
    name="torch_norm_sp",
    fixes="torch LayerNorm/RMSNorm wrapper refuses sequence parallel (needed by MoE with TP>1)",
    versions=">=0.16,<0.20",
    cpu_only=True,
    apply_fn=_apply,
)
