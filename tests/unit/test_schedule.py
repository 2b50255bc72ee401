"""The token-defined LR schedule: shapes, megatron agreement, batch-size invariance, decay branching."""

from __future__ import annotations

import math
from unittest.mock import MagicMock

import pytest

from launcher.errors import RampError
from launcher.laws.schedule import DEFAULT_DECAY_FRAC, TokenSchedule, decay_coefficient, resolve_schedule
from launcher.recipe import DecayConfig, ScheduleConfig, load

TOTAL = 10_000
TPS = 100  # tokens per step


def wsd(shape: str = "linear", min_ratio: float = 0.1, init: float = 0.0, **decay) -> TokenSchedule:
    decay.setdefault("start_tokens", 6_000)
    cfg = ScheduleConfig(
        style="wsd",
        warmup_tokens=1_000,
        init_lr_ratio=init,
        min_lr_ratio=min_ratio,
        decay=DecayConfig(shape=shape, **decay),
    )
    return resolve_schedule(cfg, TOTAL, TPS, 1_000)


# Decay coefficient c(r) at r = 0.25, 0.5, 0.75 for each closed-form shape.
EXPECTED = {
    "linear": (0.75, 0.5, 0.25),
    "cosine": (0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))),
    "1-sqrt": (0.5, 1 - math.sqrt(0.5), 1 - math.sqrt(0.75)),
    "exponential": (2 * 0.5**0.25 - 1, 2 * 0.5**0.5 - 1, 2 * 0.5**0.75 - 1),
}


@pytest.mark.parametrize("shape", sorted(EXPECTED))
def test_wsd_shape_values_at_boundaries_and_midpoints(shape: str) -> None:
    s = wsd(shape, min_ratio=0.1, init=0.2)
    assert (s.warmup_tokens, s.decay_start, s.decay_end, s.total_tokens) == (1_000, 6_000, 10_000, 10_000)
    assert s.factor(0) == pytest.approx(0.2)  # warmup floor
    assert s.factor(500) == pytest.approx(0.6)  # linear warmup midpoint
    assert s.factor(1_000) == pytest.approx(1.0)
    assert s.factor(3_000) == 1.0  # stable
    assert s.factor(6_000) == 1.0  # decay start
    for r, c in zip((0.25, 0.5, 0.75), EXPECTED[shape]):
        assert s.factor(6_000 + r * 4_000) == pytest.approx(0.1 + 0.9 * c, abs=1e-12)
    assert s.factor(10_000) == pytest.approx(0.1)  # decay end
    assert s.factor(12_345) == pytest.approx(0.1)  # past the end
    assert decay_coefficient(shape, 0.0) == pytest.approx(1.0)
    assert decay_coefficient(shape, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_points_shape_interpolates_from_the_peak() -> None:
    s = wsd("points", points=[[0.5, 0.5], [1.0, 0.0]])
    assert s.factor(6_000) == 1.0
    assert s.factor(7_000) == pytest.approx(0.75)  # halfway from the implied (0, 1) to (0.5, 0.5)
    assert s.factor(8_000) == pytest.approx(0.5)
    assert s.factor(9_000) == pytest.approx(0.25)
    assert s.factor(10_000) == pytest.approx(0.0)
    assert s.min_ratio == 0.0 and s.final_ratio == 0.0
    held = wsd("points", points=[[0.0, 0.8], [0.5, 0.3]])
    assert held.factor(6_001) == pytest.approx(0.8 - 0.5 * 1 / 2_000, rel=1e-3)
    assert held.factor(9_500) == pytest.approx(0.3)  # flat after the last point


def test_styles_cosine_linear_constant() -> None:
    for style, mid in (("cosine", 0.55), ("linear", 0.55)):
        s = resolve_schedule(
            ScheduleConfig(style=style, warmup_tokens=1_000, min_lr_ratio=0.1), TOTAL, TPS, 1_000
        )
        assert (s.decay_start, s.decay_end) == (1_000, TOTAL)
        assert s.factor(1_000) == pytest.approx(1.0)
        assert s.factor(5_500) == pytest.approx(mid)
        assert s.factor(TOTAL) == pytest.approx(0.1)
    c = resolve_schedule(ScheduleConfig(style="constant", warmup_tokens=1_000), TOTAL, TPS, 1_000)
    assert c.factor(500) == pytest.approx(0.5)
    assert c.factor(1_000) == c.factor(TOTAL) == c.factor(2 * TOTAL) == 1.0


def test_default_decay_is_the_last_fifth_and_partial_specs() -> None:
    cfg = ScheduleConfig(style="wsd", warmup_tokens=500)
    s = resolve_schedule(cfg, TOTAL, TPS, 500)
    assert DEFAULT_DECAY_FRAC == 0.2
    assert (s.decay_start, s.decay_end) == (8_000, TOTAL)
    only_len = resolve_schedule(ScheduleConfig(decay=DecayConfig(length_frac=0.1)), TOTAL, TPS, 0)
    assert (only_len.decay_start, only_len.decay_end) == (9_000, TOTAL)
    only_start = resolve_schedule(ScheduleConfig(decay=DecayConfig(start_steps=30)), TOTAL, TPS, 0)
    assert (only_start.decay_start, only_start.decay_end) == (3_000, TOTAL)
    both = resolve_schedule(ScheduleConfig(decay=DecayConfig(start_frac=0.5, length_steps=20)), TOTAL, TPS, 0)
    assert (both.decay_start, both.decay_end) == (5_000, 7_000)
    assert both.factor(8_000) == pytest.approx(0.1)  # min after an early decay end


def test_factor_stays_in_unit_interval_and_describe_is_one_line() -> None:
    for shape in (*EXPECTED, "points"):
        kw = {"points": [[0.3, 0.9], [1.0, 0.05]]} if shape == "points" else {}
        s = wsd(shape, **kw)
        vals = [s.factor(t) for t in range(0, 12_000, 37)]
        assert all(0.0 <= v <= 1.0 for v in vals)
        text = s.describe()
        assert "\n" not in text and shape in text and "10K" in text


# ----------------------------------------------------------------------------------------------------------
# Agreement with megatron-core's OptimizerParamScheduler (the reference for the shape formulas).


def _megatron(
    style: str,
    warmup: int,
    decay_end: int,
    wsd_decay: int | None,
    shape: str | None,
    init: float,
    min_r: float,
):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = MagicMock()
    opt.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]
    return OptimizerParamScheduler(
        opt,
        init_lr=init,
        max_lr=1.0,
        min_lr=min_r,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay_end,
        lr_decay_style=style,
        start_wd=0.0,
        end_wd=0.0,
        wd_incr_steps=decay_end,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_decay,
        lr_wsd_decay_style=shape,
    )


MEGATRON_WSD = {"linear": "linear", "cosine": "cosine", "1-sqrt": "minus_sqrt", "exponential": "exponential"}


@pytest.mark.parametrize("shape", sorted(MEGATRON_WSD))
@pytest.mark.parametrize("warmup_steps", [0, 7])
def test_wsd_agrees_with_megatron_scheduler(shape: str, warmup_steps: int) -> None:
    steps, start, length = 100, 60, 30  # decay ends 10 steps before the run does
    cfg = ScheduleConfig(
        style="wsd",
        warmup_steps=warmup_steps,
        init_lr_ratio=0.05,
        min_lr_ratio=0.1,
        decay=DecayConfig(shape=shape, start_steps=start, length_steps=length),
    )
    s = resolve_schedule(cfg, steps * TPS, TPS, warmup_steps * TPS)
    ref = _megatron("WSD", warmup_steps, start + length, length, MEGATRON_WSD[shape], 0.05, 0.1)
    for k in range(steps + 1):
        ref.num_steps = k
        assert s.factor(k * TPS) == pytest.approx(ref.get_lr({}), abs=1e-12), (shape, k)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_styles_agree_with_megatron_scheduler(style: str) -> None:
    steps, warm = 80, 8
    cfg = ScheduleConfig(style=style, warmup_steps=warm, init_lr_ratio=0.0, min_lr_ratio=0.02)
    s = resolve_schedule(cfg, steps * TPS, TPS, warm * TPS)
    ref = _megatron(style, warm, steps, None, None, 0.0, 0.02)
    for k in range(steps + 3):
        ref.num_steps = k
        assert s.factor(k * TPS) == pytest.approx(ref.get_lr({}), abs=1e-12), (style, k)


# ----------------------------------------------------------------------------------------------------------
# Defined in tokens: a batch-size change leaves the schedule intact; a decay branches off a stable point.


def test_same_factor_at_same_tokens_whatever_the_batch() -> None:
    cfg = ScheduleConfig(
        style="wsd",
        warmup_tokens=4_096 * 5,
        decay=DecayConfig(shape="1-sqrt", start_frac=0.6, length_tokens=4_096 * 30),
    )
    total = 4_096 * 100
    a = resolve_schedule(cfg, total, 4_096, 4_096 * 5)
    b = resolve_schedule(cfg, total, 4_096 * 4, 4_096 * 5)
    # Boundaries in tokens whatever the batch: warmup 20,480; decay from 60% of 409,600 = 245,760 over
    # 122,880 tokens to 368,640 (by hand).
    for s in (a, b):
        assert (s.warmup_tokens, s.decay_start, s.decay_end) == (20_480, 245_760, 368_640)

    # A batch ramp (1x, 2x, 4x tokens per step) visits token counts the fixed batch never sees between its
    # steps; the factor at each is the WSD shape written out independently here (init 0, min 0.1).
    def by_hand(t: int) -> float:
        if t <= 20_480:
            return t / 20_480
        if t <= 245_760:
            return 1.0
        return 0.1 + 0.9 * (1.0 - math.sqrt(min((t - 245_760) / 122_880, 1.0)))

    consumed, seen = 0, []
    for per_step in [4_096] * 20 + [8_192] * 20 + [16_384] * 10:
        seen.append(consumed)
        consumed += per_step
    assert consumed == 409_600
    for s in (a, b):
        for t in seen:
            assert s.factor(t) == pytest.approx(by_hand(t), abs=1e-12), t
    # Steps, by contrast, are converted with the tokens per step given at resolve time.
    s = ScheduleConfig(decay=DecayConfig(start_steps=10))
    assert resolve_schedule(s, total, 4_096, 0).decay_start == 40_960
    assert resolve_schedule(s, total, 8_192, 0).decay_start == 81_920


def _plan(overrides: list[str]) -> TokenSchedule:
    recipe = {
        "model": {"seq_length": 256},
        "training": {"global_batch_size": 16, "micro_batch_size": 8, "train_tokens": 4_096 * 100},
        "schedule": {"style": "wsd", "warmup_tokens": 4_096 * 5, "min_lr_ratio": 0.0},
    }
    r = load(recipe, overrides)
    d = r.derive(world_size=1)
    return resolve_schedule(r.schedule, d.train_tokens, d.tokens_per_step, d.warmup_tokens)


def test_branching_a_decay_from_a_stable_checkpoint_matches_the_straight_run() -> None:
    straight = _plan([])
    assert straight.decay_start == 4_096 * 80  # default: last 20%
    branch_at = 4_096 * 40  # a stable-phase checkpoint
    for length in (4_096 * 3, 4_096 * 15, 4_096 * 60):
        branch = _plan(
            [f"schedule.decay.start_tokens={branch_at}", f"training.train_tokens={branch_at + length}"]
        )
        for t in range(0, branch_at + 1, 1_024):
            assert branch.factor(t) == straight.factor(t)
        assert branch.factor(branch_at + length / 2) < 1.0
        assert branch.factor(branch_at + length) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Bad input: one-line errors.


@pytest.mark.parametrize(
    "decay, match",
    [
        (DecayConfig(start_tokens=9_000, length_tokens=2_000), "after the end of the run"),
        (DecayConfig(start_frac=0.9, length_frac=0.2), "after the end of the run"),
        (DecayConfig(start_tokens=500), "before warmup ends"),
        (DecayConfig(length_tokens=9_500), "before warmup ends"),
        (DecayConfig(start_frac=1.0), "zero length"),
        (DecayConfig(shape="points", points=[[0.5, 0.5], [0.4, 0.2]]), "must increase"),
        (DecayConfig(shape="points", points=[[0.5, 1.5]]), r"lr ratio 1.5 must be in \[0, 1\]"),
        (DecayConfig(shape="points", points=[[1.2, 0.5]]), r"fraction 1.2 must be in \[0, 1\]"),
        (DecayConfig(shape="points", points=[[0.5]]), "pair"),
    ],
)
def test_bad_schedules_raise_one_line_errors(decay: DecayConfig, match: str) -> None:
    cfg = ScheduleConfig(style="wsd", warmup_tokens=1_000, decay=decay)
    with pytest.raises(RampError, match=match) as e:
        resolve_schedule(cfg, TOTAL, TPS, 1_000)
    assert "\n" not in str(e.value)


def test_warmup_longer_than_the_run_is_refused() -> None:
    with pytest.raises(RampError, match="longer than the run"):
        resolve_schedule(ScheduleConfig(style="constant"), TOTAL, TPS, TOTAL + 1)
