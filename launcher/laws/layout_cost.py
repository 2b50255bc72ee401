"""Step-time model that ranks parallel layouts (TP, PP, VPP, EP, DP, micro-batch) for one batch phase.

For a global batch of ``B`` sequences of ``s`` tokens on ``W = tp * pp * dp`` devices, with ``m`` the
micro-batch size and ``n = B / (m * dp)`` micro-batches, one optimizer step costs (seconds, no overlap of
communication with compute unless ``overlap_grad_reduce``):

- **compute** ``6 * N * B * s / (W * F)``: ``N`` the parameters a token passes through (attention, dense
  MLPs, router, the top-k experts, shared experts and the output projection ``V * h``; the embedding
  lookup does no matmul; attention's ``s^2`` term is left out), ``F`` a device's achieved FLOP/s.
- **per-layer overhead** ``n * (L / pp) * layer_pass_s``: what a layer's forward + backward costs beyond its
  FLOPs (launches, Python, routing bookkeeping), paid per micro-batch; it is what makes many small
  micro-batches slow, and on CPU it dominates the tiny model.
- **pipeline bubble** ``(compute + overhead) * (pp - 1) / (vpp * n)`` (1F1B and interleaved 1F1B,
  Narayanan et al. 2021).
- **PP point-to-point**: per micro-batch and chunk, the activation forward and its gradient backward:
  ``2 * n * vpp * (m * s / t * h * a / bw + latency)``.
- **TP with sequence parallelism** (megatron's SP scheme): each layer, per micro-batch, all-gathers its
  ``s/t``-token input before the attention and the MLP and reduce-scatters their outputs: 2 all-gathers +
  2 reduce-scatters forward, the same 4 (swapped) backward, each over ``V_tp = m * s * h * a`` bytes
  (``a`` bytes per activation element). A ring collective moves ``(t - 1) / t * V`` bytes per rank, so per
  step ``8 * n * (L / pp) * ((t - 1) / t * V_tp / bw + latency)``.
- **EP all-to-all**: each MoE layer, per micro-batch, dispatches and combines the rank's routed tokens
  forward and again backward (4 all-to-alls); a rank holds ``m * s / t`` tokens (SP) and sends
  ``(ep - 1) / ep`` of ``V_ep = (m * s / t) * k * h * a`` bytes: ``4 * n * (L_moe / pp) * ((ep - 1) / ep *
  V_ep / bw + latency)``.
- **DP gradient all-reduce** (fp32 gradients, megatron's ``grad_reduce_in_fp32``): ring all-reduce of
  ``2 * (d - 1) / d * G`` bytes, with ``G = 4 * dense / (tp * pp)`` over the DP group and
  ``G = 4 * experts / (ep * pp)`` over the expert-DP group (``tp * dp / ep`` ranks). The distributed
  optimizer's reduce-scatter + all-gather moves the same bytes. With ``overlap_grad_reduce`` only what
  exceeds the backward pass (2/3 of compute) is counted.

Bandwidth: megatron orders ranks tp, ep, dp, pp (TP fastest), so a TP group spans ``tp`` consecutive ranks,
an EP group ``tp * ep`` and a DP group ``tp * dp``; a group whose span exceeds a node uses the inter-node
bandwidth. Memory comes from :func:`launcher.laws.memory.plan_memory`, the one memory model; a layout whose
busiest stage does not fit ``Hardware.memory_bytes`` is dropped.

This is a ranking model, not a predictor: it orders layouts by what differs between them (bubble,
communication, per-micro-batch overhead, memory) and ignores what they share (the optimizer step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher.errors import require
from launcher.laws.lr_law import count_params
from launcher.laws.memory import (
    GB,
    ClusterConfig,
    Kernels,
    Layout,
    Precision,
    RecomputeConfig,
    padded_vocab_size,
    plan_memory,
)
from launcher.laws.units import format_count

if TYPE_CHECKING:
    from launcher.recipe import ModelConfig

MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)
VIRTUAL_STAGES = (1, 2)


@dataclass(frozen=True)
class Hardware:
    """What a step's time depends on, per device."""

    name: str
    flops: float  # achieved FLOP/s of one device on the model's matmuls
    intra_node_bw: float  # bytes/s one rank moves in a ring collective inside a node
    inter_node_bw: float  # bytes/s one rank moves in a ring collective across nodes
    devices_per_node: int
    memory_bytes: float | None  # per device; None: no limit
    latency_s: float  # fixed cost of one collective call
    precision: Precision = "bf16"
    # Fixed time of one layer's forward + backward on one micro-batch beyond its FLOPs (kernel launches,
    # Python, routing bookkeeping): what makes many small micro-batches slower than few large ones.
    layer_pass_s: float = 0.0

    def bandwidth(self, span: int) -> float:
        """Bandwidth of a group whose ranks span ``span`` consecutive global ranks."""
        return self.intra_node_bw if span <= self.devices_per_node else self.inter_node_bw

    @classmethod
    def cpu_gloo(cls, processes: int = 2, memory_bytes: float | None = None) -> Hardware:
        """This machine: 2 shared cores, gloo over loopback, fp32.

        Measured once (2 processes, 1 thread each, torch 2.13 gloo all-reduce, 20 repetitions): 4 bytes
        1.4 ms, 4 MB 7.5 ms, 16 MB 26 ms, i.e. ~1 ms per call and ~0.6 GB/s bus bandwidth. Compute:
        calibration.md measures ~320 GFLOP/s for a large fp32 matmul on both cores and ~30% of that on
        the tiny model, so ~50 GFLOP/s per single-threaded process. Memory: no limit by default (24 GB host).
        Per layer pass: the 4-layer test model (hidden 64) trains a DP2 step of 4 micro-batches of 2
        sequences in ~0.45 s here, ~28 ms per layer forward + backward of which its FLOPs are < 1 ms.
        """
        return cls(
            name=f"cpu-gloo x{processes}",
            flops=5e10,
            intra_node_bw=6e8,
            inter_node_bw=6e8,
            devices_per_node=processes,
            memory_bytes=memory_bytes,
            latency_s=1e-3,
            precision="fp32",
            layer_pass_s=0.02,
        )

    @classmethod
    def from_cluster(cls, cluster: ClusterConfig) -> Hardware:
        """H100/H200-class nodes (stated figures, not measured here): 989 TFLOP/s dense bf16 at an
        achieved 40% MFU; NVLink 4 at 450 GB/s per direction with ~75% achieved in NCCL rings; one 400 Gb/s
        InfiniBand NIC per GPU, ~45 GB/s achieved; ~20 us per NCCL call. Memory: the cluster's GPU memory
        less its runtime reserve."""
        return cls(
            name=f"gpu {cluster.nodes}x{cluster.gpus_per_node}",
            flops=0.4 * 989e12,
            intra_node_bw=340e9,
            inter_node_bw=45e9,
            devices_per_node=cluster.gpus_per_node,
            memory_bytes=(cluster.gpu_memory_gb - cluster.runtime_reserve_gb) * GB,
            latency_s=2e-5,
            precision="bf16",
            layer_pass_s=2e-4,  # an estimate for an MoE layer's ~100 kernels, to be measured on a GPU
        )


@dataclass(frozen=True)
class LayoutCandidate:
    tp: int
    pp: int
    vpp: int
    ep: int
    dp: int
    micro_batch_size: int
    num_microbatches: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def batch(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp

    def describe(self) -> str:
        vpp = f" VPP{self.vpp}" if self.vpp > 1 else ""
        return f"TP{self.tp} PP{self.pp}{vpp} EP{self.ep} DP{self.dp}"

    def memory_layout(self, distributed_optimizer: bool = False) -> Layout:
        return Layout(self.tp, self.pp, self.vpp, self.ep, self.dp, distributed_optimizer)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_candidates(
    model: ModelConfig,
    world_size: int,
    batch: int,
    micro_batch_sizes: Iterable[int] = MICRO_BATCH_SIZES,
    is_valid: Callable[[LayoutCandidate], bool] | None = None,
    virtual_stages: Iterable[int] = VIRTUAL_STAGES,
) -> list[LayoutCandidate]:
    """Every layout of ``world_size`` devices that can run ``batch`` sequences per step.

    Built-in rules (the shape rules of ``Recipe.derive``; pass its per-layout check as ``is_valid`` for the
    rest): tp divides the heads and the query groups; tp*pp divides the world; pp*vpp divides the layers,
    vpp > 1 only with pp > 1 and micro-batches divisible by pp; ep divides the experts and tp*dp (1 for a
    dense model); ``batch`` divisible by micro_batch_size*dp.
    """
    out = []
    for tp in _divisors(world_size):
        if model.num_attention_heads % tp or model.query_groups % tp:
            continue
        for pp in _divisors(world_size // tp):
            dp = world_size // (tp * pp)
            eps = [e for e in _divisors(tp * dp) if model.num_experts % e == 0] if model.is_moe else [1]
            for vpp in virtual_stages:
                if (vpp > 1 and pp == 1) or model.num_layers % (pp * vpp):
                    continue
                for mbs in micro_batch_sizes:
                    if batch % (mbs * dp):
                        continue
                    nmb = batch // (mbs * dp)
                    if vpp > 1 and nmb % pp:
                        continue
                    for ep in eps:
                        c = LayoutCandidate(tp, pp, vpp, ep, dp, mbs, nmb)
                        if is_valid is None or is_valid(c):
                            out.append(c)
    return out


@dataclass(frozen=True)
class CostBreakdown:
    """Seconds per optimizer step by cause, and the busiest device's memory."""

    compute: float
    bubble: float
    tp_comm: float
    ep_comm: float
    dp_comm: float
    memory_bytes: float
    overhead: float = 0.0  # n * (L / pp) * layer_pass_s (and its share of the bubble)
    pp_comm: float = 0.0

    @property
    def comm(self) -> float:
        return self.tp_comm + self.ep_comm + self.dp_comm + self.pp_comm

    @property
    def total(self) -> float:
        return self.compute + self.overhead + self.bubble + self.comm


def _ring(nbytes: float, group: int, bw: float, latency: float) -> float:
    """One ring all-gather / reduce-scatter / all-to-all over ``group`` ranks of ``nbytes`` in total."""
    if group <= 1:
        return 0.0
    return (group - 1) / group * nbytes / bw + latency


def step_cost(
    model: ModelConfig,
    candidate: LayoutCandidate,
    seq_length: int,
    hardware: Hardware,
    *,
    vocab_size: int | None = None,
    overlap_grad_reduce: bool = False,
    distributed_optimizer: bool = False,
    recompute: RecomputeConfig | None = None,
    kernels: Kernels | None = None,
    ep_imbalance: float = 1.0,
) -> CostBreakdown:
    """The time of one step of ``candidate`` (module docstring for the formulas) and its peak memory."""
    vocab = vocab_size if vocab_size is not None else model.vocab_size
    require(vocab is not None, "layout cost: give the vocabulary size (model.vocab_size is unset)")
    c, h, s = candidate, model.hidden_size, seq_length
    a = 2 if hardware.precision == "bf16" else 4
    counts = count_params(model, vocab_size=vocab)
    n_flops = counts.non_embedding_active + counts.embedding  # + the output projection, tied or not
    tokens = c.batch * s
    compute = 6.0 * n_flops * tokens / (c.world_size * hardware.flops)
    layers = model.num_layers / c.pp
    overhead = c.num_microbatches * layers * hardware.layer_pass_s
    bubble = (compute + overhead) * (c.pp - 1) / (c.vpp * c.num_microbatches)
    v_tp = c.micro_batch_size * s * h * a
    tp = 8 * c.num_microbatches * layers * _ring(v_tp, c.tp, hardware.bandwidth(c.tp), hardware.latency_s)
    moe_layers = (model.num_layers - model.first_k_dense) / c.pp if model.is_moe else 0.0
    v_ep = c.micro_batch_size * s / c.tp * model.moe_router_topk * h * a
    ep = (
        4
        * c.num_microbatches
        * moe_layers
        * _ring(v_ep, c.ep, hardware.bandwidth(c.tp * c.ep), hardware.latency_s)
    )
    dense = counts.total - counts.experts_total
    edp = c.tp * c.dp // c.ep
    dp = 2 * _ring(4 * dense / (c.tp * c.pp), c.dp, hardware.bandwidth(c.tp * c.dp), hardware.latency_s)
    if model.is_moe:
        dp += 2 * _ring(
            4 * counts.experts_total / (c.ep * c.pp), edp, hardware.bandwidth(c.tp * c.dp), hardware.latency_s
        )
    if overlap_grad_reduce:
        dp = max(0.0, dp - 2.0 / 3.0 * compute)
    plan = plan_memory(
        model,
        padded_vocab_size(vocab, model.make_vocab_size_divisible_by, c.tp),
        c.memory_layout(distributed_optimizer),
        c.micro_batch_size,
        c.num_microbatches,
        precision=hardware.precision,
        recompute=recompute,
        kernels=kernels or Kernels(transformer_engine=hardware.precision == "bf16"),
        ep_imbalance=ep_imbalance,
    )
    memory = max(st.total for st in plan.stages)
    # PP: every micro-batch crosses each of a rank's vpp chunk boundaries forward (activations) and back
    # (their gradients), m * s / t tokens of h elements each.
    v_pp = c.micro_batch_size * s / c.tp * h * a
    pp = 2 * c.num_microbatches * c.vpp * (v_pp / hardware.bandwidth(c.world_size) + hardware.latency_s)
    pp = pp if c.pp > 1 else 0.0
    return CostBreakdown(compute, bubble, tp, ep, dp, memory, overhead, pp)


def _key(item: tuple[LayoutCandidate, CostBreakdown]) -> tuple:
    """Fastest first; ties (to 9 significant digits): more DP, then fewer TP, then fewer PP, then the rest."""
    c, cost = item
    return (float(f"{cost.total:.9g}"), -c.dp, c.tp, c.pp, c.vpp, c.ep, -c.micro_batch_size)


def rank_layouts(
    model: ModelConfig,
    world_size: int,
    batch: int,
    seq_length: int,
    hardware: Hardware,
    *,
    candidates: Iterable[LayoutCandidate] | None = None,
    micro_batch_sizes: Iterable[int] = MICRO_BATCH_SIZES,
    is_valid: Callable[[LayoutCandidate], bool] | None = None,
    **cost_kwargs: object,
) -> list[tuple[LayoutCandidate, CostBreakdown]]:
    """Layouts that fit ``hardware.memory_bytes``, fastest first (ties broken as in ``_key``)."""
    if candidates is None:
        candidates = enumerate_candidates(model, world_size, batch, micro_batch_sizes, is_valid)
    rows = []
    for c in candidates:
        cost = step_cost(model, c, seq_length, hardware, **cost_kwargs)  # type: ignore[arg-type]
        if hardware.memory_bytes is None or cost.memory_bytes <= hardware.memory_bytes:
            rows.append((c, cost))
    return sorted(rows, key=_key)


def best_layout(
    model: ModelConfig, world_size: int, batch: int, seq_length: int, hardware: Hardware, **kwargs: object
) -> tuple[LayoutCandidate, CostBreakdown]:
    """The fastest layout for one phase; refuses a batch no layout can run within memory."""
    ranked = rank_layouts(model, world_size, batch, seq_length, hardware, **kwargs)  # type: ignore[arg-type]
    require(
        bool(ranked),
        f"batch_schedule: no layout of {world_size} devices runs batch {batch} within "
        f"{'no memory limit' if hardware.memory_bytes is None else f'{hardware.memory_bytes / GB:.1f} GB'} "
        f"per device; change the batch (a multiple of micro_batch_size x dp) or the world size",
    )
    return ranked[0]


@dataclass(frozen=True)
class PlanRow:
    """One phase of a batch schedule with the layout chosen for it."""

    phase: int
    start_tokens: int
    batch: int
    layout: LayoutCandidate
    cost: CostBreakdown


def format_plan(rows: Iterable[PlanRow]) -> str:
    """The table ``--dry-run`` prints: one line per phase."""
    head = (
        f"{'phase':>5} {'tokens':>8} {'batch':>6} {'layout':<22} {'mbs':>4} {'nmb':>4} "
        f"{'step s':>9} {'bubble':>7} {'comm':>7} {'mem GB':>7}"
    )
    lines = [head]
    for r in rows:
        total = r.cost.total
        lines.append(
            f"{r.phase:>5} {format_count(r.start_tokens):>8} {r.batch:>6} {r.layout.describe():<22} "
            f"{r.layout.micro_batch_size:>4} {r.layout.num_microbatches:>4} {total:>9.4g} "
            f"{100 * r.cost.bubble / total:>6.1f}% {100 * r.cost.comm / total:>6.1f}% "
            f"{r.cost.memory_bytes / GB:>7.2f}"
        )
    return "\n".join(lines)
