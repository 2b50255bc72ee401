"""Pure pieces of the resilience work: atomic directory swap, lock holders, spike z-score, resume check."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys

import psutil
import pytest

from launcher import checkpoint, resilience, runlock
from launcher.callbacks.loss_spikes import zscore
from launcher.errors import RampError
from launcher.laws.bad_steps import is_bad_batch, past_skipped, skipped_samples
from launcher.recipe import load as load_recipe


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    (b / "x").write_text("from b")
    checkpoint.exchange(a, b)
    assert (a / "x").read_text() == "from b" and (b / "x").read_text() == "from a"


def test_lock_held_by_a_live_process_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    held = runlock.RunLock(tmp_path)
    held.acquire()
    holder = json.loads((tmp_path / runlock.LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RampError, match=f"in use by pid {os.getpid()} on {socket.gethostname()}"):
        runlock.RunLock(tmp_path).acquire()
    held.release()
    assert not (tmp_path / runlock.LOCK_NAME).exists()
    # A holder that exited (its pid no longer runs) leaves a stale lock: the next job takes it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    started = 1.0
    (tmp_path / runlock.LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": started})
    )
    assert not psutil.pid_exists(dead.pid) or psutil.Process(dead.pid).create_time() != started
    fresh = runlock.RunLock(tmp_path)
    fresh.acquire()
    assert json.loads((tmp_path / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()
    fresh.release()


def test_zscore_matches_statistics():
    history = [3.0, 2.9, 3.1, 3.05, 2.95, 3.0, 2.98, 3.02, 3.01, 2.99]
    expected = (4.0 - statistics.mean(history)) / statistics.stdev(history)
    assert zscore(4.0, history) == pytest.approx(expected, rel=1e-12)


def test_resume_check_names_the_field_and_both_values(tmp_path):
    saved = {"training.seed": 1, "data.split": "98,2,0"}
    with pytest.raises(RampError, match=r"changes training\.seed: the checkpoint has 1, this run 2"):
        resilience.check_resume(saved, {"training.seed": 2, "data.split": "98,2,0"}, False, tmp_path)
    assert resilience.check_resume(saved, {"training.seed": 2, "data.split": "98,2,0"}, True, tmp_path) == [
        "training.seed"
    ]
    assert resilience.check_resume(None, {"training.seed": 2}, False, tmp_path) == []


def test_past_skipped_moves_through_chained_windows_only_from_inside_them():
    windows = [[64, 96], [96, 112], [200, 216]]
    assert [past_skipped(p, windows) for p in (48, 64, 80, 96, 112, 199, 200, 215, 216)] == [
        48,
        112,
        112,
        112,
        112,
        199,
        216,
        216,
        216,
    ]
    assert skipped_samples(windows) == 32 + 16 + 16


def test_nan_injection_follows_the_batch_not_the_step_number():
    # gbs 16: the batch at sample 32 is step 3's in an uninterrupted run; 40 is no batch boundary there.
    assert [is_bad_batch([3], p, 16) for p in (16, 32, 40, 48)] == [False, True, False, False]


def test_an_unknown_bad_step_action_is_refused_naming_the_choices():
    with pytest.raises(RampError, match=r"resilience.on_bad_steps='retry': choose one of stop, rewind"):
        load_recipe("moe-tiny", ["resilience.on_bad_steps=retry"])


def _run_script(tmp_path, name: str, code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``code`` run from ``tmp_path / name`` by this Python in a child run's environment (the repository
    importable, no variables of an enclosing job) plus ``env``, stdout piped."""
    from ramp_run import ramp_env

    script = tmp_path / name
    script.write_text(code)
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**ramp_env(), **(env or {})},
    )


def test_a_process_the_worker_forks_dies_with_the_worker(tmp_path):
    """megatron forks checkpoint writers; a worker SIGKILLed mid-save must not leave them behind."""
    _killed_worker_leaves_no_child(_forking_worker(tmp_path, "kill_me_with_parent"))


def test_a_child_whose_worker_died_before_its_fork_hook_ran_dies_too(tmp_path):
    """The worker is SIGKILLed before its forked child has run the hook (a loaded machine may not schedule
    the child for a while; here the child sleeps first): the parent-death signal was never armed, so the
    child must see that its parent is gone and kill itself."""
    hook = "lambda: (time.sleep(2), kill_me_with_parent())"
    _killed_worker_leaves_no_child(_forking_worker(tmp_path, hook))


def _forking_worker(tmp_path, hook: str) -> subprocess.Popen:
    """A worker that registers ``hook`` to run in the children it forks, forks one that sleeps, prints its
    pid and sleeps."""
    return _run_script(
        tmp_path,
        "worker.py",
        "import os, sys, time\n"
        "from launcher.runlock import kill_me_with_parent\n"
        f"os.register_at_fork(after_in_child={hook})\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(120)\n",
    )


def _killed_worker_leaves_no_child(worker: subprocess.Popen) -> None:
    """SIGKILL ``worker`` (which printed its forked child's pid): the child is gone within 10 s."""
    import time

    child = psutil.Process(int(worker.stdout.readline()))
    assert child.is_running()
    worker.kill()
    worker.wait()
    deadline = time.time() + 10
    while time.time() < deadline and child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.1)
    alive = child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    if alive:
        child.kill()
    assert not alive


def _lock_holder(tmp_path, hold: str) -> subprocess.Popen:
    """A process that takes the run lock of ``tmp_path / 'run'`` with a 0.2 s heartbeat, prints
    ``holding``, then runs ``hold``."""
    holder = _run_script(
        tmp_path,
        "holder.py",
        "import ctypes, sys, time\n"
        "from launcher import runlock\n"
        "runlock.HEARTBEAT_S = 0.2\n"
        "lock = runlock.RunLock(sys.argv[1])\n"
        "lock.acquire()\n"
        "print('holding', flush=True)\n"
        f"{hold}\n"
        "lock.release()\n",
        str(tmp_path / "run"),
    )
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_the_lock_heartbeat_goes_on_while_its_holder_holds_the_gil(tmp_path):
    """A holder on another host is judged by the lock's mtime: it must keep moving while the holder sits in
    one long C call with the GIL held (a thread could not touch it then)."""
    import time

    lock, done = tmp_path / "run" / runlock.LOCK_NAME, tmp_path / "gil-released"
    # libc sleep through PyDLL: the GIL is held throughout; then a marker file
    holder = _lock_holder(tmp_path, f"ctypes.PyDLL(None).sleep(4); open({str(done)!r}, 'w').close()")
    try:
        m0 = lock.stat().st_mtime
        time.sleep(2.5)
        m1 = lock.stat().st_mtime
        assert not done.exists(), "the holder left its GIL hold before the lock was read (a loaded machine?)"
        assert m1 - m0 >= 1.0, f"the lock's mtime moved {m1 - m0:.2f} s in 2.5 s of a 0.2 s heartbeat"
        assert holder.wait(timeout=30) == 0
        assert not lock.exists(), "release() left the lock behind"
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_toucher_ends_with_its_holder(tmp_path):
    holder = _lock_holder(tmp_path, "time.sleep(120)")
    try:
        (toucher,) = psutil.Process(holder.pid).children()
        assert runlock.TOUCHER in toucher.cmdline()
    finally:
        holder.kill()
        holder.wait()
    _, alive = psutil.wait_procs([toucher], timeout=30)  # it polls its parent every 0.2 s; a loaded machine
    for p in alive:  # exited: gone, or a zombie its new parent has not reaped yet
        with contextlib.suppress(psutil.NoSuchProcess):
            assert p.status() == psutil.STATUS_ZOMBIE, f"the toucher outlived its holder ({p.status()})"
    # The dead holder's lock is stale: the next job takes it over.
    lock = tmp_path / "run" / runlock.LOCK_NAME
    assert json.loads(lock.read_text())["pid"] == holder.pid
    fresh = runlock.RunLock(tmp_path / "run")
    fresh.acquire()
    fresh.release()
    assert not lock.exists()


def test_release_ends_the_toucher_before_it_removes_the_lock(tmp_path):
    lock = runlock.RunLock(tmp_path)
    lock.acquire()
    (toucher,) = [c for c in psutil.Process().children() if runlock.TOUCHER in c.cmdline()]
    lock.release()
    assert not psutil.pid_exists(toucher.pid), "release() left the toucher running (or unreaped)"
    assert not (tmp_path / runlock.LOCK_NAME).exists()


def test_beaters_started_long_before_the_store_beat_as_soon_as_it_is_up(tmp_path):
    """Under the DeepSpeed launcher or srun the store comes up with rank 0's process group, after every
    rank's beater is forked; a beater that then took seconds to find it would be named dead by its peers
    (they wait 3 beats). Eight beaters start 12 s before the store; each must beat within 2 s of it."""
    import datetime
    import time

    import torch.distributed as dist
    from ramp_run import free_port

    port = free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = _run_script(
        tmp_path,
        "ranks.py",
        "import time\n"
        "from launcher.resilience import Heartbeat\n"
        "for rank in range(8):\n"
        "    Heartbeat(0.25).fork_beater(rank, 8)\n"
        "print('forked', flush=True)\n"
        "time.sleep(120)\n",
        env=env,
    )
    try:
        assert ranks.stdout.readline().strip() == "forked"
        time.sleep(12)
        store = dist.TCPStore(
            "127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)
        )
        up, first = time.monotonic(), {}
        while len(first) < 8 and time.monotonic() - up < 30:
            for rank in set(range(8)) - set(first):
                if store.add(f"ramp/hb/0/{rank}", 0) > 0:
                    first[rank] = time.monotonic() - up
            time.sleep(0.05)
        lags = {r: round(first.get(r, float("inf")), 2) for r in range(8)}
        assert max(lags.values()) <= 2.0, f"seconds from the store's start to each rank's first beat: {lags}"
    finally:
        ranks.kill()
        ranks.wait()


def test_an_overflow_megatron_finds_skips_the_update_without_a_norm(pg):
    """megatron's ``prepare_grads`` flags inf/nan itself under fp16 loss scaling: the guard takes that as a
    bad step (no norm computed, no update), as megatron's own step does."""
    from launcher.trainer import TrainState

    class Overflowing:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def prepare_grads(self) -> bool:
            self.calls.append("prepare_grads")
            return True

        def get_grad_norm(self):
            self.calls.append("get_grad_norm")
            return 1.0

        def step_with_ready_grads(self) -> bool:
            self.calls.append("step_with_ready_grads")
            return True

    state = TrainState(global_batch_size=8)
    guard = resilience.BadStepGuard(max_in_a_row=3)
    opt = Overflowing()
    assert guard.step(opt, lambda: 2.0, state) == (False, float("inf"))
    assert opt.calls == ["prepare_grads"]
    assert state.extra["bad_steps"]["total"] == 1
