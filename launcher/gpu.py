"""GPU settings: TransformerEngine required, Megatron-LM's fused kernels and overlaps, the memory plan.

Each fast path is a recipe key under ``gpu:`` whose comment gives Megatron-LM's default (README table
"ramp vs Megatron-LM defaults"). They apply on CUDA only: on CPU every key is ignored and the model is
built exactly as before. A kernel that does not import on this machine is switched off with one printed
line (``resolve``), never silently; a missing TransformerEngine is an error unless the recipe opts into
megatron's local spec (``gpu.transformer_engine: local``).

Importing this module imports neither torch nor megatron: the recipe schema uses :class:`GpuConfig`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from launcher.errors import RampError, require
from launcher.laws.memory import Kernels, Layout, MemoryPlan, padded_vocab_size, plan_memory

if TYPE_CHECKING:
    from launcher.recipe import Derived, Recipe

TE_CHOICES = ("require", "local")
CE_IMPLS = ("native", "te")
TE_INSTALL = (
    "install TransformerEngine for this torch and CUDA (pip install --no-build-isolation "
    "'transformer_engine[pytorch]'), or set gpu.transformer_engine=local to train with megatron's "
    "local spec (unfused attention, experts in a Python loop)"
)


@dataclass
class GpuConfig:
    """GPU fast paths (ignored on CPU). The comment after each key is Megatron-LM's default and flag."""

    transformer_engine: Literal["require", "local"] = "require"  # M-LM: --transformer-impl transformer_engine
    overlap_grad_reduce: bool = True  # M-LM: False (--overlap-grad-reduce)
    overlap_param_gather: bool = True  # M-LM: False (--overlap-param-gather); distributed optimizer only
    overlap_p2p_comm: bool = True  # M-LM: True (--no-overlap-p2p-communication); interleaved PP only
    deallocate_pipeline_outputs: bool = True  # M-LM: True (always set)
    apply_rope_fusion: bool = True  # M-LM: True (--no-rope-fusion)
    bias_activation_fusion: bool = True  # M-LM: True (--no-bias-swiglu-fusion): fused SwiGLU
    bias_dropout_fusion: bool = True  # M-LM: True (--no-bias-dropout-fusion); torch.compile under TE
    masked_softmax_fusion: bool = True  # M-LM: True (--no-masked-softmax-fusion); local spec only
    gradient_accumulation_fusion: bool = True  # M-LM: True (--no-gradient-accumulation-fusion); needs Apex
    moe_permute_fusion: bool = True  # M-LM: False (--moe-permute-fusion); TE >= 2.1
    moe_router_fusion: bool = True  # M-LM: False (--moe-router-fusion); TE >= 2.7 (megatron-core 0.16)
    cross_entropy_loss_fusion: bool = True  # M-LM: False (--cross-entropy-loss-fusion)
    cross_entropy_fusion_impl: Literal["native", "te"] = "native"  # M-LM: native
    manual_gc: bool = True  # M-LM: False (--manual-gc)
    manual_gc_interval: int = 100  # M-LM: 0 (--manual-gc-interval; 0: collect only at start)

    def __post_init__(self) -> None:
        require(
            self.transformer_engine in TE_CHOICES,
            f"gpu.transformer_engine={self.transformer_engine!r}: choose one of {', '.join(TE_CHOICES)}",
        )
        require(
            self.cross_entropy_fusion_impl in CE_IMPLS,
            f"gpu.cross_entropy_fusion_impl={self.cross_entropy_fusion_impl!r}: choose one of "
            f"{', '.join(CE_IMPLS)}",
        )
        require(self.manual_gc_interval >= 0, f"gpu.manual_gc_interval={self.manual_gc_interval}: >= 0")


# Process environment for CUDA runs, set (unless already set) before CUDA and NCCL start. One connection
# keeps megatron's communication kernels in issue order (sequence parallelism and overlapped reduces rely
# on it); expandable segments curb fragmentation from variable-size MoE buffers; record-stream avoidance
# frees NCCL tensors promptly; NVLS buffers cost GPU memory for little gain at these message sizes.
CUDA_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NCCL_NVLS_ENABLE": "0",
}


def set_cuda_env(environ: dict[str, str]) -> dict[str, str]:
    """Fill in :data:`CUDA_ENV` where the user has not chosen; returns what was set."""
    added = {k: v for k, v in CUDA_ENV.items() if k not in environ}
    environ.update(added)
    return added


def set_cuda_env_here() -> dict[str, str]:
    """This process's :data:`CUDA_ENV` on a machine with CUDA (none elsewhere); call it first thing, before
    a CUDA context, the caching allocator or NCCL starts (TransformerEngine's import can start them):
    those read these variables (asking whether CUDA is there initialises only the driver). Children started
    later inherit it."""
    import os

    import torch

    return set_cuda_env(os.environ) if torch.cuda.is_available() else {}


# -- what this machine can run ------------------------------------------------------------------------------


def have_te() -> bool:
    """megatron's own HAVE_TE: TransformerEngine's extension loads and megatron's TE spec imports."""
    try:
        from megatron.core.models.gpt import gpt_layer_specs
    except ImportError:  # pragma: no cover - megatron is a dependency
        return False
    return bool(getattr(gpt_layer_specs, "HAVE_TE", False))


def _imports(*modules: str) -> bool:
    try:
        for name in modules:
            importlib.import_module(name)
    except ImportError:
        return False
    return True


def have_apex_wgrad_kernel() -> bool:
    """Apex's fused_weight_gradient_mlp_cuda: what gradient_accumulation_fusion calls (output layer too)."""
    return _imports("fused_weight_gradient_mlp_cuda")


def have_apex_softmax_kernels() -> bool:
    """Apex's masked-softmax kernels, which megatron's local-spec attention imports when it runs (bf16,
    keys <= 4096) if masked_softmax_fusion is on: a machine without them fails at the first forward."""
    return _imports("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda")


def _moe_kernel(name: str) -> bool:
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:  # pragma: no cover
        return False
    return getattr(moe_utils, name, None) is not None


def te_version() -> str | None:
    try:
        import transformer_engine
    except ImportError:
        return None
    return getattr(transformer_engine, "__version__", "unknown")


@dataclass(frozen=True)
class Resolved:
    """The GPU settings in force for this run: the recipe's, minus what the device or machine lacks."""

    device: str
    te: bool
    settings: dict[str, bool | str | int]
    notes: tuple[str, ...] = ()

    def __getattr__(self, name: str):
        try:
            return self.settings[name]
        except KeyError:
            raise AttributeError(name) from None


def resolve(recipe: Recipe, device: str, probe: bool = True) -> Resolved:
    """The settings this run uses. On CPU all off; on CUDA each on where the recipe asks and it imports.

    ``probe=False`` plans for a GPU machine from elsewhere (``--dry-run`` on a laptop): the recipe's keys
    are taken as they are and TransformerEngine is assumed present unless the recipe chose ``local``.
    """
    g, p = recipe.gpu, recipe.parallel
    keys = [f.name for f in dataclasses.fields(GpuConfig)]
    if device != "cuda":
        off = {k: False for k in keys if isinstance(getattr(g, k), bool)}
        ignored = ("recompute ignored on CPU",) if recipe.recompute.granularity != "none" else ()
        settings = {**off, "cross_entropy_fusion_impl": "native", "manual_gc_interval": 0}
        return Resolved(device, False, settings, ignored)
    notes: list[str] = []
    te = g.transformer_engine == "require"
    if te and probe and not have_te():
        raise RampError(
            f"gpu.transformer_engine=require but megatron cannot import TransformerEngine: {TE_INSTALL}"
        )
    require(
        te or not recipe.recompute.drops("moe_act"),
        "recompute.modules: moe_act needs TransformerEngine's grouped GEMM, which "
        "gpu.transformer_engine=local does not build; remove moe_act from recompute.modules",
    )
    s: dict[str, bool | str | int] = {k: getattr(g, k) for k in keys}
    s["transformer_engine"] = g.transformer_engine
    interleaved = bool(p.vpp and p.vpp > 1)
    s["overlap_param_gather"] = g.overlap_param_gather and p.distributed_optimizer
    s["overlap_p2p_comm"] = g.overlap_p2p_comm and interleaved
    s["deallocate_pipeline_outputs"] = g.deallocate_pipeline_outputs and p.pp > 1
    s["masked_softmax_fusion"] = g.masked_softmax_fusion and not te
    checks = {
        "masked_softmax_fusion": (
            not probe or have_apex_softmax_kernels(),
            "Apex's scaled_upper_triang_masked_softmax_cuda does not import",
        ),
        "apply_rope_fusion": (te, "needs TransformerEngine"),
        "moe_permute_fusion": (
            te and recipe.model.is_moe and (not probe or _moe_kernel("fused_permute")),
            "needs TransformerEngine >= 2.1",
        ),
        "moe_router_fusion": (
            te and recipe.model.is_moe and (not probe or _moe_kernel("fused_topk_with_score_function")),
            "needs TransformerEngine >= 2.7",
        ),
        "gradient_accumulation_fusion": (
            not probe or have_apex_wgrad_kernel(),
            "Apex's fused_weight_gradient_mlp_cuda does not import",
        ),
    }
    if s["cross_entropy_fusion_impl"] == "te":
        checks["cross_entropy_loss_fusion"] = (te, "the te implementation needs TransformerEngine")
    for key, (ok, why) in checks.items():
        if s[key] and not ok:
            s[key] = False
            notes.append(f"gpu.{key} off: {why}")
    return Resolved(device, te, s, tuple(notes))


def kernels(resolved: Resolved) -> Kernels:
    """What the memory model needs to know of the settings in force."""
    return Kernels(
        transformer_engine=resolved.te,
        fused_swiglu=bool(resolved.settings["bias_activation_fusion"]),
        fused_cross_entropy=bool(resolved.settings["cross_entropy_loss_fusion"]),
        deallocate_pipeline_outputs=bool(resolved.settings["deallocate_pipeline_outputs"]),
    )


# -- the memory plan of a recipe ----------------------------------------------------------------------------


def vocab_for_plan(recipe: Recipe) -> int:
    m = recipe.model
    vocab = recipe.planned_vocab_size()
    require(
        vocab is not None,
        "model.vocab_size: set it to plan memory (the tokenizer's size is only known once it is loaded)",
    )
    return padded_vocab_size(vocab, m.make_vocab_size_divisible_by, recipe.parallel.tp)


def layout_of(recipe: Recipe, derived: Derived) -> Layout:
    p = recipe.parallel
    return Layout(
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp or 1,
        ep=p.ep,
        dp=derived.dp,
        distributed_optimizer=p.distributed_optimizer,
    )


def memory_plan(recipe: Recipe, derived: Derived, resolved: Resolved) -> MemoryPlan:
    """The per-stage memory of this recipe in this layout (laws/memory.py), against its cluster's GPUs."""
    t, c = recipe.training, recipe.cluster
    return plan_memory(
        recipe.model,
        vocab_for_plan(recipe),
        layout_of(recipe, derived),
        micro_batch=t.micro_batch_size,
        num_microbatches=derived.num_microbatches,
        precision=derived.precision,
        recompute=recipe.recompute if resolved.device == "cuda" else None,
        kernels=kernels(resolved),
        ep_imbalance=c.ep_imbalance if c else 1.0,
        runtime_reserve_gb=c.runtime_reserve_gb if c else 0.0,
        gpu_memory_gb=c.gpu_memory_gb if c else None,
    )


def require_fits(plan: MemoryPlan, where: str = "") -> None:
    """Refuse, before launch, a recipe whose fullest stage does not fit the cluster's GPU memory."""
    if plan.gpu_memory_gb is None:
        return
    worst = max(range(len(plan.stages)), key=lambda i: plan.stages[i].total)
    g = plan.stages[worst].as_gb()
    require(
        plan.peak_gb <= plan.gpu_memory_gb,
        f"memory plan: {where}pipeline stage {worst} needs {g['total']:.1f} GB > cluster.gpu_memory_gb="
        f"{plan.gpu_memory_gb:g} (activations {g['activations']:.1f}, logits {g['logits']:.1f}, "
        f"weights+grads+optimizer {g['params'] + g['grads'] + g['optimizer']:.1f}); lower "
        f"training.micro_batch_size, set recompute.granularity (selective or full), or raise parallel.pp/ep",
    )


# -- runtime (CUDA only) ------------------------------------------------------------------------------------


def built_classes(chunks) -> dict[str, str]:
    """The attention and expert classes actually built (the first of each kind found)."""
    found: dict[str, str] = {}
    wanted = {"core_attention": "attention", "experts": "experts", "linear_qkv": "qkv", "router": "router"}
    for chunk in chunks:
        for name, module in chunk.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in wanted and wanted[leaf] not in found:
                found[wanted[leaf]] = type(module).__name__
    return found


def gather_params(chunks, resolved: Resolved) -> None:
    """Finish the parameter all-gather now (before a checkpoint is written).

    With ``overlap_param_gather`` the distributed optimizer's updated shards are gathered lazily by the
    next forward's pre-hooks, so between steps other ranks' slices are a step old. Megatron-LM forces
    the same synchronous gather before it saves; the forward pre-hooks (evaluation included) gather by
    themselves.
    """
    if resolved.settings.get("overlap_param_gather"):
        for c in chunks:
            c.start_param_sync(force_sync=True)
