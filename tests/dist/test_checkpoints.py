"""Checkpoints: exact resume, resume into another layout, and crash safety."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from ramp_run import (
    ROOT,
    TINY,
    assert_continues,
    kill_tree,
    ramp_command,
    ramp_env,
    rank_processes,
    run_ramp,
    step_checkpoint,
)

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


def test_run_started_from_weights_only_resumes_its_own_checkpoints_whole(straight_dp2, tmp_path):
    """A run started from weights only (checkpoint.load_optimizer=false) keeps that setting when requeued;
    its own checkpoints still load with Adam's state: stopped after step 5 and resumed, steps 6 and 7 equal
    the uninterrupted run's to the last bit (step 7's loss follows step 6's update, which Adam's state
    makes; without, the resume restarted Adam)."""
    start = [f"checkpoint.load={step_checkpoint(straight_dp2, HALF)}", "checkpoint.load_optimizer=false"]
    last = STEPS + 1
    straight = run_ramp(tmp_path / "straight", [*start, f"training.train_steps={last}"]).check()
    first = run_ramp(tmp_path / "requeued", [*start, f"training.train_steps={last - 2}"]).check()
    resumed = run_ramp(
        tmp_path / "requeued",
        ["checkpoint.load=latest", "checkpoint.load_optimizer=false", f"training.train_steps={last}"],
    ).check()
    assert sorted(first.series("loss")) == list(range(HALF + 1, last - 1))
    want = straight.series("loss")
    assert {s: resumed.series("loss")[s] for s in (last - 1, last)} == {s: want[s] for s in (last - 1, last)}


@pytest.mark.parametrize("distopt", [True, False], ids=["distopt", "adam"])
def test_bf16_model_only_load_trains_from_the_loaded_weights(distopt, straight_dp2, tmp_path):
    """Weights only (checkpoint.load_optimizer=false, as after an HF import) into a bf16 model, with the
    distributed optimizer (as the GPU recipes run) and without: the optimizer's fp32 main copies must take
    the loaded weights too. Without that the first step writes init + update back (seen: the next loss
    8.30 against the continuation's 7.89, back at an untrained model's). A fresh Adam and bf16 stay within
    0.1 of the fp32 continuation with Adam's state; the first loss, before any update, within bf16
    rounding. The run saves at its end (bf16 without the distributed optimizer failed there while the
    CPU norms' weights stayed fp32)."""
    sets = [
        f"training.train_steps={STEPS}",
        f"checkpoint.load={step_checkpoint(straight_dp2, HALF)}",
        "checkpoint.load_optimizer=false",
        "training.precision=bf16",
        f"parallel.distributed_optimizer={str(distopt).lower()}",
    ]
    got, ref = run_ramp(tmp_path, sets).check().series("loss"), straight_dp2.series("loss")
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
    assert sorted(got) == list(range(HALF + 1, STEPS + 1))
    assert got[HALF + 1] == pytest.approx(ref[HALF + 1], abs=1e-3)
    for s in range(HALF + 2, STEPS + 1):
        assert got[s] == pytest.approx(ref[s], abs=0.1), (s, got, ref)


def test_sigkill_during_checkpoint_write_resumes_from_previous(tmp_path):
    """Kill -9 while a checkpoint is being written: `latest` still names a complete one, which resumes."""
    ckpts = tmp_path / "checkpoints"
    sets = ["training.train_steps=200", "checkpoint.interval=1", "checkpoint.keep_last=3"]
    cmd = ramp_command(tmp_path, sets, nproc=2)
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


ASYNC_PROBE = """
import json, sys
from pathlib import Path
import torch
from launcher import checkpoint
from tools.mup_coord_check import trainer_for

run, sets = Path(sys.argv[1]), json.loads(sys.argv[2])
ck = run / "checkpoints"
final = checkpoint.step_dir(ck, 2)


def train(t):
    t.emit("on_step_start")  # the LR of the step
    t.train_step()


def params(t):
    return {n: p.detach().clone() for n, p in t.chunks[0].named_parameters()}


def on_disk():
    return {
        "latest": checkpoint.latest_name(ck),
        "tmp": final.with_name(final.name + ".tmp").is_dir(),
        "final": final.exists(),
        "pending": t.saves.pending,
        "last_saved": None if t.last_saved is None else t.last_saved[0],
    }


out = {}
with trainer_for(sets, run) as t:
    out["async"] = t.saves is not None
    train(t)
    train(t)
    saved = params(t)
    t.save_checkpoint()
    out["in_flight"] = on_disk()
    train(t)  # training goes on while the writer process writes step 2
    out["changed"] = any(not torch.equal(p, saved[n]) for n, p in params(t).items())
    t.finish_saves()
    out["done"] = on_disk()
    out["damage"] = checkpoint.damage(final, verify_checksums=True)
    t.load_checkpoint(final)
    out["bitwise"] = all(torch.equal(p, saved[n]) for n, p in params(t).items())
    out["step"] = t.state.step
print("RESULT", json.dumps(out), flush=True)
"""


def test_async_save_names_latest_only_when_complete_and_loads_bitwise(tmp_path):
    """checkpoint.async_save on CPU: right after the save is scheduled nothing is published (no `latest`, only
    ``step_2.tmp``) while training goes on; completing it publishes a checksummed checkpoint that loads back
    into exactly the weights of step 2, not the step-3 weights the trainer held while it was written."""
    sets = [s for s in TINY if not s.startswith("logging.")]
    sets += ["training.train_steps=4", "checkpoint.async_save=true", "logging.tensorboard=false"]
    p = subprocess.run(
        [sys.executable, "-c", ASYNC_PROBE, str(tmp_path), json.dumps(sets)],
        cwd=ROOT,
        env=ramp_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    out = json.loads(lines[0].removeprefix("RESULT "))
    assert out["async"]
    assert out["in_flight"] == {"latest": None, "tmp": True, "final": False, "pending": 1, "last_saved": None}
    assert out["changed"]  # step 3 moved the weights: the bitwise comparison below can fail
    assert out["done"] == {
        "latest": "step_0000002",
        "tmp": False,
        "final": True,
        "pending": 0,
        "last_saved": 2,
    }
    assert out["damage"] is None
    assert out["bitwise"] and out["step"] == 2


def test_async_save_run_resumes_bitwise(straight_dp2, tmp_path):
    """A DP2 run saving asynchronously trains the same numbers as one saving synchronously, and its
    checkpoints resume exactly like the synchronous ones."""
    sets = [f"training.train_steps={STEPS}", f"checkpoint.interval={HALF}", "checkpoint.keep_last=5"]
    run = run_ramp(tmp_path / "async", [*sets, "checkpoint.async_save=true"], nproc=2).check()
    assert run.series("loss") == straight_dp2.series("loss")
    ckpts = tmp_path / "async" / "checkpoints"
    assert checkpoint_names(ckpts) == [f"step_{HALF:07d}", f"step_{STEPS:07d}"]
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:07d}"
    resumed = run_ramp(
        tmp_path / "resumed",
        [f"training.train_steps={STEPS}", f"checkpoint.load={step_checkpoint(run, HALF)}"],
        nproc=2,
    ).check()
    ref = straight_dp2.series("loss")
    assert resumed.series("loss") == {s: ref[s] for s in range(HALF + 1, STEPS + 1)}
    assert resumed.series("grad_norm") == {
        s: straight_dp2.series("grad_norm")[s] for s in range(HALF + 1, STEPS + 1)
    }


def checkpoint_names(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != "latest")


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_sync_step(tmp_path):
    """Stop agreement every training.sync_interval steps: a SIGTERM that reaches rank 1 only stops both ranks
    after the same step, a multiple of the interval (no log, eval or checkpoint step in between), where the
    exit checkpoint is saved."""
    every = 4
    cmd = ramp_command(
        tmp_path,
        [
            "training.train_steps=400",
            "training.log_interval=1000",
            f"training.sync_interval={every}",
            "checkpoint.interval=0",
        ],
        nproc=2,
    )
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ramp_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (tmp_path / "metrics.jsonl").exists():  # step 1 is logged
            time.sleep(0.05)
        rank1 = rank_processes(proc.pid)[1]
        time.sleep(1.0)
        rank1.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid, grace_s=0)
    assert proc.returncode == 0, out[-3000:]
    stops = dict(re.findall(r"ramp: rank (\d): stopping after step (\d+)", out))
    assert set(stops) == {"0", "1"}, out[-3000:]
    assert stops["0"] == stops["1"]
    step = int(stops["0"])
    assert step % every == 0 and step < 400
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{step:07d}"
