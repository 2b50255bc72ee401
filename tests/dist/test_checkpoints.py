"""Checkpoints: exact resume, resume into another layout, and crash safety."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
from ramp_run import ROOT, TINY, assert_continues, free_port, kill_tree, ramp_env, run_ramp, step_checkpoint

pytestmark = pytest.mark.dist

STEPS, HALF = 6, 3


@pytest.fixture(scope="module")
def straight_dp2(tmp_path_factory):
    """DP2 trained 2N steps in one go, checkpointing at N: the reference continuation."""
    run_dir = tmp_path_factory.mktemp("straight")
    sets = [f"training.train_steps={STEPS}", f"checkpoint.interval={HALF}", "checkpoint.keep_last=5"]
    return run_ramp(run_dir, sets, nproc=2).check()


def test_resume_is_bitwise_identical(straight_dp2, tmp_path):
    """N steps, stop, resume N steps == 2N straight: same losses to the last bit, same data position."""
    first = run_ramp(tmp_path, [f"training.train_steps={HALF}"], nproc=2).check()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{HALF:07d}"
    resumed = run_ramp(tmp_path, [f"training.train_steps={STEPS}", "checkpoint.load=latest"], nproc=2).check()
    ref = straight_dp2.series("loss")
    assert first.series("loss") == {s: ref[s] for s in range(1, HALF + 1)}
    assert resumed.series("loss") == {s: ref[s] for s in range(1, STEPS + 1)}  # metrics.jsonl continues
    assert resumed.series("grad_norm") == straight_dp2.series("grad_norm")
    # The data position: tokens consumed after each step match, so no sample was skipped or repeated.
    assert resumed.series("tokens") == straight_dp2.series("tokens")


@pytest.mark.parametrize("target", ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2"])
def test_reshard_resume_from_dp2(target, straight_dp2, tmp_path):
    """Save under DP2, resume under TP2 / PP2 / EP2: the next steps equal the unresharded continuation."""
    sets = [target, f"training.train_steps={STEPS}", f"checkpoint.load={step_checkpoint(straight_dp2, HALF)}"]
    run = run_ramp(tmp_path, sets, nproc=2).check()
    assert_continues(run, straight_dp2, HALF + 1, STEPS)


def test_sigkill_during_checkpoint_write_resumes_from_previous(tmp_path):
    """Kill -9 while a checkpoint is being written: `latest` still names a complete one, which resumes."""
    ckpts = tmp_path / "checkpoints"
    args = ["--recipe", "moe-tiny"]
    for s in [
        *TINY,
        f"logging.run_dir={tmp_path}",
        "training.train_steps=200",
        "checkpoint.interval=1",
        "checkpoint.keep_last=3",
    ]:
        args += ["--set", s]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "launcher.pretrain",
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ramp_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    killed_mid_write = False
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            done = (
                sorted(p.name for p in ckpts.glob("step_*") if not p.name.endswith(".tmp"))
                if ckpts.exists()
                else []
            )
            writing = list(ckpts.glob("step_*.tmp")) if ckpts.exists() else []
            if len(done) >= 2 and writing and any(any(w.iterdir()) for w in writing):
                kill_tree(proc.pid, grace_s=0)  # the launcher and every rank, mid-write
                killed_mid_write = True
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid, grace_s=0)
        proc.wait()
    assert killed_mid_write, "never caught a checkpoint being written"
    assert list(ckpts.glob("step_*.tmp")), "the interrupted write should have left its .tmp directory"
    latest = (ckpts / "latest").read_text().strip()
    assert not latest.endswith(".tmp")
    killed_at = int(latest.split("_")[1])
    resumed = run_ramp(
        tmp_path,
        [f"training.train_steps={killed_at + 2}", "checkpoint.load=latest", "checkpoint.interval=1"],
        nproc=2,
    ).check()
    assert f"resumed from {ckpts / latest} at step {killed_at}" in resumed.stdout
    assert max(resumed.series("loss")) == killed_at + 2
    assert not list(ckpts.glob("step_*.tmp")), "a later save of the same step must replace the stale .tmp"


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    """Slurm's SIGTERM before a time limit: finish the step, save, exit 0; the run resumes from there."""
    args = ["--recipe", "moe-tiny"]
    for s in [*TINY, f"logging.run_dir={tmp_path}", "training.train_steps=500"]:
        args += ["--set", s]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.pretrain", *args],
        cwd=ROOT,
        env=ramp_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    last_step = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert 3 <= last_step < 500
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{last_step:07d}"
