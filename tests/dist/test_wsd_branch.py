"""WSD's point: a stable-phase checkpoint branches into a decay of any length without retraining."""

from __future__ import annotations

import pytest
from ramp_run import run_ramp, step_checkpoint

from launcher import recipe
from launcher.laws.schedule import resolve_schedule

STEPS, BRANCH_AT = 8, 4
TOKENS_PER_STEP = 16 * 64  # TINY: global batch 16 x seq 64
WSD = ["schedule.style=wsd", "schedule.warmup_tokens=2048", "schedule.min_lr_ratio=0.1"]


def test_decay_branch_from_stable_checkpoint(tmp_path):
    # The main run: a long stable phase (decay in its last 20%), checkpointing in the stable phase.
    main = run_ramp(
        tmp_path / "main",
        [*WSD, f"training.train_steps={STEPS}", f"checkpoint.interval={BRANCH_AT}", "checkpoint.keep_last=5"],
    ).check()
    start = BRANCH_AT * TOKENS_PER_STEP
    branch_sets = [
        *WSD,
        f"training.train_steps={STEPS}",
        f"schedule.decay.start_tokens={start}",
        f"schedule.decay.length_tokens={(STEPS - BRANCH_AT) * TOKENS_PER_STEP}",
        "schedule.decay.shape=linear",
        f"checkpoint.load={step_checkpoint(main, BRANCH_AT)}",
        "checkpoint.branch=true",  # a new decay moves the schedule: an explicit branch, in its own run dir
    ]
    branch = run_ramp(tmp_path / "branch", branch_sets).check()

    # The branch's LR follows its own decay from the checkpoint on...
    r = recipe.load(
        "moe-tiny",
        [*branch_sets, "training.train_tokens=null", "model.seq_length=64", "training.global_batch_size=16"],
    )
    d = r.derive(1)
    schedule = resolve_schedule(r.schedule, d.train_tokens, d.tokens_per_step, d.warmup_tokens)
    peak = r.optimizer.lr
    lrs = branch.series("lr")
    assert sorted(lrs) == list(range(BRANCH_AT + 1, STEPS + 1))
    for step, lr in lrs.items():
        assert lr == pytest.approx(peak * schedule.factor((step - 1) * TOKENS_PER_STEP), rel=1e-9)
    assert lrs[STEPS] < lrs[BRANCH_AT + 1] < peak * 1.000001  # it decays, starting from the peak
    # ...while the main run was still stable there, and the first branch step (LR at the peak in both)
    # continues the main run exactly: the branch needed no retraining.
    assert main.series("lr")[BRANCH_AT + 1] == pytest.approx(peak)
    assert branch.series("loss")[BRANCH_AT + 1] == main.series("loss")[BRANCH_AT + 1]
