"""Batch-size schedules in tokens: which global batch each step runs at, and the LR factor that goes with it.

The recipe's ``batch_schedule:`` section (:class:`BatchScheduleConfig`) is resolved once at start into a
:class:`BatchSchedule`: phases ``(start_tokens, batch)``, the first at token 0 with the recipe's
``training.global_batch_size``. The batch of a step is ``batch_at(tokens consumed before the step)``, and
the run ends at the first step after which the consumed tokens reach ``train_tokens``;
:func:`simulate` turns that rule into per-phase step counts, exactly and without looping over steps.

Kinds (all boundaries in tokens, so the token LR schedule of ``laws/schedule.py`` is unaffected):

=========  ==========================================================================================
constant   one phase
steps      a list of (tokens, batch) points, or Megatron's ``--step-batch-size-schedule`` string
           ``"0:768 250B:1536"``
ramp       Megatron's ``--rampup-batch-size start increment samples`` in tokens: from ``ramp_start``
           the batch grows by ``ramp_increment`` in equal token slices up to ``max_batch``
seesaw     arXiv 2510.14717: wherever the LR schedule crosses 1/2, 1/4, ... of its peak (after the
           peak), double the batch; with ``lr_rule: sqrt`` the LR is ``factor(t) * sqrt(2)**k``, i.e.
           each 2x cut becomes a sqrt(2) cut plus a doubling
cbs        arXiv 2505.23971 section 2.5: double whenever ``cbs_fraction * CBS(t) > 2 * batch`` (1: the
           paper's rule; 2: while the CBS is over the batch), CBS(t)
           interpolated linearly in a measured table (held constant outside it); with
           ``cbs_source: probes`` the table is the run's own online CBS probes (``probes:`` section):
           the run starts at one phase and :func:`grow_at` adds a phase at each probe's decision
bopt       arXiv 2601.05034: the largest ``B0 * 2**k`` not above ``B_opt(D) = bopt_coef * D**bopt_exponent``
=========  ==========================================================================================

LR at a change (``lr_rule``): the peak of every parameter group is multiplied by ``lr_scale(batch)``,
relative to the first phase's batch ``B0``: 1 (``none``), ``sqrt(B/B0)`` (``sqrt``, Adam's rule, the
2505.23971 warmup) or ``B/B0`` (``linear``, SGD's). The token schedule's factor multiplies on top.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from launcher.errors import check_choices, require, require_choice
from launcher.laws.units import format_count, parse_count

ScheduleKind = Literal["constant", "steps", "ramp", "seesaw", "cbs", "bopt"]
LrRule = Literal["none", "sqrt", "linear"]
LayoutMode = Literal["fixed", "auto"]
CbsSource = Literal["table", "probes"]
KINDS: tuple[str, ...] = get_args(ScheduleKind)
LR_RULES: tuple[str, ...] = get_args(LrRule)
LAYOUT_MODES: tuple[str, ...] = get_args(LayoutMode)
#: What a per-batch layout entry may name; a key left out keeps the recipe's value.
LAYOUT_KEYS = ("tp", "pp", "vpp", "ep", "micro_batch_size")


def lr_multiplier(rule: str, ratio: float) -> float:
    """The LR factor for a batch ``ratio`` times the reference batch: 1, sqrt(ratio) or ratio."""
    require_choice("lr_rule", rule, LR_RULES)
    return {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[rule]


#: Fields each kind reads besides the common ``lr_rule`` and ``layouts``; any other one set is refused.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "steps": ("steps",),
    "ramp": ("ramp_start", "ramp_increment", "ramp_tokens", "max_batch"),
    "seesaw": ("max_batch",),
    "cbs": ("cbs_table", "cbs_source", "cbs_fraction", "max_batch"),
    "bopt": ("bopt_coef", "bopt_exponent", "max_batch"),
}
_DEFAULTS = {"cbs_fraction": 1.0, "cbs_source": "table"}  # fields whose "unset" value is not None

#: Doublings the derived kinds (seesaw, cbs, bopt) may make: 2**40 x the first batch is no real schedule.
MAX_DOUBLINGS = 40
# cbs_fraction's ceiling: at 2 the doubling rule grows the batch while the CBS is over it
MAX_CBS_FRACTION = 2.0

S = "batch_schedule"


@dataclass
class BatchScheduleConfig:
    """The recipe's ``batch_schedule:`` section, resolved against the run by :func:`resolve_batch_schedule`.

    A field that another kind reads is refused when set (``KIND_FIELDS``), so a typo in ``kind`` is caught.
    """

    kind: ScheduleKind = "constant"  # how the global batch grows (table in the module docstring)
    steps: str | list[list[int]] | None = None  # kind=steps: "0:8 600K:16" or [[tokens, batch], ...]
    ramp_start: int | None = None  # kind=ramp: first batch (None: training.global_batch_size, must equal it)
    ramp_increment: int | None = None  # kind=ramp: sequences added at each increment
    ramp_tokens: int | None = None  # kind=ramp: tokens over which the batch ramps from start to max_batch
    max_batch: int | None = (
        None  # ramp: final batch; seesaw/cbs/bopt: cap (B0 times a power of 2; None: none)
    )
    lr_rule: LrRule = "sqrt"  # LR multiplier at batch B: none 1, sqrt sqrt(B/B0), linear B/B0
    cbs_table: list[list[float]] | None = None  # kind=cbs: [[tokens, measured CBS in sequences], ...]
    # kind=cbs: table (cbs_table, measured before) or probes (the run's online probes decide as it trains)
    cbs_source: CbsSource = "table"
    # kind=cbs: grow only when cbs_fraction * CBS > 2 * batch. 1 is the paper's rule (the batch stays below
    # a CBS it would reach, e.g. 16 for a CBS of 32); 2 grows while the CBS is over the batch: up to the
    # measured CBS itself when it is the batch x 2**n (the probes' read-offs with multipliers 1, 2, 4, ...:
    # the largest batch whose branch passed, a lower bound, as the first failing k x B is above it). Under
    # WSD growing early can lose: the decay removes more gradient noise from a small batch than from a large
    # one (calibration.md, last section: the CBS-following schedule lost 1.06% under WSD, and won at
    # constant LR), so < 1 delays growth.
    cbs_fraction: float = 1.0
    bopt_coef: float | None = (
        None  # kind=bopt: B_opt(D) = bopt_coef * D**bopt_exponent (D tokens, B sequences)
    )
    bopt_exponent: float | None = None  # kind=bopt: exponent of the B_opt curve (> 0)
    # fixed: the recipe's parallel + micro_batch_size in every phase; auto: the cost model picks per phase;
    # or {batch: {tp, pp, vpp, ep, micro_batch_size}} for every batch the run reaches (missing keys: recipe's)
    layouts: LayoutMode | dict[int, dict[str, int]] = "fixed"

    def __post_init__(self) -> None:
        check_choices(self, S)
        allowed = KIND_FIELDS[self.kind]
        for name in sorted({f for fields in KIND_FIELDS.values() for f in fields}):
            if name not in allowed and getattr(self, name) != _DEFAULTS.get(name):
                owners = " or ".join(k for k, v in KIND_FIELDS.items() if name in v)
                require(
                    False, f"{S}.{name} is set but {S}.kind={self.kind}; remove it or set kind to {owners}"
                )
        if self.kind == "steps":
            require(
                self.steps is not None,
                f'{S}.kind=steps needs {S}.steps: "0:8 600K:16" or [[tokens, batch], ...]',
            )
            self.step_points()  # validates
        if self.kind == "ramp":
            for name in ("ramp_increment", "ramp_tokens", "max_batch"):
                require(getattr(self, name) is not None, f"{S}.kind=ramp needs {S}.{name}")
            _positive(
                ramp_start=self.ramp_start, ramp_increment=self.ramp_increment, ramp_tokens=self.ramp_tokens
            )
        _positive(max_batch=self.max_batch)
        if self.kind == "cbs" and self.cbs_source == "table":
            require(
                self.cbs_table is not None,
                f"{S}.kind=cbs needs {S}.cbs_table: [[tokens, cbs], ...] (or cbs_source=probes)",
            )
            self.cbs_points()
        if self.kind == "cbs" and self.cbs_source == "probes":
            require(
                self.cbs_table is None,
                f"{S}.cbs_table is set but {S}.cbs_source=probes (the run measures its own); remove one",
            )
            require(
                self.max_batch is not None,
                f"{S}.cbs_source=probes needs {S}.max_batch: the largest batch the probes may grow to "
                f"(its layout and data are planned before the run starts)",
            )
        if self.kind == "cbs":
            require(
                0.0 < self.cbs_fraction <= MAX_CBS_FRACTION,
                f"{S}.cbs_fraction={self.cbs_fraction}: must be in (0, {MAX_CBS_FRACTION:g}] (1: the "
                f"paper's rule, CBS > 2 x batch; 2: while the CBS is over the batch)",
            )
        if self.kind == "bopt":
            for name in ("bopt_coef", "bopt_exponent"):
                require(getattr(self, name) is not None, f"{S}.kind=bopt needs {S}.{name}")
            _positive(bopt_coef=self.bopt_coef, bopt_exponent=self.bopt_exponent)
        if self.kind == "seesaw":
            require(
                self.lr_rule == "sqrt",
                f"{S}.lr_rule={self.lr_rule}: seesaw trades each 2x LR cut for a doubling and a sqrt(2) cut, "
                f"which is lr_rule=sqrt; set it (or use kind=steps for another rule)",
            )
        _check_layouts(self.layouts)

    def step_points(self) -> tuple[tuple[int, int], ...]:
        """``steps`` as (tokens, batch) pairs: tokens strictly increasing, batches > 0, non-decreasing."""
        raw = self.steps
        if isinstance(raw, str):
            pairs: list[Any] = []
            for item in raw.split():
                parts = item.split(":")
                require(
                    len(parts) == 2,
                    f'{S}.steps: {item!r} is not TOKENS:BATCH (as in "0:8 600K:16", quoted in YAML)',
                )
                pairs.append([parse_count(parts[0]), parse_count(parts[1])])
        else:
            pairs = list(raw or [])
        require(len(pairs) > 0, f'{S}.steps is empty: give "0:8 600K:16" or [[tokens, batch], ...]')
        out: list[tuple[int, int]] = []
        for p in pairs:
            require(
                isinstance(p, (list, tuple)) and len(p) == 2,
                f"{S}.steps: {p!r} is not a [tokens, batch] pair",
            )
            tokens, batch = (_as_int(v) for v in p)
            require(tokens is not None and tokens >= 0, f"{S}.steps: tokens {p[0]!r} must be an integer >= 0")
            require(batch is not None and batch > 0, f"{S}.steps: batch {p[1]!r} must be an integer > 0")
            if out:
                t0, b0 = out[-1]
                require(
                    tokens > t0,
                    f"{S}.steps: tokens must increase ({format_count(tokens)} after {format_count(t0)})",
                )
                require(
                    batch >= b0,
                    f"{S}.steps: the batch may not decrease ({b0}, then {batch} at {format_count(tokens)})",
                )
            out.append((tokens, batch))
        return tuple(out)

    def cbs_points(self) -> tuple[tuple[int, float], ...]:
        """``cbs_table`` as (tokens, CBS) pairs, validated: tokens strictly increasing, CBS > 0."""
        rows = self.cbs_table or []
        require(len(rows) > 0, f"{S}.cbs_table is empty: give [[tokens, cbs], ...]")
        out: list[tuple[int, float]] = []
        for row in rows:
            require(
                isinstance(row, (list, tuple)) and len(row) == 2,
                f"{S}.cbs_table: {row!r} is not a [tokens, cbs] pair",
            )
            tokens = _as_int(row[0])
            cbs = parse_count(row[1])
            require(
                tokens is not None and tokens >= 0,
                f"{S}.cbs_table: tokens {row[0]!r} must be an integer >= 0",
            )
            require(
                isinstance(cbs, (int, float)) and not isinstance(cbs, bool) and cbs > 0,
                f"{S}.cbs_table: cbs {row[1]!r} must be a number > 0 (sequences)",
            )
            if out:
                require(
                    tokens > out[-1][0],
                    f"{S}.cbs_table: tokens must increase "
                    f"({format_count(tokens)} after {format_count(out[-1][0])})",
                )
            out.append((tokens, float(cbs)))
        return tuple(out)


def _positive(**values: int | float | None) -> None:
    for name, v in values.items():
        if v is not None:
            require(v > 0, f"{S}.{name}={v}: must be > 0")


def _as_int(v: Any) -> int | None:
    v = parse_count(v)
    if isinstance(v, str) and v.strip().isdigit():  # a plain number inside the Megatron-style string
        v = int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _check_layouts(layouts: Any) -> None:
    if isinstance(layouts, str):
        require_choice(f"{S}.layouts", layouts, LAYOUT_MODES)
        return
    require(
        isinstance(layouts, dict) and len(layouts) > 0,
        f"{S}.layouts={layouts!r}: give fixed, auto, or a mapping batch -> {{{', '.join(LAYOUT_KEYS)}}}",
    )
    for batch, entry in layouts.items():
        b = _as_int(batch)
        require(
            b is not None and b > 0, f"{S}.layouts: key {batch!r} must be a batch size (a positive integer)"
        )
        require(
            isinstance(entry, dict), f"{S}.layouts.{batch}: expected a mapping of {', '.join(LAYOUT_KEYS)}"
        )
        for key, value in entry.items():
            if key not in LAYOUT_KEYS:
                near = difflib.get_close_matches(str(key), LAYOUT_KEYS, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                require(
                    False, f"unknown key {S}.layouts.{batch}.{key}{hint} (valid: {', '.join(LAYOUT_KEYS)})"
                )
            v = _as_int(value)
            require(
                v is not None and v > 0, f"{S}.layouts.{batch}.{key}={value!r}: must be a positive integer"
            )


# -- the resolved schedule ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPhase:
    """From ``start_tokens`` consumed tokens on, steps run at ``batch`` sequences."""

    start_tokens: int
    batch: int


@dataclass(frozen=True)
class BatchSchedule:
    """Phases in tokens, the first at 0; batches strictly increasing from phase to phase."""

    phases: tuple[BatchPhase, ...]
    lr_rule: LrRule = "sqrt"
    kind: ScheduleKind = "constant"
    layouts: Any = "fixed"  # as in the config: fixed | auto | {batch: {key: value}}
    #: batches a decision taken during the run may add (``cbs_source: probes``); their layouts are planned
    #: and checked at start like the phases'
    reachable: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        require(len(self.phases) > 0, f"{S}: a schedule needs at least one phase")
        require(self.phases[0].start_tokens == 0, f"{S}: the first phase must start at token 0")
        for a, b in zip(self.phases, self.phases[1:], strict=False):
            require(
                b.start_tokens > a.start_tokens and b.batch > a.batch, f"{S}: phases must grow ({a} then {b})"
            )
        require_choice(f"{S}.lr_rule", self.lr_rule, LR_RULES)

    @property
    def is_constant(self) -> bool:
        return len(self.phases) == 1

    @property
    def initial_batch(self) -> int:
        return self.phases[0].batch

    @property
    def batches(self) -> tuple[int, ...]:
        """Every batch of the schedule, in order (distinct: batches strictly increase)."""
        return tuple(p.batch for p in self.phases)

    @property
    def all_batches(self) -> tuple[int, ...]:
        """The planned batches and those a decision during the run may reach, increasing."""
        return tuple(sorted({*self.batches, *self.reachable}))

    def phase_index(self, tokens_consumed: int) -> int:
        starts = [p.start_tokens for p in self.phases]
        return max(bisect.bisect_right(starts, tokens_consumed) - 1, 0)

    def batch_at(self, tokens_consumed: int) -> int:
        """The batch of the step that starts after ``tokens_consumed`` tokens."""
        return self.phases[self.phase_index(tokens_consumed)].batch

    def lr_scale(self, batch: int) -> float:
        """Multiplier on every group's peak LR at ``batch``, relative to the first phase's batch."""
        return lr_multiplier(self.lr_rule, batch / self.initial_batch)

    def describe(self) -> str:
        """One line for the start-up print."""
        if self.is_constant:
            return f"constant batch {self.initial_batch}"
        body = f"{self.initial_batch}" + "".join(
            f" -> {p.batch} at {format_count(p.start_tokens)}" for p in self.phases[1:]
        )
        rule = {"none": "LR unchanged", "sqrt": "LR x sqrt(B/B0)", "linear": "LR x B/B0"}[self.lr_rule]
        return f"{self.kind} batch schedule in tokens: {body}; {rule}"

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the run's saved metadata."""
        return {
            "kind": self.kind,
            "lr_rule": self.lr_rule,
            "phases": [[p.start_tokens, p.batch] for p in self.phases],
        }


def cbs_decision(batch: int, cbs: float, fraction: float = 1.0, cap: int | None = None) -> int:
    """The batch after a CBS measurement by the doubling rule of 2505.23971: double while
    ``fraction * cbs > 2 * batch``, never above ``cap`` (never shrinks)."""
    require(batch > 0 and cbs > 0 and fraction > 0, "cbs_decision: batch, cbs and fraction must be > 0")
    for _ in range(MAX_DOUBLINGS):
        if fraction * cbs <= 2 * batch or (cap is not None and 2 * batch > cap):
            return batch
        batch *= 2
    return batch


def deciding_multipliers(
    multipliers: Sequence[float], batch: int, fraction: float = 1.0, cap: int | None = None
) -> list[float]:
    """The probe multipliers whose outcome can change :func:`cbs_decision` at ``batch``: the first (the
    reference), then each ``k`` whose passing would take the decision above the previous one's. With the
    paper's rule (fraction 1) a pass at ``k = 2`` (CBS ``2 B``) grows nothing, so ``1, 2, 4, 8, 16`` at
    batch 8 capped at 32 is ``1, 4, 8``: a doubling needs ``k = 4``, a second ``k = 8``."""
    ks = sorted(multipliers)
    kept = [ks[0]]
    for k in ks[1:]:
        if cbs_decision(batch, k * batch, fraction, cap) > cbs_decision(
            batch, kept[-1] * batch, fraction, cap
        ):
            kept.append(k)
    return kept


def grow_at(schedule: BatchSchedule, tokens: int, batch: int) -> BatchSchedule:
    """``schedule`` with ``batch`` from ``tokens`` consumed on: the phases that started before ``tokens`` are
    kept (they ran), any later ones are dropped (a new decision replaces the old plan)."""
    kept = [p for p in schedule.phases if p.start_tokens < tokens]
    require(bool(kept), f"{S}: grow_at({tokens}) would drop the first phase")
    if batch != kept[-1].batch:
        require(batch > kept[-1].batch, f"{S}: the batch may only grow ({kept[-1].batch}, then {batch})")
        kept.append(BatchPhase(int(tokens), int(batch)))
    return dataclasses.replace(schedule, phases=tuple(kept))


def resolve_batch_schedule(
    cfg: BatchScheduleConfig,
    initial_batch: int,
    train_tokens: int,
    seq_length: int,
    lr_factor: Callable[[int], float] | None = None,
    *,
    lr_peak_tokens: int = 0,
) -> BatchSchedule:
    """Turn the recipe's section into phases for a run of ``train_tokens`` tokens.

    ``initial_batch`` is ``training.global_batch_size``: the first phase's batch. ``lr_factor`` is the token
    LR schedule's ``TokenSchedule.factor`` and ``lr_peak_tokens`` the token at which it reaches its peak of 1
    (``TokenSchedule.warmup_tokens``); seesaw needs both and looks for the LR cuts after the peak, where the
    factor must not increase. Phases that would start at or after ``train_tokens`` never run and are left
    out. Consecutive phases with the same batch are merged.
    """
    require(initial_batch > 0, f"training.global_batch_size={initial_batch}: must be > 0")
    require(train_tokens > 0, f"{S}: the run must have tokens (train_tokens={train_tokens})")
    require(seq_length > 0, f"model.seq_length={seq_length}: must be > 0")
    b0 = initial_batch
    reachable: tuple[int, ...] = ()
    if cfg.kind == "constant":
        points = [(0, b0)]
    elif cfg.kind == "steps":
        points = list(cfg.step_points())
        if points[0][0] == 0:
            require(
                points[0][1] == b0,
                f"{S}.steps starts at token 0 with batch {points[0][1]} but training.global_batch_size={b0}; "
                f"make them equal (the first phase runs at the recipe's global batch) or drop the 0 entry",
            )
        else:
            require(
                points[0][1] >= b0,
                f"{S}.steps: the batch may not decrease (training.global_batch_size={b0}, "
                f"then {points[0][1]} at {format_count(points[0][0])})",
            )
            points.insert(0, (0, b0))
    elif cfg.kind == "ramp":
        points = _ramp_points(cfg, b0)
    elif cfg.kind == "cbs" and cfg.cbs_source == "probes":
        points = [(0, b0)]  # decisions come as the run measures (grow_at)
        cap = _cap(cfg, b0)
        assert cap is not None
        reachable = tuple(b0 * 2**k for k in range(1, MAX_DOUBLINGS) if b0 * 2**k <= cap)
    else:
        cap = _cap(cfg, b0)
        if cfg.kind == "seesaw":
            points = _seesaw_points(b0, cap, train_tokens, lr_factor, lr_peak_tokens)
        elif cfg.kind == "cbs":
            points = _cbs_points(cfg, b0, cap, train_tokens)
        else:
            points = _bopt_points(cfg, b0, cap, train_tokens)
    phases: list[BatchPhase] = []
    for tokens, batch in points:
        if tokens >= train_tokens and phases:
            break
        if phases and batch == phases[-1].batch:
            continue
        if phases and tokens == phases[-1].start_tokens:  # several doublings at one token
            phases[-1] = BatchPhase(tokens, batch)
            continue
        phases.append(BatchPhase(int(tokens), int(batch)))
    schedule = BatchSchedule(
        phases=tuple(phases), lr_rule=cfg.lr_rule, kind=cfg.kind, layouts=cfg.layouts, reachable=reachable
    )
    if isinstance(cfg.layouts, dict):
        named = {_as_int(k) for k in cfg.layouts}
        missing = [b for b in schedule.all_batches if b not in named]
        require(
            not missing,
            f"{S}.layouts names no layout for batch {', '.join(map(str, missing))}; add an entry for "
            f"every batch the run reaches ({', '.join(map(str, schedule.all_batches))}) or use fixed | auto",
        )
    return schedule


def _cap(cfg: BatchScheduleConfig, b0: int) -> int | None:
    if cfg.max_batch is None:
        return None
    ratio = cfg.max_batch / b0
    k = round(math.log2(ratio)) if ratio >= 1 else -1
    require(
        k >= 0 and b0 * 2**k == cfg.max_batch,
        f"{S}.max_batch={cfg.max_batch} is not training.global_batch_size={b0} times a power of 2; "
        f"{cfg.kind} only doubles the batch (use e.g. {b0 * 2 ** max(k, 1)})",
    )
    return cfg.max_batch


def _ramp_points(cfg: BatchScheduleConfig, b0: int) -> list[tuple[int, int]]:
    """Megatron's ``RampupBatchsizeNumMicroBatchesCalculator`` in tokens.

    Megatron: ``n = (global - start) / increment`` increments over ``ramp`` samples; at ``consumed`` samples
    the batch is ``global`` if ``consumed > ramp``, else ``start + floor(consumed / (ramp / n)) * increment``.
    Increment ``k`` therefore applies from the first token ``t`` with ``t * n >= k * ramp``, i.e.
    ``ceil(k * ramp / n)``. Exact integers here: megatron's float division can give ``n - 1`` increments
    at ``consumed == ramp`` exactly (100 / (100 / 3) is 2.9999999999999996), where this gives ``n``.
    """
    start = cfg.ramp_start if cfg.ramp_start is not None else b0
    require(
        start == b0,
        f"{S}.ramp_start={start} but training.global_batch_size={b0}; the run starts at the recipe's global "
        f"batch: make them equal (or leave ramp_start out)",
    )
    assert cfg.max_batch is not None and cfg.ramp_increment is not None and cfg.ramp_tokens is not None
    diff = cfg.max_batch - start
    require(diff > 0, f"{S}.max_batch={cfg.max_batch} must be larger than the ramp's start batch {start}")
    require(
        diff % cfg.ramp_increment == 0,
        f"{S}.ramp_increment={cfg.ramp_increment} does not divide max_batch - start = "
        f"{cfg.max_batch} - {start} = {diff}; choose a divisor of {diff}",
    )
    n = diff // cfg.ramp_increment
    ramp = cfg.ramp_tokens
    return [(0, start)] + [(-(-k * ramp // n), start + k * cfg.ramp_increment) for k in range(1, n + 1)]


def _first_true(pred: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """Smallest integer ``t`` in [lo, hi) with ``pred(t)``, for ``pred`` false then true on the range."""
    if lo >= hi or not pred(hi - 1):
        return None
    while lo < hi - 1:
        mid = (lo + hi - 1) // 2
        if pred(mid):
            hi = mid + 1
        else:
            lo = mid + 1
    return lo


def _doublings(
    b0: int, cap: int | None, first_token: Callable[[int, int], int | None], why: str
) -> list[tuple[int, int]]:
    """Phases of a doubling rule: ``first_token(batch, from_token)`` gives where ``batch`` doubles next."""
    points = [(0, b0)]
    batch, pos = b0, 0
    for _ in range(MAX_DOUBLINGS):
        if cap is not None and 2 * batch > cap:
            return points
        t = first_token(batch, pos)
        if t is None:
            return points
        batch, pos = 2 * batch, t
        points.append((t, batch))
    require(False, f"{S}: {why} doubles the batch more than {MAX_DOUBLINGS} times; set {S}.max_batch")
    return points  # pragma: no cover


def _seesaw_points(
    b0: int, cap: int | None, total: int, lr_factor: Callable[[int], float] | None, peak: int
) -> list[tuple[int, int]]:
    """Double at the first token (after the peak) where the LR factor is at or below 1/2, 1/4, ..."""
    require(lr_factor is not None, f"{S}.kind=seesaw needs the LR schedule (the trainer passes it)")
    assert lr_factor is not None
    top = lr_factor(peak)
    require(
        abs(top - 1.0) < 1e-9,
        f"{S}.kind=seesaw: the LR factor at its peak (token {peak}) is {top:g}, not 1; pass the schedule's "
        f"warmup_tokens as lr_peak_tokens",
    )
    b_start = b0

    def first_token(batch: int, pos: int) -> int | None:
        level = 2 * batch // b_start  # 2**k for the k-th doubling
        return _first_true(lambda t: lr_factor(t) <= 1.0 / level, max(pos, peak), total)

    return _doublings(b0, cap, first_token, "the LR schedule falls to 0, so seesaw")


def _cbs_points(cfg: BatchScheduleConfig, b0: int, cap: int | None, total: int) -> list[tuple[int, int]]:
    """Double wherever ``fraction * CBS(t) > 2 * batch``; CBS linear between the table's rows."""
    table = cfg.cbs_points()
    frac = cfg.cbs_fraction
    cbs = lambda t: float(_interp(table, t))
    require(
        frac * cbs(0) <= 2 * b0,
        f"{S}.cbs_table: at token 0 cbs_fraction*CBS = {frac * cbs(0):g} is already over 2 x "
        f"training.global_batch_size={b0}; start from a larger global batch",
    )
    # On each linear piece the rule is monotone in t; bounds of the pieces: the table's tokens.
    bounds = sorted({0, total, *(t for t, _ in table if 0 < t < total)})

    def first_token(batch: int, pos: int) -> int | None:
        grow = lambda t: frac * cbs(t) > 2 * batch
        for lo, hi in itertools.pairwise(bounds):
            lo = max(lo, pos)
            if lo >= hi:
                continue
            if grow(lo):
                return lo
            if cbs(hi) > cbs(lo):  # rising piece: false at lo, maybe true later
                t = _first_true(grow, lo, hi)
                if t is not None:
                    return t
        return None

    return _doublings(b0, cap, first_token, "the CBS table")


def _bopt_points(cfg: BatchScheduleConfig, b0: int, cap: int | None, total: int) -> list[tuple[int, int]]:
    """The largest ``b0 * 2**k`` not above ``B_opt(D)``: batch ``2B`` from the first D with B_opt(D) >= 2B."""
    assert cfg.bopt_coef is not None and cfg.bopt_exponent is not None
    coef, exp = cfg.bopt_coef, cfg.bopt_exponent

    def first_token(batch: int, pos: int) -> int | None:
        return _first_true(lambda d: coef * float(d) ** exp >= 2 * batch, pos, total)

    return _doublings(b0, cap, first_token, "the B_opt curve")


def _interp(table: tuple[tuple[int, float], ...], t: float) -> float:
    """Linear between rows, held at the first/last value outside the table."""
    xs = [r[0] for r in table]
    i = bisect.bisect_right(xs, t)
    if i == 0:
        return table[0][1]
    if i == len(table):
        return table[-1][1]
    (x0, y0), (x1, y1) = table[i - 1], table[i]
    return y0 + (y1 - y0) * (t - x0) / (x1 - x0)


# -- steps ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseSteps:
    """The steps one phase runs: ``steps`` steps of ``batch`` sequences, from ``first_step`` (0-based)."""

    batch: int
    first_step: int
    start_tokens: int  # consumed tokens when the phase's first step starts
    steps: int
    end_tokens: int  # consumed tokens after its last step

    @property
    def tokens_per_step(self) -> int:
        return (self.end_tokens - self.start_tokens) // self.steps


def simulate(schedule: BatchSchedule, train_tokens: int, seq_length: int) -> list[PhaseSteps]:
    """The steps of a run: each step's batch is ``batch_at(tokens consumed before it)``; the run ends at the
    first step after which ``train_tokens`` are consumed. Phases that get no step are left out.

    Per phase, arithmetically: a phase runs from the consumed count ``c`` it is entered at until ``c``
    reaches the next phase's start (or the end of the run) ``E``: ``ceil((E - c) / (batch * seq))`` steps.
    """
    require(train_tokens > 0 and seq_length > 0, f"{S}: simulate needs train_tokens and seq_length > 0")
    out: list[PhaseSteps] = []
    consumed = step = 0
    for i, phase in enumerate(schedule.phases):
        nxt = schedule.phases[i + 1].start_tokens if i + 1 < len(schedule.phases) else train_tokens
        end = min(nxt, train_tokens)
        if consumed >= end:
            continue
        per_step = phase.batch * seq_length
        n = -(-(end - consumed) // per_step)
        out.append(PhaseSteps(phase.batch, step, consumed, n, consumed + n * per_step))
        consumed += n * per_step
        step += n
    return out


def total_steps(plan: list[PhaseSteps]) -> int:
    """Optimizer steps of a simulated run."""
    return sum(p.steps for p in plan)


def tokens_after_step(plan: list[PhaseSteps], step: int) -> int:
    """Consumed tokens after ``step`` steps (0 <= step <= total_steps(plan))."""
    for p in plan:
        if step <= p.first_step + p.steps:
            return p.start_tokens + (step - p.first_step) * p.tokens_per_step
    require(False, f"{S}: step {step} is past the end of the run ({total_steps(plan)} steps)")
    return 0  # pragma: no cover
