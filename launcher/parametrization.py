"""Apply the muP table to freshly built megatron-core GPTModel chunks: init scales and output multipliers.

The optimizer half of muP (per-group LR, weight decay, Adam eps) is applied by ``launcher/optim.py``; this
module applies the model half, which megatron-core 0.16 cannot express:

* **Init.** Every matrix of a muP group gets the group's init std (``MupTable.init_stds()``). megatron has
  already drawn each weight from N(0, s_megatron) (``init_method``, ``output_layer_init_method``,
  ``embedding_init_method``: all ``torch.nn.init.normal_`` partials), so multiplying by
  ``std / s_megatron`` gives exactly an N(0, std) draw. Rescaling instead of re-drawing keeps megatron's
  RNG streams as they are: on GPU the model-parallel tracker forks (different values per TP rank for
  split weights, the expert-parallel stream for experts), on CPU the master-weight-then-scatter init;
  each rank touches only its local shard, and a tied output copy on the last pipeline stage (already
  all-reduced from the embedding) gets the embedding's factor, so the tie holds without a collective.
  With every ratio 1 the factor is 1 and the weights are bitwise megatron's, so muP at the base shape
  trains exactly like the standard parameterisation. Standard parameterisation: nothing is touched.
* **Multipliers** as forward hooks (scaling module outputs, not weights: under Adam a weight multiplier
  also rescales the update, a different parameterisation):
  residual branch ``x table.residual_mult`` on every layer's ``self_attention`` and ``mlp`` (MLP or
  MoE layer, shared experts included) output and bias before the bias-dropout-add; logits
  ``x table.output_logit_mult`` on ``output_layer``'s output (also for tied heads, whose
  ``output_layer`` runs with the embedding weight); embedding ``x table.embedding_mult`` on
  ``embedding``'s output. A chunk without an embedding or output layer (pipeline stages, VPP) just
  gets fewer hooks; TP/SP/EP shards are scaled elementwise, so every layout computes the same model.
  Hooks are only registered for multipliers other than 1.
* **Softmax scale** is not a hook: ``launcher/model.py::transformer_config`` passes
  ``table.softmax_scale`` as ``TransformerConfig.softmax_scale``.

Correspondence with megatron-core >= 0.17 ``use_mup`` (not installable here; rules in
``launcher/laws/mup.py``): its init (``init_method`` std / sqrt(width_mult), output projections
``mup_scaled_init_method_normal``, embedding and output unscaled) is our rescaled init for the width
rules; ``mup_embedding_mult`` (applied inside ``LanguageModelEmbedding.forward``) is our embedding hook;
``mup_output_mult`` (1/width_mult by default, on the logits) is our logit hook; the
``mup_base_head_dim`` softmax scale is ``table.softmax_scale``. It has no residual-branch multiplier
(our depth rule). Never enable both: :func:`apply` refuses a config with ``use_mup`` set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from launcher.errors import RampError, require
from launcher.laws.mup import MupTable, group_of

#: muP group -> the TransformerConfig init method megatron-core 0.16 drew that group's weights with.
_MEGATRON_INIT = {
    "embedding": "embedding_init_method",
    "attention_qkv": "init_method",
    "attention_out": "output_layer_init_method",
    "dense_mlp.fc1": "init_method",
    "dense_mlp.fc2": "output_layer_init_method",
    "experts.fc1": "init_method",
    "experts.fc2": "output_layer_init_method",
    "shared_experts.fc1": "init_method",
    "shared_experts.fc2": "output_layer_init_method",
    "router": "init_method",
    "output": "init_method",  # untied head (GPTModel.output_layer); a tied copy follows the embedding
}

_APPLIED = "_ramp_mup_applied"


def apply(chunks: list[torch.nn.Module], table: MupTable, config) -> list[torch.utils.hooks.RemovableHandle]:
    """Rescale init and register the multiplier hooks on unwrapped GPTModel chunks (before DDP).

    Returns the hook handles (empty under the standard parameterisation). Call once per chunk.
    """
    if not table.enabled:
        return []
    require(
        not getattr(config, "use_mup", False),
        "TransformerConfig.use_mup is set: megatron-core's muP and ramp's would both apply; use one",
    )
    for chunk in chunks:
        require(not getattr(chunk, _APPLIED, False), "muP parameterisation applied twice to one chunk")
        setattr(chunk, _APPLIED, True)
        rescale_init(chunk, table, config)
    return register_hooks(chunks, table, config)


def megatron_init_std(config, group: str) -> float:
    """The std megatron-core drew a group's weights with, read from the config's init partials."""
    init = getattr(config, _MEGATRON_INIT[group])
    ok = isinstance(init, functools.partial) and init.func is torch.nn.init.normal_
    ok = ok and float(init.keywords.get("mean", 0.0)) == 0.0 and "std" in init.keywords
    if not ok:
        raise RampError(
            f"muP init: TransformerConfig.{_MEGATRON_INIT[group]} is not a zero-mean normal init "
            f"({init!r}); ramp rescales megatron's N(0, std) draws and cannot rescale this one"
        )
    return float(init.keywords["std"])


@torch.no_grad()
def rescale_init(chunk: torch.nn.Module, table: MupTable, config) -> dict[str, float]:
    """Multiply each matrix by (table std / megatron std) in place; returns the factor per parameter."""
    stds = table.init_stds()
    tied = bool(getattr(chunk, "share_embeddings_and_output_weights", False))
    factors: dict[str, float] = {}
    for name, param in chunk.named_parameters():
        group = group_of(name)
        if group not in stds:  # norms and biases keep ones and zeros
            continue
        source = "embedding" if (tied and group == "output") else group
        factor = stds[source] / megatron_init_std(config, source)
        # Equal up to the rounding of two formulas (sigma/sqrt(2L) both ways): leave megatron's draw
        # bitwise, so the base shape reproduces the standard run exactly.
        if math.isclose(factor, 1.0, rel_tol=1e-9):
            factor = 1.0
        else:
            param.mul_(factor)
        factors[name] = factor
    return factors


def _scale_tuple(mult: float) -> Callable:
    """Forward hook for modules returning ``(output, bias)`` (attention, MLP, MoE layer, output layer)."""

    def hook(module, args, output):
        out, bias, *rest = output
        return (out * mult, None if bias is None else bias * mult, *rest)

    return hook


def _scale_tensor(mult: float) -> Callable:
    def hook(module, args, output):
        return output * mult

    return hook


def register_hooks(
    chunks: list[torch.nn.Module], table: MupTable, config
) -> list[torch.utils.hooks.RemovableHandle]:
    """The embedding, residual-branch and logit multipliers, on whatever each chunk holds."""
    handles = []
    residual = table.residual_mult
    if residual != 1.0:
        require(
            getattr(config, "cuda_graph_impl", "none") in ("none", None),
            "muP residual multiplier: CUDA graphs call the MoE layer in phases; not supported with "
            "depth scaling (mup.base_num_layers)",
        )
    for chunk in chunks:
        if table.embedding_mult != 1.0 and getattr(chunk, "pre_process", False):
            handles.append(chunk.embedding.register_forward_hook(_scale_tensor(table.embedding_mult)))
        if residual != 1.0:
            for layer in chunk.decoder.layers:
                handles.append(layer.self_attention.register_forward_hook(_scale_tuple(residual)))
                handles.append(layer.mlp.register_forward_hook(_scale_tuple(residual)))
        if table.output_logit_mult != 1.0 and getattr(chunk, "post_process", False):
            handles.append(chunk.output_layer.register_forward_hook(_scale_tuple(table.output_logit_mult)))
    return handles
