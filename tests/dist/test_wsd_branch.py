"""WSD's point: a stable-phase checkpoint branches into a decay of any length without retraining."""

from __future__ import annotations

import math

import pytest
from ramp_run import run_ramp, step_checkpoint

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

    # The branch's LR follows its own decay from the checkpoint on. A step's LR is the schedule at the tokens
    # consumed after it: steps 5..8 end at 5, 6, 7, 8 x 1024 tokens, i.e. 1/4, 1/2, 3/4, 1 of the linear
    # decay from 4096 over 4096 tokens, so the factor is 0.1 + 0.9 x (1 - r): by hand,
    peak = 2.0e-3  # moe-tiny's optimizer.lr
    want = {5: 0.775, 6: 0.55, 7: 0.325, 8: 0.1}
    lrs = branch.series("lr")
    assert sorted(lrs) == list(range(BRANCH_AT + 1, STEPS + 1))
    for step, lr in lrs.items():
        assert lr == pytest.approx(peak * want[step], rel=1e-9), f"step {step}"
    # ...while the main run was still stable there (its decay is the last 20% of 8192 tokens, from 6553.6
    # rounded to 6554): steps 5 and 6 at the peak, step 7 (7168 tokens: r = 614/1638 of its 1-sqrt decay)
    # below it.
    main_lrs = main.series("lr")
    assert main_lrs[5] == main_lrs[6] == pytest.approx(peak, rel=1e-12)
    assert main_lrs[7] == pytest.approx(peak * (0.1 + 0.9 * (1 - math.sqrt(614 / 1638))), rel=1e-9)
    # The first branch step computes its loss from the same weights as the main run's step 5 (the
    # checkpoint): the branch needed no retraining.
    assert branch.series("loss")[BRANCH_AT + 1] == main.series("loss")[BRANCH_AT + 1]
