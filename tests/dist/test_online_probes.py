"""Online CBS probes (``probes:`` grid + ``batch_schedule: {kind: cbs, cbs_source: probes}``) on 2 gloo ranks.

The run forks at 4,096 tokens (after step 4, at the start of step 5), branches k = 1, 4 (one process each)
over 4,096 tokens, with epsilon 50% so every branch passes: the CBS read-off is 4 x 16 = 64 sequences, and
the doubling rule (double while 64 > 2 x batch) grows the batch from 16 to 32.

``probes.reference: branch``: k = 1 is a child job and the batch grows at the fork, from step 5 on.
``probes.reference: run`` (the default): the run trains steps 5-8 at 16 as the k = 1 branch, then the k = 4
branch runs from the kept step-4 checkpoint and the batch grows from step 9 on. Shown by equivalence:

* the probed run trains exactly as a run given the same batch schedule up front (the pause for the
  branches, which checkpoints, tears the layout down and loads it back, changes no bit of the training);
* a job requeued from the fork's checkpoint forks again (replacing the interrupted attempt's branches) and
  takes the same decision from the same branch losses, ending with the same per-step losses;
* the branches never write into the run's checkpoints;
* the run as k = 1: its read-off loss is the k = 1 child job's (same sequences, LR and weights; DP2 against
  one process, so to reduction-order rounding), its k = 4 branch is bitwise the child-job fork's, and a job
  requeued inside the window evaluates the missing points and takes the same decision.
"""

from __future__ import annotations

import json
import shutil

import pytest
from ramp_run import run_ramp, step_checkpoint

pytestmark = pytest.mark.dist

SEQ, B0 = 64, 16  # TINY
TOKENS = 12 * B0 * SEQ  # 12,288: 4 steps of 16 (4,096 tokens), then 4 of 32
COMMON = [
    "training.train_tokens=12288",
    "training.eval_samples=16",
    "checkpoint.keep_last=10",
]
PROBED = [
    *COMMON,
    "batch_schedule.kind=cbs",
    "batch_schedule.cbs_source=probes",
    "batch_schedule.max_batch=32",
    "probes.every_tokens=4096",
    "probes.multipliers=[1,4]",
    "probes.budget_tokens=4096",
    "probes.evals=2",
    "probes.epsilon=0.5",
]
BRANCH_K1 = [*PROBED, "probes.reference=branch"]
RUN_K1 = [*PROBED, "probes.reference=run", "checkpoint.interval=6"]
EVAL = 16 * SEQ  # forward tokens of one evaluation (eval_samples=16)


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    return run_ramp(tmp_path_factory.mktemp("probed") / "run", BRANCH_K1, nproc=2).check()


def _records(run_dir):
    return [json.loads(ln) for ln in (run_dir / "probes" / "probes.jsonl").read_text().splitlines()]


def test_probe_decides_and_the_pause_changes_nothing(probed, tmp_path):
    batches = {r["step"]: r["global_batch"] for r in probed.train}
    assert batches == {**dict.fromkeys(range(1, 5), 16), **dict.fromkeys(range(5, 9), 32)}
    (rec,) = _records(probed.run_dir)  # the second grid point (8,192 tokens) comes at the cap: skipped
    assert rec["tokens"] == 4096 and rec["step"] == 4 and rec["base_batch"] == 16
    assert [b["k"] for b in rec["branches"]] == [1, 4] and [b["steps"] for b in rec["branches"]] == [4, 1]
    assert all(b["error"] is None and b["passed"] for b in rec["branches"])
    assert rec["cbs"] == 64 and rec["edge"] == "high" and rec["batch_after"] == 32
    # the cost: both branches' 4,096 tokens, and their evaluations (k=1: steps 6 and 8; k=4: step 5), a
    # third each, against the run's 12,288 tokens (the run itself evaluates nothing: eval_interval=0)
    last = probed.train[-1]
    assert [b["evals"] for b in rec["branches"]] == [2, 1]
    assert last["probe_tokens"] == 8192 and last["probe_eval_tokens"] == 3 * EVAL
    assert last["probe_cost_frac"] == pytest.approx((8192 + EVAL) / TOKENS)
    assert (probed.run_dir / "probes" / "cbs_vs_tokens.png").stat().st_size > 0
    # branches ran in their own directories and saved nothing; the run's checkpoints are the fork's
    # (step 4) and the final one
    names = sorted(p.name for p in (probed.run_dir / "checkpoints").glob("step_*"))
    assert names == ["step_0000004", "step_0000008"]
    assert not list((probed.run_dir / "probes").rglob("checkpoints/step_*"))

    ref = run_ramp(
        tmp_path / "ref", [*COMMON, "batch_schedule.kind=steps", "batch_schedule.steps=[[0,16],[4096,32]]"], 2
    ).check()
    assert probed.series("loss") == ref.series("loss")  # bitwise
    assert probed.series("grad_norm") == ref.series("grad_norm")


def test_requeue_at_the_fork_takes_the_same_decision(probed, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(probed.run_dir, run_dir)
    # the job died while branching: its newest checkpoint is the fork's, and a branch was half written
    shutil.rmtree(run_dir / "checkpoints" / step_checkpoint(probed, 8).name)
    (run_dir / "checkpoints" / "latest").write_text("step_0000004\n")
    stale = run_dir / "probes" / "fork_000000004096" / "k4" / "stale-marker"
    stale.write_text("from the interrupted attempt")

    again = run_ramp(run_dir, [*BRANCH_K1, "checkpoint.load=auto"], nproc=2).check()
    assert not stale.exists()  # the fork ran again in a clean directory
    assert "resumed from" in again.stdout and "at step 4" in again.stdout
    # metrics.jsonl: the straight run's steps 1-4, then the requeued job's 5-8, each once
    assert [r["step"] for r in again.train] == list(range(1, 9))
    assert again.series("loss") == probed.series("loss")
    (before,), (after,) = _records(probed.run_dir), _records(run_dir)
    assert [b["loss"] for b in after["branches"]] == [b["loss"] for b in before["branches"]]
    assert (after["cbs"], after["batch_after"]) == (before["cbs"], before["batch_after"])


@pytest.fixture(scope="module")
def run_k1(tmp_path_factory):
    return run_ramp(tmp_path_factory.mktemp("run_k1") / "run", RUN_K1, nproc=2).check()


def test_the_run_is_the_k1_branch(run_k1, probed, tmp_path):
    batches = {r["step"]: r["global_batch"] for r in run_k1.train}
    assert batches == {**dict.fromkeys(range(1, 9), 16), **dict.fromkeys(range(9, 11), 32)}
    (rec,) = _records(run_k1.run_dir)
    assert (rec["tokens"], rec["step"], rec["decided_at_tokens"], rec["decided_at_step"]) == (
        4096,
        4,
        8192,
        8,
    )
    assert rec["reference"] == "run" and [b["k"] for b in rec["branches"]] == [1, 4]
    k1, k4 = rec["branches"]
    assert k1["run_dir"] == "run" and k1["steps"] == 4 and k4["steps"] == 1
    assert rec["cbs"] == 64 and rec["batch_after"] == 32
    (other,) = _records(probed.run_dir)  # the same fork with k = 1 as a child job
    assert k1["loss"] == pytest.approx(other["branches"][0]["loss"], rel=1e-5)
    assert k4["loss"] == other["branches"][1]["loss"]  # from the same step-4 weights: bitwise
    # k = 4 trained at the fork's LR x sqrt(4) (moe-tiny's peak 2e-3; the WSD decay starts at 9,830 tokens)
    k4_rows = (run_k1.run_dir / "probes" / "fork_000000004096" / "k4" / "metrics.jsonl").read_text()
    assert [json.loads(ln)["lr"] for ln in k4_rows.splitlines() if '"val_loss"' not in ln] == [
        pytest.approx(4e-3, rel=1e-12)
    ]
    # a read-off from two evaluations has no noise sd of its own: the noise floor model's, by hand
    # 0.0025 x sqrt(262,144 / 4,096) = 2% of the loss
    assert k1["noise_from"] == "model" and k1["noise"] == pytest.approx(0.02 * k1["loss"], rel=1e-9)
    # the cost: one branch's 4,096 tokens and its evaluation, and the run's two extra evaluations
    last = run_k1.train[-1]
    assert last["probe_tokens"] == 4096 and last["probe_eval_tokens"] == 3 * EVAL
    assert last["probe_cost_frac"] == pytest.approx((4096 + EVAL) / TOKENS)
    # the kept fork checkpoint is gone once the fork is decided; the run's own: the fork's, the interval's,
    # the pause's and the last
    assert not (run_k1.run_dir / "probes" / "fork_000000004096" / "checkpoint").exists()
    names = sorted(p.name for p in (run_k1.run_dir / "checkpoints").glob("step_*"))
    assert names == ["step_0000004", "step_0000006", "step_0000008", "step_0000010"]

    ref = run_ramp(
        tmp_path / "ref", [*COMMON, "batch_schedule.kind=steps", "batch_schedule.steps=[[0,16],[8192,32]]"], 2
    ).check()
    assert run_k1.series("loss") == ref.series("loss")  # bitwise: the extra evaluations change nothing
    assert run_k1.series("grad_norm") == ref.series("grad_norm")


@pytest.mark.parametrize("died_after", [6, 8])
def test_requeue_inside_the_window_takes_the_same_decision(run_k1, tmp_path, died_after):
    run_dir = tmp_path / "run"
    shutil.copytree(run_k1.run_dir, run_dir)
    # the job died after step 6's checkpoint, while the run was the k = 1 branch, or after step 8's (the
    # decision's pause, its state from before the decision): either way no later checkpoint was complete,
    # so the fork's kept checkpoint (hard links of step 4) was still there
    for step in (8, 10)[(died_after == 8) :]:
        shutil.rmtree(run_dir / "checkpoints" / step_checkpoint(run_k1, step).name)
    (run_dir / "checkpoints" / "latest").write_text(f"step_{died_after:07d}\n")
    fork_dir = run_dir / "probes" / "fork_000000004096"
    shutil.copytree(run_dir / "checkpoints" / "step_0000004", fork_dir / "checkpoint")
    shutil.rmtree(fork_dir / "k4")

    again = run_ramp(run_dir, [*RUN_K1, "checkpoint.load=auto"], nproc=2).check()
    assert f"at step {died_after}" in again.stdout
    assert [r["step"] for r in again.train] == list(range(1, 11))
    assert again.series("loss") == run_k1.series("loss")
    (before,), (after,) = _records(run_k1.run_dir), _records(run_dir)
    assert [b["loss"] for b in after["branches"]] == [b["loss"] for b in before["branches"]]
    assert (after["cbs"], after["batch_after"], after["decided_at_step"]) == (64, 32, 8)
    assert not (fork_dir / "checkpoint").exists()
