"""Batch-size schedules: exact token accounting across phases and resumes, and in-job layout switches.

Expected batches, token counts and LRs are written out by hand from the schedule. The layout switch is
checked by equivalence: a run that switches layout in the same processes continues exactly as a fresh job
that loads the switch's checkpoint in the new layout.
"""

from __future__ import annotations

import math

import pytest
from ramp_run import run_ramp, step_checkpoint

pytestmark = pytest.mark.dist

SEQ = 64  # TINY's model.seq_length
LR = 2e-3  # moe-tiny's optimizer.lr; TINY's schedule is constant with no warmup

# 4 sequences for 3 steps (768 tokens), 8 for 3 steps (to 2,304), 16 for 2 steps (to 4,352).
RAMP = [
    "batch_schedule.kind=steps",
    "batch_schedule.steps=[[768, 8], [2304, 16]]",
    "training.global_batch_size=4",
    "training.train_tokens=4352",
    "training.eval_samples=16",
]
BATCHES = [4, 4, 4, 8, 8, 8, 16, 16]


def test_step_schedule_accounts_tokens_and_resumes_mid_ramp(tmp_path):
    straight = run_ramp(
        tmp_path / "straight", [*RAMP, "checkpoint.interval=4", "checkpoint.keep_last=5"], nproc=2
    )
    straight.check()
    steps = sorted(straight.series("loss"))
    assert steps == list(range(1, len(BATCHES) + 1))
    assert [straight.series("global_batch")[s] for s in steps] == BATCHES
    tokens = [SEQ * sum(BATCHES[:s]) for s in steps]
    assert [straight.series("tokens")[s] for s in steps] == tokens
    # lr_rule sqrt: the peak times sqrt(B / 4)
    for s, b in zip(steps, BATCHES, strict=True):
        assert straight.series("lr")[s] == pytest.approx(LR * math.sqrt(b / 4), rel=1e-9)

    # Resume from the checkpoint after step 4 (inside the 8-sequence phase): the same batches and losses.
    resumed = run_ramp(
        tmp_path / "resumed", [*RAMP, f"checkpoint.load={step_checkpoint(straight, 4)}"], nproc=2
    ).check()
    assert sorted(resumed.series("loss")) == list(range(5, len(BATCHES) + 1))
    for s in range(5, len(BATCHES) + 1):
        assert resumed.series("global_batch")[s] == straight.series("global_batch")[s]
        assert resumed.series("tokens")[s] == straight.series("tokens")[s]
        assert resumed.series("loss")[s] == straight.series("loss")[s]


# 2 sequences at micro-batch 1 leave 4 ranks no room for DP4: TP2 x DP2; then DP4; then PP2 x DP2.
REBALANCE = [
    "batch_schedule.kind=steps",
    "batch_schedule.steps=[[256, 4], [768, 8]]",
    "batch_schedule.layouts={2: {tp: 2}, 4: {}, 8: {pp: 2}}",
    "training.global_batch_size=2",
    "training.micro_batch_size=1",
    "training.train_tokens=1792",
    "training.eval_samples=8",
    "checkpoint.keep_last=10",
]


def test_rebalance_switches_layout_in_job_like_a_fresh_job(tmp_path):
    run = run_ramp(tmp_path / "switching", REBALANCE, nproc=4).check()
    steps = sorted(run.series("loss"))
    assert steps == [1, 2, 3, 4, 5, 6]  # 2 x 2 seqs, 2 x 4, 2 x 8
    layouts = run.series("layout")
    assert [layouts[s] for s in steps] == [
        "tp2 pp1 ep1 dp2 mbs1",
        "tp2 pp1 ep1 dp2 mbs1",
        "tp1 pp1 ep1 dp4 mbs1",
        "tp1 pp1 ep1 dp4 mbs1",
        "tp1 pp2 ep1 dp2 mbs1",
        "tp1 pp2 ep1 dp2 mbs1",
    ]
    switched = {s for s in steps if "switch_time_s" in run.train[s - 1]}
    assert switched == {3, 5}
    for s in switched:
        rec = run.train[s - 1]
        parts = sum(rec[f"switch_{k}_s"] for k in ("save", "teardown", "rebuild", "load"))
        assert rec["switch_time_s"] == pytest.approx(parts)
    # Each switch left a checkpoint of the step before it; a fresh job loading it (in the layout its
    # position calls for) trains the same numbers, and holds as many process groups as the switched job.
    for at in (2, 4):
        fresh = run_ramp(
            tmp_path / f"fresh-{at}", [*REBALANCE, f"checkpoint.load={step_checkpoint(run, at)}"], nproc=4
        ).check()
        assert sorted(fresh.series("loss")) == list(range(at + 1, 7))
        for s in range(at + 1, 7):
            assert fresh.series("layout")[s] == layouts[s]
            assert fresh.series("loss")[s] == run.series("loss")[s], f"step {s}"
            assert fresh.series("grad_norm")[s] == run.series("grad_norm")[s], f"step {s}"
        groups = {r["step"]: r["process_groups"] for r in run.train if "process_groups" in r}
        fresh_groups = {r["step"]: r["process_groups"] for r in fresh.train if "process_groups" in r}
        assert fresh_groups[at + 1] == groups[at + 1]
