"""Per-device memory model of a megatron-core MoE GPT: bytes per pipeline stage for a layout.

One function, :func:`plan_memory`, maps (model shape, layout tp/pp/vpp/ep/dp, micro-batch size and count,
precision, recompute, fusions) to the peak bytes of the busiest device of every pipeline stage. The
recipe's ``--dry-run`` prints it and refuses a recipe that cannot fit its cluster; the batch-size
scheduler's layout cost model is meant to call the same function for each candidate layout.

What is counted (``b`` micro-batch, ``s`` sequence, ``h`` hidden, ``t`` TP, ``a`` bytes of an activation
element: 2 in bf16, 4 in fp32):

- **Weights, gradients, optimizer** (megatron-core DDP with ``grad_reduce_in_fp32``, Adam): parameters in
  the training dtype, a fp32 gradient buffer, and Adam's state: two fp32 moments plus, in bf16, fp32 main
  weights. The distributed optimizer shards the optimizer state over the data-parallel group (dense
  parameters over ``dp``; experts over the expert-data-parallel group ``tp*dp/ep``); gradients and
  weights stay whole. Per parameter: bf16 ``2 + 4 + 12/d`` (18 without sharding), fp32 ``4 + 4 + 8/d``
  (fp32 weights are their own main copy). Buffer padding (< 0.1%) is ignored.
- **Activations saved for backward**, per token of a micro-batch and per layer, following what the
  modules keep (``ACTIVATION_TERMS`` names each tensor); with sequence parallelism every token-sized
  tensor is split by ``t``, so a layer holds ``s*b/t`` tokens' worth. Attention keeps its input and the
  norm's output (the QKV input), the QKV output and the rotated query/key, the context (the output
  projection's input) and the softmax statistics; the local (non-TE) attention also keeps the ``s x s``
  probabilities (fp32 softmax output and, in bf16, the cast copy). Each MLP keeps its input, the
  ``2 f`` wide FC1 output and the ``f`` wide activation output (the unfused SwiGLU keeps one more ``f``,
  the SiLU output, and in experts a second, the product before the routing probability multiplies it);
  experts hold ``k * ep_imbalance`` routed copies of every local token.
- **Recompute**: ``full`` keeps one ``h``-wide input per layer (``num_layers`` layers per checkpoint
  unit) and rebuilds one unit's activations during backward; ``selective`` drops the tensors of each named
  module (megatron's ``recompute_modules``): ``core_attn`` the attention probabilities/statistics,
  ``layernorm`` the norm outputs, ``moe_act`` the experts' activation output, ``mlp``/``moe``/
  ``shared_experts`` everything inside those blocks but their input.
- **Output head and loss** (last stage): the final norm, the output layer's input, the fp32 softmax the
  cross-entropy saves (``V/t`` per token) and, at the loss's peak, the bf16 logits it was cast from and
  (unfused) one more fp32 temporary.
- **Pipeline**: the 1F1B schedule keeps ``pp - r`` micro-batches in flight on stage ``r``; the interleaved
  one ``2 (pp - r - 1) + (vpp - 1) pp + 1`` model chunks of ``L/(pp vpp)`` layers (megatron's warm-up
  count plus the one in steady state). Without ``deallocate_pipeline_outputs`` each in-flight
  micro-batch also keeps the stage's output.
- **Transient**: one more layer's activations (the gradients flowing through the layer in backward),
  and a fixed ``runtime_reserve_gb`` for the CUDA context, cuBLAS/TE workspaces, NCCL buffers and
  allocator slack (an estimate, to be replaced by what ``tools/gpu_smoke.py`` measures).

The model is checked against hand calculations for small shapes and against the tensors of a CPU run
(tests/unit/test_memory.py); its GPU figures are unmeasured until ``tools/gpu_smoke.py`` has run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from launcher.errors import require
from launcher.laws.lr_law import count_params

if TYPE_CHECKING:
    from launcher.recipe import ModelConfig

GB = 1e9
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
# megatron-core 0.16's recompute_modules that apply to this model (mla_up_proj needs MLA).
RECOMPUTE_MODULES = ("core_attn", "layernorm", "moe_act", "mlp", "moe", "shared_experts")


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Pad the vocabulary so every TP rank holds an equal slice; independent of TP when tp | divisible_by."""
    multiple = divisible_by * tp // math.gcd(divisible_by, tp)
    return -(-vocab_size // multiple) * multiple


@dataclass
class RecomputeConfig:
    """Activation recomputation (megatron-core ``recompute_granularity``/``recompute_modules``).

    ``selective`` recomputes the named modules; ``full`` checkpoints every ``num_layers`` layers (megatron's
    ``uniform`` method) and keeps only their inputs.
    """

    granularity: Literal["none", "selective", "full"] = "none"
    modules: list[str] = field(default_factory=lambda: ["core_attn"])  # megatron's default
    num_layers: int = 1

    def __post_init__(self) -> None:
        require(
            self.granularity in RECOMPUTE_GRANULARITIES,
            f"recompute.granularity={self.granularity!r}: choose one of {', '.join(RECOMPUTE_GRANULARITIES)}",
        )
        bad = [m for m in self.modules if m not in RECOMPUTE_MODULES]
        require(not bad, f"recompute.modules: unknown {bad}; choose among {', '.join(RECOMPUTE_MODULES)}")
        require(self.num_layers >= 1, f"recompute.num_layers={self.num_layers}: must be >= 1")

    def drops(self, module: str) -> bool:
        """Whether selective recompute discards the activations of ``module``."""
        return self.granularity == "selective" and module in self.modules


@dataclass
class ClusterConfig:
    """The machines a recipe is planned for; ``--dry-run`` plans memory for them without a launcher."""

    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory_gb: float = 80.0
    # Tokens on the busiest expert-parallel rank over the balanced share (dropless routing has no cap).
    ep_imbalance: float = 1.25
    runtime_reserve_gb: float = 3.0  # CUDA context, library workspaces, NCCL buffers, allocator slack

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "nodes", "gpu_memory_gb"):
            require(getattr(self, name) > 0, f"cluster.{name}={getattr(self, name)}: must be > 0")
        require(self.ep_imbalance >= 1.0, f"cluster.ep_imbalance={self.ep_imbalance}: must be >= 1")
        require(self.runtime_reserve_gb >= 0, f"cluster.runtime_reserve_gb={self.runtime_reserve_gb}: >= 0")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    dp: int = 1
    distributed_optimizer: bool = False

    @property
    def expert_dp(self) -> int:
        """Ranks that hold the same experts (expert tensor parallelism is 1 in ramp)."""
        return self.tp * self.dp // self.ep


@dataclass(frozen=True)
class Kernels:
    """What the memory depends on among the GPU settings (launcher/gpu.py resolves them per device)."""

    transformer_engine: bool = True  # TE spec: fused attention (no s x s probabilities), fused norms
    fused_swiglu: bool = True  # bias_activation_fusion
    fused_cross_entropy: bool = True
    deallocate_pipeline_outputs: bool = True


@dataclass
class StageMemory:
    """Peak bytes on the busiest device of one pipeline stage, by kind."""

    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    transient: float
    reserve: float
    in_flight: float  # micro-batches (or model chunks under VPP, in micro-batch units) held at once

    @property
    def total(self) -> float:
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.activations
            + self.logits
            + self.transient
            + self.reserve
        )

    def as_gb(self) -> dict[str, float]:
        keys = ("params", "grads", "optimizer", "activations", "logits", "transient", "reserve", "total")
        return {k: round(getattr(self, k) / GB, 3) for k in keys}


@dataclass
class MemoryPlan:
    stages: list[StageMemory]
    gpu_memory_gb: float | None = None

    @property
    def memory_gb(self) -> dict[str, float]:
        return {str(i): round(s.total / GB, 2) for i, s in enumerate(self.stages)}

    @property
    def peak_gb(self) -> float:
        return max(s.total for s in self.stages) / GB

    @property
    def headroom(self) -> float | None:
        """Fraction of GPU memory left on the fullest stage (negative: does not fit)."""
        if self.gpu_memory_gb is None:
            return None
        return 1.0 - self.peak_gb / self.gpu_memory_gb

    def format_table(self) -> str:
        head = f"{'stage':>5} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'logits':>7} "
        head += f"{'transient':>9} {'reserve':>7} {'total GB':>8}"
        rows = [head]
        for i, s in enumerate(self.stages):
            g = s.as_gb()
            rows.append(
                f"{i:>5} {g['params']:>7.2f} {g['grads']:>7.2f} {g['optimizer']:>7.2f} "
                f"{g['activations']:>7.2f} {g['logits']:>7.2f} {g['transient']:>9.2f} {g['reserve']:>7.2f} "
                f"{g['total']:>8.2f}"
            )
        if self.gpu_memory_gb is not None:
            rows.append(
                f"peak {self.peak_gb:.1f} GB of {self.gpu_memory_gb:g} GB per GPU: "
                f"headroom {100 * self.headroom:.0f}%"
            )
        return "\n".join(rows)


# -- parameters --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one decoder layer held by one rank: replicated over DP (dense) and over expert-DP."""

    dense: float
    expert: float


def layer_params(model: ModelConfig, layout: Layout, moe: bool) -> LayerParams:
    """One layer's parameters on one rank: attention, norms, dense MLP or router + local experts."""
    counts = count_params(model, vocab_size=1)  # matrices only; the vocabulary does not enter a layer
    L, h, t = model.num_layers, model.hidden_size, layout.tp
    norms = 2 * h + (2 * model.head_dim if model.qk_layernorm else 0)  # norm gains are not TP-split
    dense = counts.attention / L / t + norms
    if not moe:
        n_dense = model.first_k_dense if model.is_moe else L
        return LayerParams(dense=dense + counts.dense_mlp / n_dense / t, expert=0.0)
    n_moe = L - model.first_k_dense
    dense += counts.router / n_moe + counts.shared_experts / n_moe / t
    return LayerParams(dense=dense, expert=counts.experts_total / n_moe / layout.ep)


def _is_moe_layer(model: ModelConfig, i: int) -> bool:
    return model.is_moe and i >= model.first_k_dense


def _stage_layers(model: ModelConfig, layout: Layout) -> list[list[int]]:
    """Layer indices held by each pipeline rank (megatron: chunk c of L/(pp*vpp) layers on rank c % pp)."""
    per_chunk = model.num_layers // (layout.pp * layout.vpp)
    stages: list[list[int]] = [[] for _ in range(layout.pp)]
    for i in range(model.num_layers):
        stages[(i // per_chunk) % layout.pp].append(i)
    return stages


# -- activations -------------------------------------------------------------------------------------------


def activation_terms(
    model: ModelConfig,
    seq: int,
    precision: str,
    recompute: RecomputeConfig,
    kernels: Kernels,
    moe: bool,
    ep_imbalance: float = 1.0,
) -> dict[str, float]:
    """Bytes one layer saves for backward per token of a micro-batch, before the TP split, by tensor.

    The attention probabilities are returned per token too (``s x heads`` elements per token).
    """
    a = 2 if precision == "bf16" else 4
    h, hd = model.hidden_size, model.head_dim
    nq, ng = model.num_attention_heads, model.query_groups
    terms: dict[str, float] = {}
    te = kernels.transformer_engine
    # layernorm recompute acts on norms that are modules of their own: under TE the attention norm and a
    # dense MLP's are fused into the next linear (megatron builds an IdentityOp in their place, which it
    # does not recompute); only an MoE layer's pre-MLP norm stays a module there
    drop_attn_ln = recompute.drops("layernorm") and not te
    drop_mlp_ln = recompute.drops("layernorm") and (moe or not te)

    # a norm keeps its input and fp32 1/rms; torch's (local spec) also the normalised input before the gain
    def norm(width: int, dropped: bool) -> float:
        return width * a + 4 + (0 if te or dropped else width * a)

    # attention block
    terms["attn.norm"] = norm(h, drop_attn_ln)
    terms["attn.norm_output"] = 0.0 if drop_attn_ln else h * a  # the QKV projection's input
    terms["attn.qkv"] = (nq + 2 * ng) * hd * a  # QKV output (V is a view into it)
    terms["attn.rotated_qk"] = (nq + ng) * hd * a  # rotated (and normed) query and key
    if model.qk_layernorm:
        terms["attn.qk_norm"] = (nq + ng) * (4 + (0 if te else hd * a))
        if ng < nq:  # with GQA the query is reshaped out of the QKV output by a copy, which the norm keeps
            terms["attn.query_copy"] = nq * hd * a
    if ng < nq and not te:  # the local attention repeats key and value up to the query heads
        terms["attn.gqa_repeat"] = (2 * nq - ng) * hd * a
    terms["attn.context"] = nq * hd * a  # attention output = the output projection's input
    if recompute.drops("core_attn"):
        terms["attn.core"] = 0.0
    elif te:
        terms["attn.core"] = nq * 4  # softmax statistics (fp32 log-sum-exp per head)
    else:
        # probabilities: the fp32 softmax output, plus the cast copy the V product keeps in bf16
        terms["attn.core"] = nq * seq * (4 + (a if a != 4 else 0))
    # MLP block
    terms["mlp.norm"] = norm(h, drop_mlp_ln)
    terms["mlp.norm_output"] = 0.0 if drop_mlp_ln else h * a

    def mlp(width: float, tokens: float, drop_act: bool, weighted: bool) -> float:
        fc1 = 2 * width * a  # gate and up projections (SwiGLU)
        act = 0.0 if drop_act else width * a  # FC2 input
        # unfused: the SiLU output, the linear half plus megatron's glu_linear_offset, and for experts the
        # product before the routing probability multiplies it
        unfused = 0.0 if kernels.fused_swiglu or drop_act else width * a * (3 if weighted else 2)
        return tokens * (fc1 + act + unfused)

    if not moe:
        dense = mlp(model.ffn_hidden_size, 1.0, False, False)
        terms["mlp.dense"] = 0.0 if recompute.drops("mlp") else dense
        return terms
    if recompute.drops("moe"):
        terms["moe.all"] = 0.0
        return terms
    E, k = model.num_experts, model.moe_router_topk
    terms["moe.router"] = (h * 4 if a != 4 else 0) + 3 * E * 4  # fp32 input copy, logits, scores, probs
    routed = k * ep_imbalance
    terms["moe.expert_input"] = routed * h * a  # permuted tokens = the experts' FC1 input
    terms["moe.experts"] = mlp(model.moe_ffn_hidden_size, routed, recompute.drops("moe_act"), True)
    shared = model.moe_shared_expert_hidden_size
    if shared:
        terms["moe.shared"] = 0.0 if recompute.drops("shared_experts") else mlp(shared, 1.0, False, False)
    return terms


def layer_activation_bytes(
    model: ModelConfig,
    layout: Layout,
    micro_batch: int,
    seq: int,
    precision: str,
    recompute: RecomputeConfig,
    kernels: Kernels,
    moe: bool,
    ep_imbalance: float = 1.0,
) -> float:
    """Bytes one layer keeps for one micro-batch on one rank (no recompute of the whole layer)."""
    terms = activation_terms(model, seq, precision, recompute, kernels, moe, ep_imbalance)
    return sum(terms.values()) * seq * micro_batch / layout.tp


def loss_saved_bytes(
    model: ModelConfig, vocab: int, layout: Layout, tokens: int, precision: str, kernels: Kernels
) -> float:
    """What the output head saves for backward: the final norm, the output layer's input and the fp32
    softmax the cross-entropy keeps over this rank's vocabulary slice."""
    a = 2 if precision == "bf16" else 4
    h = model.hidden_size
    head = h * a + 4 + (0 if kernels.transformer_engine else h * a) + h * a
    return tokens / layout.tp * (head + vocab * 4)


def logits_bytes(
    model: ModelConfig, vocab: int, layout: Layout, tokens: int, precision: str, kernels: Kernels
) -> float:
    """The loss's peak for one micro-batch: the saved softmax, plus the bf16 logits it was cast from and,
    unfused, one more fp32 temporary."""
    a = 2 if precision == "bf16" else 4
    transient = (a if a != 4 else 0) + (0 if kernels.fused_cross_entropy else 4)
    saved = loss_saved_bytes(model, vocab, layout, tokens, precision, kernels)
    return saved + tokens * vocab / layout.tp * transient


def in_flight(layout: Layout, rank: int, num_microbatches: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak, in units of its whole stage."""
    pp, v = layout.pp, layout.vpp
    if pp == 1:
        return 1.0
    if v == 1:
        return float(min(pp - rank, num_microbatches))
    chunks = min(num_microbatches * v, 2 * (pp - rank - 1) + (v - 1) * pp + 1)
    return chunks / v


# -- the plan ------------------------------------------------------------------------------------------------


def plan_memory(
    model: ModelConfig,
    vocab_size: int,
    layout: Layout,
    micro_batch: int,
    num_microbatches: int,
    precision: str = "bf16",
    recompute: RecomputeConfig | None = None,
    kernels: Kernels | None = None,
    ep_imbalance: float = 1.0,
    runtime_reserve_gb: float = 0.0,
    gpu_memory_gb: float | None = None,
) -> MemoryPlan:
    """Peak bytes per pipeline stage (``vocab_size`` already padded for the layout's TP)."""
    require(precision in PRECISIONS, f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    recompute = recompute or RecomputeConfig()
    kernels = kernels or Kernels()
    seq, h, t = model.seq_length, model.hidden_size, layout.tp
    tokens = seq * micro_batch
    p_bytes = 2 if precision == "bf16" else 4
    opt_bytes = 12 if precision == "bf16" else 8  # (fp32 main weights +) two fp32 Adam moments
    stages = []
    for rank, layers in enumerate(_stage_layers(model, layout)):
        dense = expert = 0.0
        act_layers = []
        for i in layers:
            moe = _is_moe_layer(model, i)
            lp = layer_params(model, layout, moe)
            dense, expert = dense + lp.dense, expert + lp.expert
            act_layers.append(
                layer_activation_bytes(
                    model, layout, micro_batch, seq, precision, recompute, kernels, moe, ep_imbalance
                )
            )
        first, last = rank == 0, rank == layout.pp - 1
        emb = vocab_size * h / t
        if first:
            dense += emb
        if last:
            dense += h  # final norm
            # an untied output layer, or the tied embedding's copy on the last stage under PP
            if not model.tie_embeddings or layout.pp > 1:
                dense += emb
        n = dense + expert
        if layout.distributed_optimizer:
            optimizer = opt_bytes * (dense / layout.dp + expert / layout.expert_dp)
        else:
            optimizer = opt_bytes * n
        flight = in_flight(layout, rank, num_microbatches)
        input_bytes = tokens * h * (2 if precision == "bf16" else 4) / t  # one layer input (checkpointed)
        if recompute.granularity == "full":
            units = math.ceil(len(layers) / recompute.num_layers)
            saved = units * input_bytes
            transient = recompute.num_layers * max(act_layers, default=0.0)
        else:
            saved = sum(act_layers)
            transient = max(act_layers, default=0.0)
        activations = saved * flight
        if layout.pp > 1 and not kernels.deallocate_pipeline_outputs and not last:
            activations += input_bytes * flight * layout.vpp
        stages.append(
            StageMemory(
                params=n * p_bytes,
                grads=n * 4,
                optimizer=optimizer,
                activations=activations,
                logits=logits_bytes(model, vocab_size, layout, tokens, precision, kernels) if last else 0.0,
                transient=transient,
                reserve=runtime_reserve_gb * GB,
                in_flight=flight,
            )
        )
    return MemoryPlan(stages=stages, gpu_memory_gb=gpu_memory_gb)
