"""Learning-rate schedules defined in tokens: warmup, stable, decay (WSD), cosine, linear, constant.

Every boundary is a token count, so the schedule stays right when a batch-size scheduler changes the
global batch mid-run: the LR depends only on how many tokens have been consumed, never on the step.
:meth:`TokenSchedule.factor` returns a multiplier in [0, 1] that the LR callback applies to each
parameter group's peak LR (the muP multipliers are folded into those peaks).

Convention: the LR of a step is ``factor(tokens consumed after that step)`` (``callbacks/lr_schedule.py``),
so the first step does not run at the warmup floor ``factor(0)`` and the last step of a decay sees its end
value; megatron-core's ``OptimizerParamScheduler`` evaluates one step earlier. As functions, the values
agree with megatron's scheduler for the shapes both have when ``max_lr=1``, ``min_lr=min_ratio``,
``init_lr=init_ratio`` and the boundaries are converted to steps (checked in tests/unit/test_schedule.py):

=================  ===========================================  ======================================
shape              coefficient c(r), r = progress in [0, 1]      megatron-core name
=================  ===========================================  ======================================
``linear``         1 - r                                         ``linear`` / WSD ``linear``
``cosine``         (1 + cos(pi r)) / 2                           ``cosine`` / WSD ``cosine``
``1-sqrt``         1 - sqrt(r)                                   WSD ``minus_sqrt``
``exponential``    2 * 0.5**r - 1                                WSD ``exponential``
``points``         piecewise-linear through user (r, ratio)      (none)
=================  ===========================================  ======================================

and ``factor = min_ratio + c(r) * (1 - min_ratio)`` during the decay (``points`` give the ratio directly).

Branching: a checkpoint taken in the stable phase at T0 tokens can start a decay of any length L with
``--set schedule.decay.start_tokens=T0 training.train_tokens=T0+L``. Up to T0 that run's factor equals the
straight run's, provided the warmup is given in tokens or steps (``warmup_frac`` scales with the run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from launcher.errors import RampError, require
from launcher.laws.units import format_count as _tok

if TYPE_CHECKING:  # the recipe module is plain dataclasses; imported for the type only
    from launcher.recipe import ScheduleConfig

#: WSD decay length when the recipe gives neither a start nor a length: the last 20% of the run.
#: The annealing-law paper (arXiv 2408.11029) and WSD practice put the best cooldown at 10-20%.
DEFAULT_DECAY_FRAC = 0.2

DecayShape = Literal["linear", "cosine", "1-sqrt", "exponential", "points"]
ScheduleStyle = Literal["wsd", "cosine", "linear", "constant"]
SHAPES: tuple[str, ...] = get_args(DecayShape)
STYLES: tuple[str, ...] = get_args(ScheduleStyle)


def decay_coefficient(shape: str, r: float) -> float:
    """Fraction of the (peak - min) gap left at decay progress ``r`` in [0, 1]; 1 at r=0, 0 at r=1."""
    r = min(max(r, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - r
    if shape == "cosine":
        return 0.5 * (math.cos(math.pi * r) + 1.0)
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(r)
    if shape == "exponential":
        return 2.0 * 0.5**r - 1.0
    raise RampError(f"decay shape {shape!r}: choose one of {', '.join(SHAPES[:-1])} (or points with a list)")


@dataclass(frozen=True)
class TokenSchedule:
    """A resolved schedule: all boundaries in tokens, ``0 <= warmup <= decay_start <= decay_end <= total``."""

    style: str  # wsd | cosine | linear | constant
    shape: str  # decay shape: linear | cosine | 1-sqrt | exponential | points | none (constant)
    warmup_tokens: int
    decay_start: int
    decay_end: int
    total_tokens: int
    init_ratio: float = 0.0  # factor at token 0 (warmup floor)
    min_ratio: float = 0.0  # factor at and after decay_end
    points: tuple[tuple[float, float], ...] = ()  # (fraction of decay, ratio to peak), shape=points only

    def __post_init__(self) -> None:
        require(self.style in STYLES, f"schedule.style={self.style!r}: choose one of {', '.join(STYLES)}")
        require(
            0 <= self.warmup_tokens <= self.decay_start <= self.decay_end <= self.total_tokens,
            f"schedule boundaries must satisfy 0 <= warmup ({self.warmup_tokens}) <= decay start "
            f"({self.decay_start}) <= decay end ({self.decay_end}) <= run ({self.total_tokens} tokens)",
        )
        require(0.0 <= self.init_ratio <= 1.0, f"schedule init ratio {self.init_ratio}: must be in [0, 1]")
        require(0.0 <= self.min_ratio <= 1.0, f"schedule min ratio {self.min_ratio}: must be in [0, 1]")
        if self.shape == "points":
            _check_points(self.points)
        elif self.shape != "none":
            decay_coefficient(self.shape, 0.0)  # validates the name

    def factor(self, tokens: float) -> float:
        """Multiplier on each group's peak LR after ``tokens`` tokens, in [0, 1]."""
        t = max(float(tokens), 0.0)
        if self.warmup_tokens > 0 and t <= self.warmup_tokens:
            return self.init_ratio + (1.0 - self.init_ratio) * t / self.warmup_tokens
        if self.shape == "none" or t <= self.decay_start:
            return 1.0
        if self.shape == "points":
            return _interp_points(self.points, _progress(t, self.decay_start, self.decay_end))
        if t >= self.decay_end:
            return self.min_ratio
        r = (t - self.decay_start) / (self.decay_end - self.decay_start)
        return self.min_ratio + decay_coefficient(self.shape, r) * (1.0 - self.min_ratio)

    @property
    def final_ratio(self) -> float:
        """The factor at the end of the run."""
        return self.factor(self.total_tokens)

    def describe(self) -> str:
        """One line for the start-up print."""
        warm = (
            f"warmup {self.init_ratio:g}->1 over {_tok(self.warmup_tokens)}"
            if self.warmup_tokens
            else "no warmup"
        )
        if self.shape == "none":
            body = f"{warm}, then constant"
        else:
            end = (
                f"({len(self.points)} points) to {self.final_ratio:g}"
                if self.shape == "points"
                else (f"to {self.min_ratio:g}")
            )
            stable = f", stable to {_tok(self.decay_start)}" if self.decay_start > self.warmup_tokens else ""
            span = f"{_tok(self.decay_start)}-{_tok(self.decay_end)}"
            body = f"{warm}{stable}, {self.shape} decay {end} over {span}"
        return f"{self.style} in tokens: {body}; run {_tok(self.total_tokens)}"

    def to_dict(self) -> dict[str, object]:
        """Plain values for the run's saved metadata."""
        return {
            "style": self.style,
            "shape": self.shape,
            "warmup_tokens": self.warmup_tokens,
            "decay_start": self.decay_start,
            "decay_end": self.decay_end,
            "total_tokens": self.total_tokens,
            "init_ratio": self.init_ratio,
            "min_ratio": self.min_ratio,
            "points": [list(p) for p in self.points],
        }


def resolve_schedule(
    cfg: ScheduleConfig, train_tokens: int, tokens_per_step: int, warmup_tokens: int
) -> TokenSchedule:
    """Turn the recipe's schedule (fractions, tokens or steps) into token boundaries.

    ``warmup_tokens`` is the value :meth:`Recipe.derive` already resolved. Steps are converted with
    ``tokens_per_step`` (the global batch at the start of the run). For ``wsd``:

    - start and length both given: decay covers [start, start + length];
    - only a start: the decay runs to the end of the run;
    - only a length: the decay ends at the end of the run;
    - neither: the last ``DEFAULT_DECAY_FRAC`` (20%) of the run, but never before the end of warmup.

    ``length_frac`` is a fraction of the whole run, like ``start_frac``. ``cosine`` and ``linear`` decay from
    the end of warmup to the end of the run and ignore ``schedule.decay``; ``constant`` stays at the peak.
    """
    require(train_tokens > 0, f"schedule: the run must have tokens (train_tokens={train_tokens})")
    require(tokens_per_step > 0, f"schedule: tokens_per_step={tokens_per_step} must be > 0")
    require(
        0 <= warmup_tokens <= train_tokens,
        f"schedule warmup ({warmup_tokens} tokens) is longer than the run ({train_tokens} tokens)",
    )
    total = int(train_tokens)
    warm = int(warmup_tokens)
    common = dict(warmup_tokens=warm, total_tokens=total, init_ratio=cfg.init_lr_ratio)
    if cfg.style == "constant":
        return TokenSchedule(style="constant", shape="none", decay_start=total, decay_end=total, **common)
    if cfg.style in ("cosine", "linear"):
        return TokenSchedule(
            style=cfg.style,
            shape=cfg.style,
            decay_start=warm,
            decay_end=total,
            min_ratio=cfg.min_lr_ratio,
            **common,
        )
    require(cfg.style == "wsd", f"schedule.style={cfg.style!r}: choose one of {', '.join(STYLES)}")

    d = cfg.decay
    start = _tokens(d.start_frac, d.start_tokens, d.start_steps, total, tokens_per_step)
    length = _tokens(d.length_frac, d.length_tokens, d.length_steps, total, tokens_per_step)
    if start is None and length is None:
        start = max(total - round(DEFAULT_DECAY_FRAC * total), warm)
        length = total - start
    elif start is None:
        start = total - length
    elif length is None:
        length = total - start
    end = start + length
    require(
        end <= total,
        f"schedule.decay ends at {end} tokens ({_tok(start)} + {_tok(length)}), after the end of the run "
        f"({total} tokens); shorten the decay or lengthen training.train_tokens",
    )
    require(
        start >= warm,
        f"schedule.decay starts at {start} tokens, before warmup ends ({warm} tokens); start it later or "
        f"shorten the warmup",
    )
    require(length > 0, f"schedule.decay has zero length (it starts at {start} tokens, the end of the run)")

    points: tuple[tuple[float, float], ...] = ()
    if d.shape == "points":
        points = _check_points(d.points)
    return TokenSchedule(
        style="wsd",
        shape=d.shape,
        decay_start=int(start),
        decay_end=int(end),
        min_ratio=points[-1][1] if points else cfg.min_lr_ratio,
        points=points,
        **common,
    )


def _tokens(
    frac: float | None, tokens: int | None, steps: int | None, total: int, tokens_per_step: int
) -> int | None:
    if frac is not None:
        return round(frac * total)
    if tokens is not None:
        require(tokens >= 0, f"schedule.decay: token counts must be >= 0 (got {tokens})")
        return int(tokens)
    if steps is not None:
        require(steps >= 0, f"schedule.decay: step counts must be >= 0 (got {steps})")
        return int(steps) * tokens_per_step
    return None


def _check_points(points: object) -> tuple[tuple[float, float], ...]:
    """Validate [[fraction, ratio], ...]: fractions strictly increasing in [0, 1], ratios in [0, 1]."""
    require(
        isinstance(points, (list, tuple)) and len(points) > 0,
        "schedule.decay.points: give a list of [fraction of decay, lr ratio] pairs",
    )
    out: list[tuple[float, float]] = []
    for p in points:
        require(
            isinstance(p, (list, tuple))
            and len(p) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p),
            f"schedule.decay.points: {p!r} is not a [fraction, ratio] pair of numbers",
        )
        f, r = float(p[0]), float(p[1])
        require(0.0 <= f <= 1.0, f"schedule.decay.points: fraction {f:g} must be in [0, 1]")
        require(0.0 <= r <= 1.0, f"schedule.decay.points: lr ratio {r:g} must be in [0, 1]")
        if out:
            prev = out[-1][0]
            require(f > prev, f"schedule.decay.points: fractions must increase ({prev:g} then {f:g})")
        out.append((f, r))
    return tuple(out)


def _progress(t: float, start: int, end: int) -> float:
    return min(max((t - start) / (end - start), 0.0), 1.0)


def _interp_points(points: tuple[tuple[float, float], ...], r: float) -> float:
    """Piecewise linear through (0, 1) (implied when the list does not start at 0) and the points;
    flat at the last ratio after the last point."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    if xs[0] > 0.0:
        xs.insert(0, 0.0)
        ys.insert(0, 1.0)
    if r <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if r <= xs[i]:
            w = (r - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return ys[-1]
