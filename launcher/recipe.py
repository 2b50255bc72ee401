"""The recipe: one typed tree that is the single source of truth for every knob of a run.

A recipe YAML maps onto :class:`Recipe`. Every section is a dataclass validated in ``__post_init__``;
unknown keys are refused with the nearest valid name, and ``--set a.b=c`` overrides any leaf.
Quantities that depend on the world size (DP size, micro-batches, steps) are derived once by
:meth:`Recipe.derive` and printed at start, before any process-group work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml

from launcher.errors import RampError, check_choices, require, require_choice
from launcher.gpu import GpuConfig
from launcher.laws.bad_steps import BadStepAction
from launcher.laws.batch_size import (
    MAX_CBS_FRACTION,
    BatchSchedule,
    BatchScheduleConfig,
    deciding_multipliers,
)
from launcher.laws.cbs import ProbeConfig
from launcher.laws.memory import ClusterConfig, Precision, RecomputeConfig
from launcher.laws.mup import MupConfig
from launcher.laws.schedule import DecayShape, ScheduleStyle
from launcher.laws.units import parse_count

if TYPE_CHECKING:
    from launcher.laws.layout_cost import Hardware

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

# Choices no laws module owns (the others are imported above).
TokenDispatcher = Literal["alltoall", "allgather"]  # megatron-core moe_token_dispatcher_type values ramp runs
Device = Literal["auto", "cpu", "cuda"]
WandbMode = Literal["offline", "online", "disabled"]


def _positive(section: str, **values: float | int | None) -> None:
    for name, v in values.items():
        if v is not None:
            require(v > 0, f"{section}.{name}={v}: must be > 0")


@dataclass
class ModelConfig:
    """GPT decoder with MoE feed-forward layers (megatron-core GPTModel)."""

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA groups; None = multi-head attention
    kv_channels: int | None = None  # head dim; None = hidden_size / heads
    ffn_hidden_size: int = 512  # dense MLP (first_k_dense layers)
    num_experts: int = 8  # 0 = dense model
    moe_ffn_hidden_size: int = 256
    moe_router_topk: int = 2
    moe_aux_loss_coeff: float = 0.01
    moe_z_loss_coeff: float | None = None
    moe_shared_expert_hidden_size: int | None = None
    moe_router_pre_softmax: bool = False  # False: top-k then softmax over the chosen experts
    moe_token_dispatcher: TokenDispatcher = "alltoall"
    first_k_dense: int = 0  # the first k layers use a dense MLP
    seq_length: int = 256
    vocab_size: int | None = None  # None: taken from the tokenizer
    make_vocab_size_divisible_by: int = 128
    tie_embeddings: bool = True
    rotary_base: float = 10000.0
    qk_layernorm: bool = False
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02

    def __post_init__(self) -> None:
        _positive(
            "model",
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            ffn_hidden_size=self.ffn_hidden_size,
            seq_length=self.seq_length,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            vocab_size=self.vocab_size,
            init_method_std=self.init_method_std,
        )
        require(self.num_experts >= 0, f"model.num_experts={self.num_experts}: must be >= 0 (0 = dense)")
        if self.kv_channels is None:
            require(
                self.hidden_size % self.num_attention_heads == 0,
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels",
            )
        if self.num_query_groups is not None:
            require(
                self.num_attention_heads % self.num_query_groups == 0,
                f"model.num_query_groups={self.num_query_groups} must divide "
                f"model.num_attention_heads={self.num_attention_heads}",
            )
        if self.num_experts:
            require(
                1 <= self.moe_router_topk <= self.num_experts,
                f"model.moe_router_topk={self.moe_router_topk}: must be in 1..{self.num_experts}",
            )
            _positive("model", moe_ffn_hidden_size=self.moe_ffn_hidden_size)
            require(
                0 <= self.first_k_dense < self.num_layers,
                f"model.first_k_dense={self.first_k_dense}: must be in 0..{self.num_layers - 1}",
            )
            require(self.moe_aux_loss_coeff >= 0, f"model.moe_aux_loss_coeff={self.moe_aux_loss_coeff}: >= 0")
            require(  # megatron records the z-loss divided by its coefficient: 0 would make every step NaN
                self.moe_z_loss_coeff is None or self.moe_z_loss_coeff > 0,
                f"model.moe_z_loss_coeff={self.moe_z_loss_coeff}: must be > 0 (null turns the z-loss off)",
            )
        check_choices(self, "model")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass
class ParallelConfig:
    """Parallel layout; DP is what remains of the world size after TP x PP."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual stages per pipeline rank (interleaved schedule)
    ep: int = 1
    sequence_parallel: bool | None = None  # None: on whenever tp > 1 (required by MoE with TP)
    distributed_optimizer: bool = False

    def __post_init__(self) -> None:
        _positive("parallel", tp=self.tp, pp=self.pp, ep=self.ep, vpp=self.vpp)
        if self.vpp is not None and self.vpp > 1:
            require(self.pp > 1, f"parallel.vpp={self.vpp} needs parallel.pp > 1")
        if self.sequence_parallel is None:
            self.sequence_parallel = self.tp > 1

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp


@dataclass
class DecayConfig:
    """The decay phase of a WSD schedule. Start and length may be given as run fraction, tokens or steps."""

    shape: DecayShape = "1-sqrt"
    start_frac: float | None = None
    start_tokens: int | None = None
    start_steps: int | None = None
    length_frac: float | None = None  # None: decay runs to the end of training
    length_tokens: int | None = None
    length_steps: int | None = None
    points: list[list[float]] | None = None  # [[fraction of decay, lr ratio], ...] for shape=points

    ONE_OF: ClassVar = (
        ("start_frac", "start_tokens", "start_steps"),
        ("length_frac", "length_tokens", "length_steps"),
    )

    def __post_init__(self) -> None:
        check_choices(self, "schedule.decay")
        for group in (
            ("start_frac", "start_tokens", "start_steps"),
            ("length_frac", "length_tokens", "length_steps"),
        ):
            given = [g for g in group if getattr(self, g) is not None]
            require(len(given) <= 1, f"schedule.decay: give at most one of {', '.join(group)} (got {given})")
        for name in ("start_frac", "length_frac"):
            v = getattr(self, name)
            if v is not None:
                require(0.0 <= v <= 1.0, f"schedule.decay.{name}={v}: must be in [0, 1]")
        if self.shape == "points":
            require(
                bool(self.points),
                "schedule.decay.shape=points needs schedule.decay.points: [[frac, ratio], ...]",
            )


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, defined in tokens so batch-size changes leave it intact."""

    style: ScheduleStyle = "wsd"
    warmup_frac: float | None = None
    warmup_tokens: int | None = None
    warmup_steps: int | None = None
    init_lr_ratio: float = 0.0  # warmup starts at lr * init_lr_ratio
    min_lr_ratio: float = 0.1  # lr at the end of decay, as a fraction of the peak
    decay: DecayConfig = field(default_factory=DecayConfig)

    ONE_OF: ClassVar = (("warmup_frac", "warmup_tokens", "warmup_steps"),)

    def __post_init__(self) -> None:
        check_choices(self, "schedule")
        given = [g for g in ("warmup_frac", "warmup_tokens", "warmup_steps") if getattr(self, g) is not None]
        require(
            len(given) <= 1,
            f"schedule: give at most one of warmup_frac, warmup_tokens, warmup_steps ({given})",
        )
        if self.warmup_frac is not None:
            require(
                0.0 <= self.warmup_frac < 1.0, f"schedule.warmup_frac={self.warmup_frac}: must be in [0, 1)"
            )
        require(
            0.0 <= self.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]"
        )
        require(
            0.0 <= self.init_lr_ratio <= 1.0,
            f"schedule.init_lr_ratio={self.init_lr_ratio}: must be in [0, 1]",
        )


@dataclass
class OptimizerConfig:
    """AdamW through megatron-core's optimizer (distributed or not)."""

    lr: float = 2e-3
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    lr_mult: dict[str, float] = field(default_factory=dict)  # per-module overrides, e.g. {router: 0.5}

    def __post_init__(self) -> None:
        _positive("optimizer", lr=self.lr, adam_eps=self.adam_eps)
        require(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay}: must be >= 0")
        require(self.clip_grad >= 0, f"optimizer.clip_grad={self.clip_grad}: must be >= 0 (0 disables)")
        for b in ("adam_beta1", "adam_beta2"):
            v = getattr(self, b)
            require(0.0 <= v < 1.0, f"optimizer.{b}={v}: must be in [0, 1)")
        for k, v in self.lr_mult.items():
            require(
                isinstance(v, (int, float)) and v > 0,
                f"optimizer.lr_mult.{k}={v!r}: multipliers must be positive numbers",
            )


@dataclass
class TrainingConfig:
    """Batch sizes, length of the run, evaluation cadence, numerics."""

    micro_batch_size: int = 8
    global_batch_size: int = 16
    train_tokens: int | None = None
    train_steps: int | None = None
    # Build the train data for at least this many tokens (None: the run's own). A sample's position in the
    # data order depends on how many epochs the index is built for, so a CBS branch takes its parent's
    # size and reads the parent's sequences.
    data_tokens: int | None = None
    seed: int = 1234
    eval_interval: int = 50  # steps; 0 disables periodic evaluation
    eval_samples: int = 128  # size of the fixed validation set, in sequences
    log_interval: int = 10
    precision: Literal["auto", Precision] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: Device = "auto"
    threads: int | None = None  # torch threads per process on CPU; None: cores / local processes
    # Steps between the ranks' stop agreement (a SIGTERM stops the run at the next such step) and the
    # completion of an asynchronous save; also on log, eval and checkpoint steps and the last step.
    # Between them a step waits on the device only for megatron's gradient norm.
    sync_interval: int = 10

    ONE_OF: ClassVar = (("train_tokens", "train_steps"),)

    def __post_init__(self) -> None:
        _positive(
            "training",
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            train_tokens=self.train_tokens,
            train_steps=self.train_steps,
            data_tokens=self.data_tokens,
            log_interval=self.log_interval,
            threads=self.threads,
            sync_interval=self.sync_interval,
        )
        require(
            (self.train_tokens is None) != (self.train_steps is None),
            "training: give exactly one of training.train_tokens or training.train_steps",
        )
        require(self.eval_interval >= 0, f"training.eval_interval={self.eval_interval}: must be >= 0")
        require(self.eval_samples >= 0, f"training.eval_samples={self.eval_samples}: must be >= 0")
        check_choices(self, "training")


@dataclass
class DataConfig:
    """Megatron indexed datasets and the sentencepiece tokenizer that made them.

    ``paths`` is a blend: a list of prefixes, or of [weight, prefix] pairs. The word ``embedded`` (the
    default) means the corpus built from this Python's standard library, prepared once and cached.
    """

    paths: list[Any] = field(default_factory=lambda: ["embedded"])
    tokenizer: str | None = None  # sentencepiece .model; None with the embedded corpus
    split: str = "98,2,0"
    cache_dir: str = ".cache/ramp"
    embedded_vocab_size: int = 4096
    max_epochs: int = 1  # passes over the train split allowed; a shorter dataset is an error, not a repeat

    def __post_init__(self) -> None:
        require(bool(self.paths), "data.paths is empty: give dataset prefixes or 'embedded'")
        parts = self.split.split(",")
        require(
            len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts),
            f"data.split={self.split!r}: give three comma-separated weights train,valid,test such as 98,2,0",
        )
        if self.paths != ["embedded"]:
            require(
                self.tokenizer is not None, "data.tokenizer: set the sentencepiece model that made data.paths"
            )

    @property
    def is_embedded(self) -> bool:
        return self.paths == ["embedded"]

    def absolute(self) -> DataConfig:
        """This data with its files named by absolute paths (resolved against the current directory), as a
        run records them, so its config.yaml and checkpoints read the same from any working directory."""

        def prefix(p: Any) -> Any:
            if isinstance(p, str):
                return os.path.abspath(p)
            if isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[1], str):
                return [p[0], os.path.abspath(p[1])]
            return p  # malformed: parse_blend names it

        return dataclasses.replace(
            self,
            paths=self.paths if self.is_embedded else [prefix(p) for p in self.paths],
            tokenizer=None if self.tokenizer is None else os.path.abspath(self.tokenizer),
            cache_dir=os.path.abspath(self.cache_dir),
        )


@dataclass
class CheckpointConfig:
    """megatron-core dist_checkpointing; ``load`` is 'auto' (resume from ``latest`` if any, else start
    fresh: what a requeued job uses), 'latest', a step number, or a checkpoint path."""

    dir: str | None = None  # None: RUN_DIR/checkpoints
    interval: int = 0  # steps; 0 = only at the end
    keep_last: int = 3  # the most recently saved ones; never the one `latest` names
    load: str | None = None
    save_at_exit: bool = True
    load_optimizer: bool = True
    checksums: bool = True  # sha256 of every file in the manifest, verified on load
    # Write checkpoints in a background process (megatron's async dist_checkpointing); the manifest and
    # `latest` follow when the write is complete. None: on with CUDA, off on CPU.
    async_save: bool | None = None
    # A branch (new decay, batch, seed, data) may change what fixes the data order and the schedule; it
    # writes into its own run directory and never into the checkpoint's.
    branch: bool = False

    def __post_init__(self) -> None:
        require(self.interval >= 0, f"checkpoint.interval={self.interval}: must be >= 0")
        require(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last}: must be >= 1")
        if self.load is not None:
            self.load = str(self.load)

    def async_enabled(self, device: str) -> bool:
        """Whether saves are asynchronous on ``device`` ('cuda' or 'cpu')."""
        return device == "cuda" if self.async_save is None else self.async_save


@dataclass
class ResilienceConfig:
    """What a run does about bad steps and hangs."""

    max_bad_steps: int = 3  # consecutive non-finite steps (skipped) before the run stops or rewinds
    # stop: exit 3 naming the step; rewind: reload the last checkpoint and skip the bad steps' samples
    on_bad_steps: BadStepAction = "stop"
    max_rewinds: int = 3  # rewinds in one run before it stops instead
    spike_window: int = 50  # steps of loss history for the spike z-score (0 disables)
    spike_zscore: float = 6.0  # a loss this many standard deviations above the window is logged as a spike
    collective_timeout_s: int = 600  # a collective that waits longer fails instead of hanging
    heartbeat_s: float = 5.0  # ranks check each other this often; a peer silent for 3 beats is named; 0: off
    inject_nan_steps: list[int] = field(default_factory=list)  # fault injection (tests, benchmarks)

    def __post_init__(self) -> None:
        require(self.max_bad_steps >= 1, f"resilience.max_bad_steps={self.max_bad_steps}: must be >= 1")
        check_choices(self, "resilience")
        require(self.max_rewinds >= 0, f"resilience.max_rewinds={self.max_rewinds}: must be >= 0")
        require(self.spike_window >= 0, f"resilience.spike_window={self.spike_window}: must be >= 0")
        require(self.heartbeat_s >= 0, f"resilience.heartbeat_s={self.heartbeat_s}: must be >= 0")
        _positive(
            "resilience",
            spike_zscore=self.spike_zscore,
            collective_timeout_s=self.collective_timeout_s,
        )


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: WandbMode = "offline"  # online only with credentials
    project: str = "ramp"
    entity: str | None = None

    def __post_init__(self) -> None:
        check_choices(self, "logging.wandb")


@dataclass
class LoggingConfig:
    run_dir: str | None = None  # None: runs/<name>
    tensorboard: bool = True
    plots: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class PhasePlan:
    """One batch phase of a run: its global batch, the steps and tokens it spans, and its layout."""

    batch: int  # sequences per step
    first_step: int  # steps done when the phase starts
    start_tokens: int  # tokens consumed when the phase starts
    steps: int
    end_tokens: int
    parallel: ParallelConfig
    micro_batch_size: int
    dp: int
    num_microbatches: int

    def same_layout(self, other: PhasePlan) -> bool:
        return self.parallel == other.parallel and self.micro_batch_size == other.micro_batch_size

    def describe_layout(self) -> str:
        p = self.parallel
        vpp = f" vpp{p.vpp}" if p.vpp and p.vpp > 1 else ""
        return f"tp{p.tp} pp{p.pp}{vpp} ep{p.ep} dp{self.dp} mbs{self.micro_batch_size}"


@dataclass
class Derived:
    """Quantities computed once from the recipe and the world size (``dp``, ``num_microbatches`` and
    ``tokens_per_step`` are the first batch phase's; ``phases`` has every phase)."""

    world_size: int
    dp: int
    num_microbatches: int
    tokens_per_step: int
    train_steps: int
    train_tokens: int
    warmup_tokens: int
    device: str
    precision: str
    phases: list[PhasePlan] = field(default_factory=list)
    batch_schedule: BatchSchedule | None = None
    #: tokens the training data is built for: the run's, or, when online probes may grow the batch, the
    #: most any decision can make the run consume (it ends at the first step past the requested tokens)
    data_tokens: int = 0

    def lines(self) -> list[str]:
        skip = ("phases", "batch_schedule")
        return [f"{k}={v}" for k, v in dataclasses.asdict(self).items() if k not in skip]

    def phase_at(self, tokens: int) -> PhasePlan:
        """The phase whose steps start at ``tokens`` consumed (the last phase at or past the run's end)."""
        for ph in self.phases:
            if tokens < ph.end_tokens:
                return ph
        return self.phases[-1]

    def format_phases(self) -> str:
        rows = [
            f"  {i}: from step {ph.first_step} ({ph.start_tokens:,} tokens), {ph.steps} steps of "
            f"{ph.batch} sequences, {ph.describe_layout()} x {ph.num_microbatches} micro-batches"
            for i, ph in enumerate(self.phases)
        ]
        return "\n".join(rows)


@dataclass
class Recipe:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(train_steps=100))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mup: MupConfig = field(default_factory=MupConfig)
    batch_schedule: BatchScheduleConfig = field(default_factory=BatchScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)  # GPU fast paths; ignored on CPU
    cluster: ClusterConfig | None = None  # the machines --dry-run plans memory for
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)  # CBS probes; online when given a grid

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir or f"runs/{self.name}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def with_layout(self, parallel: ParallelConfig, micro_batch_size: int) -> Recipe:
        """This recipe in a batch phase's layout: what the model, DDP and optimizer are built from."""
        return dataclasses.replace(
            self,
            parallel=parallel,
            training=dataclasses.replace(self.training, micro_batch_size=micro_batch_size),
        )

    def check_layout(self, p: ParallelConfig, micro_batch_size: int, batch: int, world_size: int) -> int:
        """The data-parallel size of layout ``p`` on ``world_size`` ranks, or a one-line error naming the key
        that makes it impossible for a global batch of ``batch`` sequences."""
        m, t = self.model, self.training
        require(
            world_size % p.model_parallel_size == 0,
            f"parallel: tp*pp={p.tp}*{p.pp}={p.model_parallel_size} does not divide the world size "
            f"{world_size}; choose tp*pp among {_divisors(world_size)}",
        )
        dp = world_size // p.model_parallel_size
        require(
            m.num_attention_heads % p.tp == 0,
            f"parallel.tp={p.tp} does not divide model.num_attention_heads={m.num_attention_heads}; "
            f"choose tp among {_divisors(m.num_attention_heads)}",
        )
        require(
            m.query_groups % p.tp == 0,
            f"parallel.tp={p.tp} does not divide the {m.query_groups} query groups; "
            f"choose tp among {_divisors(m.query_groups)}",
        )
        stages = p.pp * (p.vpp or 1)
        require(
            m.num_layers % stages == 0,
            f"model.num_layers={m.num_layers} is not divisible by pp*vpp={stages}; "
            f"choose pp*vpp among {_divisors(m.num_layers)}",
        )
        if p.ep > 1:
            require(m.is_moe, f"parallel.ep={p.ep} needs an MoE model (model.num_experts > 0)")
            require(
                m.num_experts % p.ep == 0,
                f"parallel.ep={p.ep} does not divide model.num_experts={m.num_experts}; "
                f"choose ep among {_divisors(m.num_experts)}",
            )
            # Expert parallelism folds over the TP x DP ranks of one pipeline stage.
            require(
                (p.tp * dp) % p.ep == 0,
                f"parallel.ep={p.ep} does not divide tp*dp={p.tp * dp} (the ranks of one pipeline stage); "
                f"choose ep among {_divisors(p.tp * dp)}",
            )
        if p.tp > 1 and m.is_moe:
            require(
                bool(p.sequence_parallel), "parallel.sequence_parallel=false with tp>1 and MoE: set it true"
            )
        per_step = micro_batch_size * dp
        require(
            batch % per_step == 0,
            f"training.global_batch_size={batch} is not divisible by micro_batch_size*dp="
            f"{micro_batch_size}*{dp}={per_step}; use a multiple of {per_step}",
        )
        if p.vpp and p.vpp > 1:
            require(
                (batch // per_step) % p.pp == 0,
                f"interleaved pipeline needs micro-batches ({batch // per_step}) divisible by "
                f"parallel.pp={p.pp}; raise training.global_batch_size to a multiple of {per_step * p.pp}",
            )
        eval_unit = per_step * (p.pp if p.vpp and p.vpp > 1 else 1)
        require(
            t.eval_samples % eval_unit == 0,
            f"training.eval_samples={t.eval_samples} is not a multiple of micro_batch_size*dp"
            f"{'*pp' if eval_unit != per_step else ''}={eval_unit}; use a multiple of {eval_unit}",
        )
        return dp

    def derive(self, world_size: int, cuda_available: bool = False) -> Derived:
        """Check every batch phase's layout against the world size and compute the derived quantities."""
        t = self.training
        device = t.device if t.device != "auto" else ("cuda" if cuda_available else "cpu")
        require(device == "cpu" or cuda_available, "training.device=cuda but no CUDA device is visible")
        precision = t.precision if t.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
        batch_schedule, phases = self._phases(world_size, device)
        first = phases[0]
        train_tokens = phases[-1].end_tokens
        tokens_per_step = first.batch * self.model.seq_length
        warmup = self._warmup_tokens(train_tokens, tokens_per_step)
        require(
            warmup <= train_tokens,
            f"schedule warmup ({warmup} tokens) is longer than the run ({train_tokens} tokens)",
        )
        self._check_probes(batch_schedule, world_size)
        data_tokens = train_tokens
        if batch_schedule.reachable:  # the run's end moves with the last batch a decision reaches
            data_tokens = self.requested_tokens + max(batch_schedule.all_batches) * self.model.seq_length
        data_tokens = max(data_tokens, t.data_tokens or 0)
        return Derived(
            world_size=world_size,
            dp=first.dp,
            num_microbatches=first.num_microbatches,
            tokens_per_step=tokens_per_step,
            train_steps=sum(ph.steps for ph in phases),
            train_tokens=train_tokens,
            warmup_tokens=warmup,
            device=device,
            precision=precision,
            phases=phases,
            batch_schedule=batch_schedule,
            data_tokens=data_tokens,
        )

    def replan(self, d: Derived, schedule: BatchSchedule) -> Derived:
        """``d`` with the batch phases of ``schedule`` (a decision taken during the run, e.g.
        ``laws.batch_size.grow_at``): phases, steps and the run's end change; the LR schedule, which was
        resolved on the first plan, and the data, built for ``d.data_tokens``, do not."""
        phases = self._plan_phases(schedule, d.world_size, d.device)
        end = phases[-1].end_tokens
        require(
            end <= max(d.data_tokens, d.train_tokens),
            f"batch_schedule: the new plan ends at {end} tokens, past the {d.data_tokens} the data was "
            f"built for; a decision may only reach the batches planned at start (max_batch)",
        )
        return dataclasses.replace(
            d,
            phases=phases,
            batch_schedule=schedule,
            train_tokens=end,
            train_steps=sum(p.steps for p in phases),
        )

    @property
    def requested_tokens(self) -> int:
        """The tokens the recipe asks for (the run ends at the first step boundary at or past them)."""
        t = self.training
        if t.train_tokens is not None:
            return t.train_tokens
        return t.train_steps * t.global_batch_size * self.model.seq_length

    def _check_probes(self, schedule: BatchSchedule, world_size: int) -> None:
        """The probes: section against the rest of the recipe (online mode forks from this run): what would
        otherwise only fail at a fork, mid-run."""
        from launcher.laws.cbs import fork_points

        pr, bs, b0 = self.probes, self.batch_schedule, self.training.global_batch_size
        if bs.kind == "cbs" and bs.cbs_source == "probes":
            require(
                pr.online,
                "batch_schedule.cbs_source=probes needs online probes: set probes.every_tokens or "
                "probes.first_tokens",
            )
            require(
                bs.max_batch is not None and bs.max_batch > b0,
                f"batch_schedule.max_batch={bs.max_batch} leaves the probes nothing to grow to from "
                f"training.global_batch_size={b0}; raise it",
            )
        if not pr.online:
            return
        require(
            bool(fork_points(pr, self.requested_tokens)),
            f"probes: no fork point before the run's end ({self.requested_tokens} tokens); lower "
            f"probes.every_tokens / probes.first_tokens",
        )
        require(
            pr.rule != "val" or self.training.eval_samples > 0,
            "probes: the val read-off needs the run's fixed validation set, but training.eval_samples=0; "
            "set training.eval_samples or probes.rule=ema",
        )
        require(
            all(float(k * b0).is_integer() for k in pr.multipliers) and min(pr.multipliers) >= 1,
            f"probes.multipliers={pr.multipliers}: must be >= 1 and give whole batches",
        )
        if bs.kind == "cbs" and bs.cbs_source == "probes" and pr.deciding_only:
            require(
                len(deciding_multipliers(pr.multipliers, b0, bs.cbs_fraction, bs.max_batch)) > 1,
                f"probes.multipliers={list(pr.multipliers)}: no multiplier can grow batch {b0} under "
                f"batch_schedule.cbs_fraction={bs.cbs_fraction} (a doubling needs cbs_fraction x k x {b0} > "
                f"{2 * b0}); add larger multipliers or raise cbs_fraction (at most {MAX_CBS_FRACTION:g})",
            )
        # A branch of pr.nproc processes: unsharded with one (launcher/probes.py branch_sets), else the
        # recipe's layout; it must split every batch a fork can ask for.
        branch = ParallelConfig() if pr.nproc == 1 else self.parallel
        for b in schedule.all_batches:
            for k in pr.multipliers:
                try:
                    self.check_layout(branch, self.training.micro_batch_size, round(k * b), pr.nproc)
                except RampError as e:
                    raise RampError(
                        f"probes: a branch at k={k:g} from batch {b} on {pr.nproc} process(es): {e}"
                    ) from None

    def _warmup_tokens(self, train_tokens: int, tokens_per_step: int) -> int:
        s = self.schedule
        if s.warmup_tokens is not None:
            return s.warmup_tokens
        if s.warmup_steps is not None:
            return s.warmup_steps * tokens_per_step
        return round((s.warmup_frac or 0.0) * train_tokens)

    def _phases(self, world_size: int, device: str) -> tuple[BatchSchedule, list[PhasePlan]]:
        """The batch schedule resolved for this run, and every phase with its checked layout."""
        from launcher.laws.batch_size import resolve_batch_schedule
        from launcher.laws.schedule import resolve_schedule

        m, t, bs = self.model, self.training, self.batch_schedule
        b0, seq = t.global_batch_size, m.seq_length
        if bs.kind != "constant":
            for key, value in (
                ("training.train_steps", t.train_steps),
                ("schedule.warmup_steps", self.schedule.warmup_steps),
                ("schedule.decay.start_steps", self.schedule.decay.start_steps),
                ("schedule.decay.length_steps", self.schedule.decay.length_steps),
            ):
                require(
                    value is None,
                    f"{key}={value} counts steps, but batch_schedule.kind={bs.kind} changes the batch, so a "
                    f"step is no fixed number of tokens; give {key.replace('steps', 'tokens')} instead",
                )
        requested = self.requested_tokens
        # Seesaw reads the LR schedule of the requested run (the run's end moves by less than one step).
        lr = resolve_schedule(self.schedule, requested, b0 * seq, self._warmup_tokens(requested, b0 * seq))
        schedule = resolve_batch_schedule(bs, b0, requested, seq, lr.factor, lr_peak_tokens=lr.warmup_tokens)
        for b in schedule.reachable:  # a batch a decision may reach must have a layout that works
            self.check_layout(*self._phase_layout(b, world_size, device), b, world_size)
        return schedule, self._plan_phases(schedule, world_size, device)

    def _plan_phases(self, schedule: BatchSchedule, world_size: int, device: str) -> list[PhasePlan]:
        """Every phase of ``schedule`` with its steps (``simulate``) and its checked layout."""
        from launcher.laws.batch_size import simulate

        layouts = {b: self._phase_layout(b, world_size, device) for b in schedule.batches}
        phases = []
        for ph in simulate(schedule, self.requested_tokens, self.model.seq_length):
            parallel, mbs = layouts[ph.batch]
            dp = self.check_layout(parallel, mbs, ph.batch, world_size)
            phases.append(
                PhasePlan(
                    batch=ph.batch,
                    first_step=ph.first_step,
                    start_tokens=ph.start_tokens,
                    steps=ph.steps,
                    end_tokens=ph.end_tokens,
                    parallel=parallel,
                    micro_batch_size=mbs,
                    dp=dp,
                    num_microbatches=ph.batch // (mbs * dp),
                )
            )
        return phases

    def _phase_layout(self, batch: int, world_size: int, device: str) -> tuple[ParallelConfig, int]:
        """(parallel, micro_batch_size) for a phase of ``batch`` sequences: the recipe's (``fixed``), the
        recipe's with the named entry's keys (a mapping), or the cost model's fastest (``auto``)."""
        p, t, layouts = self.parallel, self.training, self.batch_schedule.layouts
        if layouts == "fixed":
            return p, t.micro_batch_size
        if isinstance(layouts, dict):
            entry = next(v for k, v in layouts.items() if int(k) == batch)
            named = ParallelConfig(
                tp=entry.get("tp", p.tp),
                pp=entry.get("pp", p.pp),
                vpp=entry.get("vpp", p.vpp),
                ep=entry.get("ep", p.ep),
                distributed_optimizer=p.distributed_optimizer,
            )
            return named, entry.get("micro_batch_size", t.micro_batch_size)
        return self._auto_layout(batch, world_size, device)

    def planned_vocab_size(self) -> int | None:
        """The vocabulary size known before the tokenizer is loaded (None: only the tokenizer knows it)."""
        m = self.model
        return m.vocab_size or (self.data.embedded_vocab_size if self.data.is_embedded else None)

    def hardware(self, device: str, world_size: int) -> Hardware:
        """What the layout cost model assumes: the recipe's cluster on GPU, this machine's gloo on CPU."""
        from launcher.laws.layout_cost import Hardware

        if device == "cuda":
            return Hardware.from_cluster(self.cluster or ClusterConfig())
        return Hardware.cpu_gloo(world_size)

    def _auto_layout(self, batch: int, world_size: int, device: str) -> tuple[ParallelConfig, int]:
        """The cost model's fastest layout for a phase (``laws/layout_cost.py``), among those this recipe's
        own checks accept."""
        from launcher.laws.layout_cost import best_layout

        m, p = self.model, self.parallel
        vocab = self.planned_vocab_size()
        require(vocab is not None, "batch_schedule.layouts=auto needs model.vocab_size (for the cost model)")
        hardware = self.hardware(device, world_size)

        def config(c) -> ParallelConfig:
            vpp = c.vpp if c.vpp > 1 else None
            return ParallelConfig(
                tp=c.tp, pp=c.pp, vpp=vpp, ep=c.ep, distributed_optimizer=p.distributed_optimizer
            )

        def valid(c) -> bool:
            try:
                self.check_layout(config(c), c.micro_batch_size, batch, world_size)
            except RampError:
                return False
            return True

        best, _ = best_layout(
            m,
            world_size,
            batch,
            m.seq_length,
            hardware,
            is_valid=valid,
            vocab_size=vocab,
            distributed_optimizer=p.distributed_optimizer,
        )
        return config(best), best.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------------------------------------------
# Loading: YAML -> nested dataclasses, with nearest-name errors and --set overrides.


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, data: Any, where: str) -> Any:
    require(isinstance(data, dict), f"{where or 'recipe'}: expected a mapping, got {type(data).__name__}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            near = difflib.get_close_matches(str(key), list(types_), n=1)
            hint = f"; did you mean {(where + '.' if where else '') + near[0]!r}?" if near else ""
            valid = ", ".join(types_)
            raise RampError(
                f"unknown recipe key {(where + '.' if where else '') + str(key)!r}{hint} (valid: {valid})"
            )
        kwargs[key] = _coerce(types_[key], value, f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - dataclass signature errors
        raise RampError(f"{where or 'recipe'}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        # The first alternative that takes the value (str | list, Literal | dict); else the first's error.
        errors: list[RampError] = []
        for arg in args:
            try:
                return _coerce(arg, value, where)
            except RampError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        require_choice(where, value, typing.get_args(tp))
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (list, dict):
        expected = origin
        require(isinstance(value, expected), f"{where}={value!r}: expected a {expected.__name__}")
        return value
    if tp is bool:
        require(isinstance(value, bool), f"{where}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        require(
            isinstance(value, int) and not isinstance(value, bool), f"{where}={value!r}: expected an integer"
        )
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-8 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{where}={value!r}: expected a number",
        )
        return float(value)
    if tp is str:
        require(isinstance(value, (str, int, float)), f"{where}={value!r}: expected a string")
        return str(value)
    return value


def _walk_suffixes(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _walk_suffixes(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_walk_suffixes(v) for v in data]
    return parse_count(data)  # 1.5M / 2B / 10K token counts in YAML and --set values


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` strings; values are parsed as YAML (numbers, booleans, lists)."""
    for item in overrides:
        require("=" in item, f"--set {item!r}: expected key=value, e.g. training.train_steps=100")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), f"--set {key}: {part} is not a section")
        node[parts[-1]] = value
        if value is not None:
            # Setting one of a group of alternatives (train_steps vs train_tokens, decay start in tokens
            # vs as a fraction...) replaces whichever of them the recipe gave.
            for sibling in _alternatives(parts):
                node[sibling] = None
    return data


def _alternatives(parts: list[str]) -> tuple[str, ...]:
    cls: Any = Recipe
    for part in parts[:-1]:
        types_ = _field_types(cls) if dataclasses.is_dataclass(cls) else {}
        cls = types_.get(part)
        if cls is None:
            return ()
    for group in getattr(cls, "ONE_OF", ()):
        if parts[-1] in group:
            return tuple(g for g in group if g != parts[-1])
    return ()


def resolve_path(recipe: str | Path) -> Path:
    """A recipe is a YAML path or the name of one under recipes/."""
    p = Path(recipe)
    if p.exists():
        return p
    named = RECIPES_DIR / f"{recipe}.yaml"
    if named.exists():
        return named
    known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
    near = difflib.get_close_matches(str(recipe), known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise RampError(
        f"recipe {str(recipe)!r} not found{hint} (give a YAML path or one of: {', '.join(known)})"
    )


def load(recipe: str | Path | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe from a YAML path, a recipe name or a dict."""
    if isinstance(recipe, dict):
        data = dict(recipe)
    else:
        path = resolve_path(recipe)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RampError(f"recipe {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        sections = [f.name for f in dataclasses.fields(Recipe) if f.name != "name"]
        require(
            isinstance(data, dict) and any(k in sections for k in data),
            f"recipe {path} has no sections (expected some of: {', '.join(sections)}); "
            "start from a recipe under recipes/",
        )
        data.setdefault("name", path.stem)
    data = apply_overrides(data, list(overrides or []))
    return _build(Recipe, _walk_suffixes(data), "")
