"""Faults, once each: resume mid-warmup/mid-decay, requeue, rewind, corrupt checkpoint, torn metrics line,
load=auto, changed recipe, NaN steps, a held run directory, a killed launcher.

One process unless the fault needs two; every run is the tiny model for a few steps (the suite's budget).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import socket
import subprocess
import time

import psutil
import pytest
import torch
from ramp_run import (
    ROOT,
    kill_tree,
    ramp_command,
    ramp_env,
    rank_processes,
    read_metrics,
    run_ramp,
    step_checkpoint,
)

from launcher import checkpoint

pytestmark = pytest.mark.dist

STEPS, EVERY = 8, 2
TOKENS_PER_STEP = 16 * 64
# A step's LR is the schedule at the tokens after it: warmup over steps 1-4 (peak at step 4), stable at 5,
# decay over 6-8: checkpoints at 2 (mid-warmup) and 6 (mid-decay).
WSD = [
    "schedule.style=wsd",
    f"schedule.warmup_tokens={4 * TOKENS_PER_STEP}",
    f"schedule.decay.start_tokens={5 * TOKENS_PER_STEP}",
    f"schedule.decay.length_tokens={3 * TOKENS_PER_STEP}",
    "schedule.min_lr_ratio=0.1",
]


def _sets(*extra: str) -> list[str]:
    return [*WSD, f"training.train_steps={STEPS}", *extra]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    return run_ramp(run_dir, _sets(f"checkpoint.interval={EVERY}", "checkpoint.keep_last=10")).check()


def _copy(straight, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(straight.run_dir, dest)
    return dest


def _one_error_line(run) -> str:
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("ramp: error:")]
    assert len(lines) == 1, run.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("at", [2, 6], ids=["mid-warmup", "mid-decay"])
def test_resume_mid_warmup_and_mid_decay_is_bitwise(at, straight, tmp_path):
    lr = straight.series("lr")
    assert lr[at + 1] < lr[4] and lr[STEPS] < lr[4], "the checkpoint is not inside warmup/decay"
    run = run_ramp(tmp_path, _sets(f"checkpoint.load={step_checkpoint(straight, at)}")).check()
    ref = straight.series("loss")
    assert run.series("loss") == {s: ref[s] for s in range(at + 1, STEPS + 1)}
    assert run.series("lr") == {s: lr[s] for s in range(at + 1, STEPS + 1)}


def test_requeue_does_not_resave_and_rewind_swaps_and_keeps_the_newest(straight, tmp_path):
    run_dir = _copy(straight, tmp_path)
    ckpts = run_dir / "checkpoints"
    saved_at = json.loads((ckpts / "step_0000008" / "ramp_manifest.json").read_text())["saved_at_ns"]
    # A requeue of the finished run: nothing to train, and step 8 is not written again.
    run_ramp(run_dir, _sets("checkpoint.load=auto")).check()
    assert json.loads((ckpts / "step_0000008" / "ramp_manifest.json").read_text())["saved_at_ns"] == saved_at
    # Rewind to step 2 and retrain to 8, saving at 4 and 8 with keep_last=2. Both steps exist, so each new
    # one is swapped in atomically; retention keeps the newest saves (new 4 and 8), not the highest step
    # numbers (by number the new step 4, which `latest` named, would go and the stale step 6 would stay).
    old8 = saved_at
    rewound = run_ramp(
        run_dir, _sets("checkpoint.load=2", "checkpoint.interval=4", "checkpoint.keep_last=2")
    ).check()
    assert (ckpts / "latest").read_text().strip() == "step_0000008"
    assert checkpoint.list_steps(ckpts) == [4, 8]
    assert json.loads((ckpts / "step_0000008" / "ramp_manifest.json").read_text())["saved_at_ns"] > old8
    # The rewound run trained the same steps again, and metrics.jsonl tells one history.
    assert rewound.series("loss") == straight.series("loss")


def test_corrupt_latest_is_refused_and_auto_uses_the_previous_one(straight, tmp_path):
    run_dir = _copy(straight, tmp_path)
    shard = run_dir / "checkpoints" / "step_0000008" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte: same size, wrong content
    shard.write_bytes(bytes(data))
    refused = run_ramp(run_dir, _sets("checkpoint.load=latest"))
    assert refused.returncode == 2
    err = _one_error_line(refused)
    assert "__0_0.distcp fails its sha256 checksum" in err and "step_0000006" in err, err
    # A kill while metrics.jsonl was appended left a torn last line: dropped, and said so.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 3.1')
    resumed = run_ramp(run_dir, _sets("checkpoint.load=auto")).check()
    assert "resumed from" in resumed.stdout and "step_0000006 at step 6" in resumed.stdout
    assert "dropped torn line" in resumed.stderr
    assert resumed.series("loss") == straight.series("loss")


def test_auto_starts_fresh_and_clears_stale_tmp(tmp_path):
    stale = tmp_path / "checkpoints" / "step_0000005.tmp"
    stale.mkdir(parents=True)
    (stale / "half_written").write_text("x")
    run = run_ramp(tmp_path, ["training.train_steps=2", "checkpoint.load=auto"]).check()
    assert "no checkpoint: fresh start" in run.stdout and not stale.exists()
    assert sorted(run.series("loss")) == [1, 2]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_changed_data_order_is_refused_unless_a_branch(straight, tmp_path):
    parent = step_checkpoint(straight, 4)
    refused = run_ramp(tmp_path / "a", _sets(f"checkpoint.load={parent}", "training.seed=7"))
    assert refused.returncode == 2
    assert "changes training.seed: the checkpoint has 1234, this run 7" in _one_error_line(refused)
    branch = run_ramp(
        tmp_path / "b", _sets(f"checkpoint.load={parent}", "training.seed=7", "checkpoint.branch=true")
    ).check()
    assert sorted(branch.series("loss")) == list(range(5, STEPS + 1))
    # The parent's metrics and checkpoints are untouched.
    assert [json.loads(x)["step"] for x in (straight.run_dir / "metrics.jsonl").read_text().splitlines()][
        -1
    ] == STEPS


@pytest.mark.parametrize("layout", [None, "parallel.pp=2"], ids=["one_process", "pp2"])
def test_nan_gradient_skips_exactly_that_update(layout, tmp_path):
    """The NaN enters the last stage's backward pass; under PP2 it crosses the pipeline to the first stage,
    and both stages skip the same update (the rewind test runs it under DP2)."""
    sets = [
        "training.train_steps=4",
        "training.eval_interval=1",
        "training.eval_samples=16",
        "resilience.inject_nan_steps=[3]",
    ]
    run = run_ramp(tmp_path, [*sets, *([layout] if layout else [])], nproc=2 if layout else 1).check()
    val = {r["step"]: r["val_loss"] for r in run.evals}
    assert val[3] == val[2], "the weights changed in a skipped step"
    assert val[4] != val[3]
    assert all(math.isfinite(x) for x in run.series("loss").values())
    assert run.series("bad_steps") == {1: 0, 2: 0, 3: 1, 4: 1}
    assert "step 3: grad norm nan; update skipped" in run.stdout


def test_bad_steps_in_a_row_stop_the_run_naming_the_step(tmp_path):
    run = run_ramp(
        tmp_path,
        ["training.train_steps=4", "resilience.inject_nan_steps=[2,3]", "resilience.max_bad_steps=2"],
    )
    assert run.returncode == 3
    assert "step 3: 2 non-finite steps in a row" in _one_error_line(run)


def test_rewind_skips_the_bad_steps_samples_and_trains_on_as_a_run_started_past_them(tmp_path):
    """NaN at steps 5-6 (max_bad_steps=2): the run reloads step 4 and skips the samples of steps 5-6, then
    trains as a run started from that checkpoint with its data position moved past them by hand."""
    gbs, rewind_sets = 16, ["resilience.max_bad_steps=2", "resilience.on_bad_steps=rewind"]
    run = run_ramp(
        tmp_path / "rewind",
        _sets(
            f"checkpoint.interval={EVERY}",
            "checkpoint.keep_last=10",
            "resilience.inject_nan_steps=[5,6]",
            *rewind_sets,
        ),
        nproc=2,
    ).check()
    assert "step 6: 2 non-finite steps in a row (grad norm nan): rewound to step_0000004" in run.stdout
    # metrics.jsonl tells one history: steps 1-8 once, the retrained 5-8 with the rewind counted.
    assert [r["step"] for r in run.train] == list(range(1, STEPS + 1))
    assert {s: (r["rewinds"], r["skipped_samples"], r["bad_steps"]) for s, r in enumerate(run.train, 1)} == {
        s: (0, 0, 0) if s <= 4 else (1, 2 * gbs, 2) for s in range(1, STEPS + 1)
    }
    # Saved again at the rewind, step 4 records the window (4 steps done, 2 bad steps of 16 samples), so
    # a resume from it skips the window too; the last checkpoint carries it on.
    for step, position in ((4, 4 * gbs), (STEPS, (STEPS + 2) * gbs)):
        st = checkpoint.read_trainer_state(step_checkpoint(run, step))["state"]
        assert st["extra"]["skipped_samples"] == [[4 * gbs, 6 * gbs]]
        assert (st["step"], st["consumed_samples"]) == (step, position)
    # The reference: the same step-4 weights, its data position set past the window by hand, no window.
    ref_ckpt = tmp_path / "ref_ckpt" / "step_0000004"
    shutil.copytree(step_checkpoint(run, 4), ref_ckpt)
    (ref_ckpt / checkpoint.MANIFEST).unlink()  # common.pt changes size below
    common = torch.load(ref_ckpt / "common.pt", weights_only=False)
    common["ramp"]["state"]["consumed_samples"] = 6 * gbs
    common["ramp"]["state"]["extra"] = {}
    torch.save(common, ref_ckpt / "common.pt")
    ref = run_ramp(tmp_path / "ref", _sets(f"checkpoint.load={ref_ckpt}", *rewind_sets), nproc=2).check()
    after = {s: x for s, x in run.series("loss").items() if s > 4}
    assert after == ref.series("loss") and sorted(after) == [5, 6, 7, 8]


def test_rewinds_are_bounded(tmp_path):
    run = run_ramp(
        tmp_path,
        [
            "training.train_steps=6",
            "checkpoint.interval=2",
            "resilience.inject_nan_steps=[3,4,5,6,7]",
            "resilience.max_bad_steps=2",
            "resilience.on_bad_steps=rewind",
            "resilience.max_rewinds=1",
        ],
    )
    assert run.returncode == 3, run.stderr[-3000:]
    # Rewind 1 skips the samples of steps 3-4; the batches of steps 5-6 are bad too: stop, naming it.
    assert "rewound to step_0000002 (step 2); skipping samples [32, 64) (rewind 1 of 1)" in run.stdout
    assert "step 4: 2 non-finite steps in a row (grad norm nan); stopping after 1 rewinds" in _one_error_line(
        run
    )


def test_second_job_on_a_held_run_dir_stops_naming_the_holder(tmp_path):
    me = psutil.Process()

    (tmp_path / "ramp.lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()})
    )
    run = run_ramp(tmp_path, ["training.train_steps=2"])
    assert run.returncode == 2
    assert f"is in use by pid {me.pid} on {socket.gethostname()}" in _one_error_line(run)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_killed_launcher_leaves_no_workers(tmp_path):
    cmd = ramp_command(tmp_path, ["training.train_steps=500"], nproc=2)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ramp_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    workers: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        while not (tmp_path / "metrics.jsonl").exists():
            assert time.time() < deadline and proc.poll() is None, "training never started"
            time.sleep(0.5)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGKILL)  # the launcher alone, as an OOM killer or a node agent would
        proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, f"orphaned workers still running: {[p.pid for p in alive]}"
    finally:
        kill_tree(proc.pid, grace_s=0)
        for w in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                w.kill()


def test_a_frozen_peer_is_named_within_the_heartbeat_bound(tmp_path):
    """SIGSTOP one worker: torchrun sees nothing (the process lives), its peer blocks in a collective; the
    heartbeat names the silent rank after 3 beats instead of the 10-minute collective timeout."""
    cmd = ramp_command(tmp_path, ["training.train_steps=500", "resilience.heartbeat_s=1"], nproc=2)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ramp_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    workers: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        while not (tmp_path / "metrics.jsonl").exists():
            assert time.time() < deadline and proc.poll() is None, "training never started"
            time.sleep(0.5)
        workers = psutil.Process(proc.pid).children(recursive=True)
        frozen = rank_processes(proc.pid)[1]
        frozen.suspend()
        # Far below the 600 s collective timeout (torchrun then gives the frozen rank 30 s to stop).
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert "rank 0: rank 1 has not answered for" in err, err[-3000:]
    finally:
        kill_tree(proc.pid, grace_s=0)
        for w in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                w.kill()


def test_a_rank_holding_the_gil_is_alive_to_its_peers(tmp_path):
    """Rank 0 holds the GIL for 8 s (> 3 beats of 1 s) in one C call before its data build: its beats come
    from a process of their own, so rank 1 waits instead of naming it dead, and the run finishes."""
    cmd = ramp_command(tmp_path, ["training.train_steps=2", "resilience.heartbeat_s=1"], nproc=2)
    entry = cmd.index("launcher.pretrain")  # torchrun starts the wrapper script instead of the module
    cmd[entry - 1 : entry + 1] = [str(ROOT / "tests" / "dist" / "gil_holding_rank.py")]
    run = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**ramp_env(), "RAMP_TEST_HOLD_GIL_S": "8"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "gil_holding_rank: rank 0 held the GIL for 8 s" in run.stdout  # the patch took effect
    assert "has not answered" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(read_metrics(tmp_path)[0]) == 2


def test_a_rank_whose_beater_dies_stops_naming_it(tmp_path):
    """Kill rank 1's beater (the process that beats for it): rank 1 would look dead to its peers while
    training on, so it stops itself, exit 4, with a line that says why."""
    cmd = ramp_command(tmp_path, ["training.train_steps=500", "resilience.heartbeat_s=1"], nproc=2)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ramp_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while not (tmp_path / "metrics.jsonl").exists():
            assert time.time() < deadline and proc.poll() is None, "training never started"
            time.sleep(0.5)
        rank1 = rank_processes(proc.pid)[1]
        # the rank's first fork (later ones, its checkpoint writers, start after training has)
        beater = min(
            (c for c in rank1.children() if c.cmdline() == rank1.cmdline()), key=lambda c: c.create_time()
        )
        beater.kill()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert f"rank 1: its heartbeat process (pid {beater.pid}) died" in err, err[-3000:]
    finally:
        kill_tree(proc.pid, grace_s=0)
