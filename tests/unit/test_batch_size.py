"""Batch-size schedules: phases from each kind against hand calculations (and megatron's own ramp
calculator), the per-phase step simulation against a step-by-step loop, and every bad input refused."""

from __future__ import annotations

import math
import random

import pytest

from launcher import recipe
from launcher.errors import RampError
from launcher.laws.batch_size import (
    BatchPhase,
    BatchSchedule,
    BatchScheduleConfig,
    PhaseSteps,
    cbs_decision,
    deciding_multipliers,
    grow_at,
    resolve_batch_schedule,
    simulate,
    tokens_after_step,
    total_steps,
)
from launcher.laws.schedule import TokenSchedule


def phases(s: BatchSchedule) -> list[tuple[int, int]]:
    return [(p.start_tokens, p.batch) for p in s.phases]


def resolve(b0: int = 8, total: int = 10_000, seq: int = 10, factor=None, peak: int = 0, **cfg):
    return resolve_batch_schedule(BatchScheduleConfig(**cfg), b0, total, seq, factor, lr_peak_tokens=peak)


def test_megatron_string_and_list_give_the_same_phases():
    s = resolve(total=2_000_000, kind="steps", steps="0:8 600K:16 1.2M:32")
    assert phases(s) == [(0, 8), (600_000, 16), (1_200_000, 32)]
    assert phases(resolve(total=2_000_000, kind="steps", steps=[[0, 8], [600_000, 16], [1_200_000, 32]])) == (
        phases(s)
    )
    # A list that does not start at 0 starts at the recipe's global batch.
    assert phases(resolve(total=2_000_000, kind="steps", steps=[[600_000, 16]])) == [(0, 8), (600_000, 16)]
    # Phases at or after the end of the run never run; equal consecutive batches merge.
    assert phases(resolve(total=1_000_000, kind="steps", steps="0:8 500K:8 600K:16 1.2M:32")) == [
        (0, 8),
        (600_000, 16),
    ]


def test_recipe_section_loads_with_suffixes():
    r = recipe.load("moe-tiny", ["batch_schedule.kind=steps", "batch_schedule.steps=[[0, 16], [1.2M, 32]]"])
    assert r.batch_schedule.step_points() == ((0, 16), (1_200_000, 32))
    r = recipe.load("moe-tiny", ["batch_schedule.kind=steps", "batch_schedule.steps=0:16 0.3M:32"])
    assert r.batch_schedule.step_points() == ((0, 16), (300_000, 32))  # exact, not 299999


def test_ramp_hand_case():
    # start 4, +4 up to 16: 3 increments over 3000 tokens, one every 1000 tokens.
    s = resolve(b0=4, kind="ramp", ramp_increment=4, max_batch=16, ramp_tokens=3000)
    assert phases(s) == [(0, 4), (1000, 8), (2000, 12), (3000, 16)]
    # 3 increments over 1000 tokens: at ceil(1000/3)=334, ceil(2000/3)=667 and 1000.
    s = resolve(b0=4, kind="ramp", ramp_start=4, ramp_increment=4, max_batch=16, ramp_tokens=1000)
    assert phases(s) == [(0, 4), (334, 8), (667, 12), (1000, 16)]


def test_ramp_matches_megatrons_calculator():
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    seq = 7
    calc = RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size=16,
        micro_batch_size=1,
        data_parallel_size=1,
        decrease_batch_size_if_needed=False,
        rank=0,
        start_global_batch_size=4,
        batch_size_increment=4,
        ramup_samples=300,
    )
    s = resolve(b0=4, seq=seq, kind="ramp", ramp_increment=4, max_batch=16, ramp_tokens=300 * seq)
    for samples in range(0, 401):
        calc.update(samples, consistency_check=False)
        assert s.batch_at(samples * seq) == calc.get_current_global_batch_size(), samples


def test_seesaw_on_a_hand_wsd_schedule():
    # Linear decay 1 -> 0 over tokens 1000..2000: factor 1/2 at 1500, 1/4 at 1750, 1/8 at 1875.
    lr = TokenSchedule(
        style="wsd", shape="linear", warmup_tokens=100, decay_start=1000, decay_end=2000, total_tokens=2000
    )
    s = resolve(total=2000, factor=lr.factor, peak=100, kind="seesaw", max_batch=64)
    assert phases(s) == [(0, 8), (1500, 16), (1750, 32), (1875, 64)]
    # The LR of each phase is the schedule's factor times sqrt(2)**k: every 2x cut became a sqrt(2) cut.
    assert lr.factor(1875) * s.lr_scale(s.batch_at(1875)) == pytest.approx(1 / 8 * math.sqrt(8))
    # Uncapped it continues at 1/16 (token 1937.5 -> 1938) and stops before the end of the run.
    s = resolve(total=2000, factor=lr.factor, peak=100, kind="seesaw")
    assert phases(s)[:5] == [(0, 8), (1500, 16), (1750, 32), (1875, 64), (1938, 128)]


def test_cbs_doubling_on_a_hand_table():
    # CBS 8 until token 100, then linear to 72 at 300: CBS(t) = 8 + 64 (t - 100) / 200.
    table = [[0, 8], [100, 8], [300, 72]]
    # > 16 from t > 125, > 32 from t > 175, > 64 from t > 275; never > 128.
    assert phases(resolve(total=1000, kind="cbs", cbs_table=table)) == [
        (0, 8),
        (126, 16),
        (176, 32),
        (276, 64),
    ]
    # Half the CBS: 0.5 CBS > 16 from t > 175, > 32 from t > 275.
    s = resolve(total=1000, kind="cbs", cbs_table=table, cbs_fraction=0.5)
    assert phases(s) == [(0, 8), (176, 16), (276, 32)]
    assert phases(resolve(total=1000, kind="cbs", cbs_table=table, max_batch=16)) == [(0, 8), (126, 16)]
    # Twice the CBS (grow while CBS > batch): > 8 from t > 100, > 16 from 125, > 32 from 175, > 64 from 275.
    # Between the table's powers of 2 the batch passes the CBS: at t = 101 it is 8.32 and the batch 16.
    s = resolve(total=1000, kind="cbs", cbs_table=table, cbs_fraction=2.0)
    assert phases(s) == [(0, 8), (101, 16), (126, 32), (176, 64), (276, 128)]
    # A CBS that jumps past 4x the batch doubles twice at the same token.
    s = resolve(total=1000, kind="cbs", cbs_table=[[0, 8], [10, 8], [11, 80]])
    assert phases(s) == [(0, 8), (11, 64)]


def test_bopt_hand_case():
    # B_opt(D) = sqrt(D): 16 from D=256, 32 from 1024, 64 from 4096; 128 needs 16384 > the run.
    s = resolve(total=10_000, kind="bopt", bopt_coef=1.0, bopt_exponent=0.5)
    assert phases(s) == [(0, 8), (256, 16), (1024, 32), (4096, 64)]
    assert phases(resolve(total=10_000, kind="bopt", bopt_coef=1.0, bopt_exponent=0.5, max_batch=32))[-1] == (
        1024,
        32,
    )


def test_lr_scale_rules():
    for rule, at32 in (("none", 1.0), ("sqrt", 2.0), ("linear", 4.0)):
        s = resolve(kind="steps", steps="0:8 100:32", lr_rule=rule)
        assert s.lr_scale(8) == 1.0 and s.lr_scale(32) == pytest.approx(at32)
    assert resolve().is_constant and not resolve(kind="steps", steps="0:8 100:32").is_constant
    assert "8 -> 32 at 100" in resolve(kind="steps", steps="0:8 100:32").describe()


def test_simulate_hand_totals():
    s = BatchSchedule((BatchPhase(0, 8), BatchPhase(600, 16), BatchPhase(1200, 32)))
    plan = simulate(s, 2000, 10)
    # 8 x 80 = 640 >= 600; 4 x 160 takes 640 -> 1280 >= 1200; 3 x 320 takes 1280 -> 2240 >= 2000.
    assert plan == [
        PhaseSteps(8, 0, 0, 8, 640),
        PhaseSteps(16, 8, 640, 4, 1280),
        PhaseSteps(32, 12, 1280, 3, 2240),
    ]
    assert (
        total_steps(plan) == 15 and tokens_after_step(plan, 10) == 960 and tokens_after_step(plan, 15) == 2240
    )
    # A phase the previous one steps over gets no step and is left out.
    plan = simulate(BatchSchedule((BatchPhase(0, 8), BatchPhase(600, 16), BatchPhase(620, 32))), 2000, 10)
    assert [(p.batch, p.steps) for p in plan] == [(8, 8), (32, 5)]


def step_by_step(s: BatchSchedule, total: int, seq: int) -> list[tuple[int, int]]:
    consumed, batches = 0, []
    while consumed < total:
        b = s.batch_at(consumed)
        batches.append((b, consumed))
        consumed += b * seq
    return batches


def test_simulate_equals_a_step_by_step_loop():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 5)
        starts = sorted(rng.sample(range(1, 3000), n - 1))
        batches = sorted(rng.sample(range(1, 40), n))
        s = BatchSchedule(tuple(BatchPhase(t, b) for t, b in zip([0, *starts], batches, strict=True)))
        total, seq = rng.randint(1, 4000), rng.randint(1, 9)
        loop = step_by_step(s, total, seq)
        flat = [
            (p.batch, p.start_tokens + i * p.batch * seq)
            for p in simulate(s, total, seq)
            for i in range(p.steps)
        ]
        assert flat == loop
        assert tokens_after_step(simulate(s, total, seq), len(loop)) == loop[-1][1] + loop[-1][0] * seq


LINEAR = TokenSchedule(
    style="wsd", shape="linear", warmup_tokens=100, decay_start=500, decay_end=900, total_tokens=1000
)

# (config fields, resolve kwargs, words of the one-line error)
BAD = [
    (
        dict(kind="steps", steps="0:8 1.2M:16 600K:32"),
        {},
        ["batch_schedule.steps: tokens must increase (600K after 1.2M)"],
    ),
    (dict(kind="steps", steps="0:8 600K:32 1.2M:16"), {}, ["batch may not decrease (32, then 16 at 1.2M)"]),
    (dict(kind="steps", steps="0:8 600K"), {}, ["'600K' is not TOKENS:BATCH"]),
    (dict(kind="steps", steps=[[0, 8], [100, 0]]), {}, ["batch 0 must be an integer > 0"]),
    (dict(kind="steps", steps=[[0, 8], [-5, 16]]), {}, ["tokens -5 must be an integer >= 0"]),
    (dict(kind="steps", steps=[]), {}, ["batch_schedule.steps is empty"]),
    (dict(kind="steps"), {}, ["kind=steps needs batch_schedule.steps"]),
    (
        dict(kind="steps", steps="0:16 100:32"),
        dict(b0=8),
        ["starts at token 0 with batch 16", "global_batch_size=8"],
    ),
    (
        dict(kind="steps", steps="100:4"),
        dict(b0=8),
        ["may not decrease (training.global_batch_size=8, then 4"],
    ),
    (dict(kind="stepz"), {}, ["batch_schedule.kind='stepz': choose one of constant, steps, ramp"]),
    (dict(lr_rule="cubic"), {}, ["batch_schedule.lr_rule='cubic': choose one of none, sqrt, linear"]),
    (
        dict(kind="steps", steps="0:8", ramp_tokens=5),
        {},
        ["ramp_tokens is set but batch_schedule.kind=steps"],
    ),
    (dict(cbs_fraction=0.5), {}, ["cbs_fraction is set but batch_schedule.kind=constant"]),
    (dict(kind="ramp", ramp_increment=4, max_batch=16), {}, ["kind=ramp needs batch_schedule.ramp_tokens"]),
    (
        dict(kind="ramp", ramp_increment=3, max_batch=16, ramp_tokens=10),
        {},
        ["ramp_increment=3 does not divide"],
    ),
    (dict(kind="ramp", ramp_start=4, ramp_increment=4, max_batch=16, ramp_tokens=10), {}, ["ramp_start=4"]),
    (dict(kind="ramp", ramp_increment=4, max_batch=8, ramp_tokens=10), {}, ["max_batch=8 must be larger"]),
    (dict(kind="ramp", ramp_increment=4, max_batch=16, ramp_tokens=0), {}, ["ramp_tokens=0: must be > 0"]),
    (
        dict(kind="seesaw", max_batch=48),
        dict(factor=LINEAR.factor, peak=100),
        ["max_batch=48 is not", "power of 2"],
    ),
    (dict(kind="seesaw", lr_rule="linear"), {}, ["lr_rule=linear: seesaw", "lr_rule=sqrt"]),
    (dict(kind="seesaw"), {}, ["kind=seesaw needs the LR schedule"]),
    (
        dict(kind="seesaw"),
        dict(factor=LINEAR.factor),
        ["factor at its peak (token 0) is 0", "lr_peak_tokens"],
    ),
    (dict(kind="cbs"), {}, ["kind=cbs needs batch_schedule.cbs_table"]),
    (dict(kind="cbs", cbs_table=[[0, 8], [0, 9]]), {}, ["cbs_table: tokens must increase"]),
    (dict(kind="cbs", cbs_table=[[0, -1]]), {}, ["cbs -1 must be a number > 0"]),
    (dict(kind="cbs", cbs_table=[[0, 8]], cbs_fraction=2.5), {}, ["cbs_fraction=2.5: must be in (0, 2]"]),
    (dict(kind="cbs", cbs_table=[[0, 40]]), dict(b0=8), ["at token 0 cbs_fraction*CBS = 40", "over 2 x"]),
    (dict(kind="bopt", bopt_coef=1.0), {}, ["kind=bopt needs batch_schedule.bopt_exponent"]),
    (dict(kind="bopt", bopt_coef=1.0, bopt_exponent=0.0), {}, ["bopt_exponent=0.0: must be > 0"]),
    (dict(layouts="autp"), {}, ["batch_schedule.layouts='autp': choose one of fixed, auto"]),
    (dict(layouts={8: {"tpp": 2}}), {}, ["unknown key batch_schedule.layouts.8.tpp; did you mean 'tp'?"]),
    (dict(layouts={8: {"tp": 0}}), {}, ["batch_schedule.layouts.8.tp=0: must be a positive integer"]),
    (dict(kind="steps", steps="0:8 100:16", layouts={8: {"tp": 2}}), {}, ["names no layout for batch 16"]),
]


@pytest.mark.parametrize(("cfg", "kw", "words"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_schedules_are_refused_with_one_line(cfg, kw, words):
    kw = dict(kw)
    b0 = kw.pop("b0", 8)
    with pytest.raises(RampError) as e:
        resolve(b0=b0, total=1000, **kw, **cfg)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_seesaw_without_a_cap_on_a_schedule_that_reaches_zero_is_refused():
    lr = TokenSchedule(
        style="wsd", shape="linear", warmup_tokens=0, decay_start=200, decay_end=500, total_tokens=1000
    )
    with pytest.raises(RampError, match=r"more than 40 times; set batch_schedule\.max_batch"):
        resolve(total=1000, factor=lr.factor, kind="seesaw")


def test_recipe_refuses_a_bad_section_with_the_key():
    with pytest.raises(RampError, match=r"unknown recipe key 'batch_schedule.max_bach'; did you mean"):
        recipe.load("moe-tiny", ["batch_schedule.max_bach=4"])
    with pytest.raises(RampError, match=r"tokens must increase \(600K after 1.2M\)"):
        recipe.load("moe-tiny", ["batch_schedule.kind=steps", "batch_schedule.steps=0:16 1.2M:32 600K:64"])


def test_cbs_decision_is_the_doubling_rule_by_hand():
    # double while fraction * CBS > 2 * batch
    assert cbs_decision(16, 64) == 32  # 64 > 32: 32; 64 > 64 no
    assert cbs_decision(16, 65) == 64  # 65 > 32, 65 > 64: 64; 65 > 128 no
    assert cbs_decision(16, 32) == 16  # a CBS of 2B does not grow (not strictly over)
    assert cbs_decision(16, 1000, cap=64) == 64
    assert cbs_decision(16, 256, fraction=0.25) == 32  # 64 > 32; 64 > 64 no
    assert cbs_decision(64, 8) == 64  # never shrinks
    # fraction 2: while the CBS is over the batch (up to a CBS of batch x 2**n)
    assert cbs_decision(16, 32, fraction=2.0) == 32  # 64 > 32: 32; 64 > 64 no
    assert cbs_decision(8, 32, fraction=2.0) == 32  # 64 > 16, 64 > 32: 32; 64 > 64 no
    assert cbs_decision(16, 16, fraction=2.0) == 16  # 32 > 32 no


def test_deciding_multipliers_by_hand():
    ks = [1, 2, 4, 8, 16]
    # fraction 1: growing needs CBS > 2B, so k = 4 (32 > 16: batch 16), then k = 8 (64 > 32: 32, the cap)
    assert deciding_multipliers(ks, 8, 1.0, 32) == [1, 4, 8]
    assert deciding_multipliers(ks, 8, 1.0, None) == [1, 4, 8, 16]  # 128 > 64: a third doubling
    # half the CBS: a doubling needs 0.5 x 8k > 16, k = 8; a second 0.5 x 8k > 32, k = 16
    assert deciding_multipliers(ks, 8, 0.5, 64) == [1, 8, 16]
    # up to the CBS: k = 2 (2 x 16 > 16: batch 16), k = 4 (2 x 32 > 32: 32, the cap)
    assert deciding_multipliers(ks, 8, 2.0, 32) == [1, 2, 4]
    assert deciding_multipliers(ks, 16, 2.0, 32) == [1, 2]
    assert deciding_multipliers(ks, 16, 1.0, 32) == [1, 4]  # one doubling left before the cap
    assert deciding_multipliers(ks, 32, 1.0, 32) == [1]  # at the cap: nothing to decide


def test_grow_at_keeps_what_ran_and_replaces_the_plan_after():
    s = resolve(total=1000, kind="steps", steps=[[0, 8], [100, 16], [500, 32]])
    assert phases(grow_at(s, 300, 64)) == [(0, 8), (100, 16), (300, 64)]  # 500:32 was only planned
    assert phases(grow_at(s, 300, 16)) == [(0, 8), (100, 16)]  # the same batch: no new phase
    with pytest.raises(RampError, match="may only grow"):
        grow_at(s, 300, 8)


def test_probes_source_plans_one_phase_and_the_batches_it_may_reach():
    s = resolve(total=1000, kind="cbs", cbs_source="probes", max_batch=64)
    assert phases(s) == [(0, 8)] and s.reachable == (16, 32, 64) and s.all_batches == (8, 16, 32, 64)
    with pytest.raises(RampError, match=r"needs batch_schedule\.max_batch"):
        BatchScheduleConfig(kind="cbs", cbs_source="probes")
    with pytest.raises(RampError, match="cbs_table is set but"):
        BatchScheduleConfig(kind="cbs", cbs_source="probes", max_batch=64, cbs_table=[[0, 8]])
