"""One writer per run directory: a lock file naming its holder, and workers that die with their launcher.

``RUN_DIR/ramp.lock`` holds ``{"host", "pid", "started"}`` of the global rank 0 that owns the run. It is
created with O_EXCL; a second job finds it and stops with one line naming the holder. A lock is stale
(taken over) when its holder is on this host and that process is gone (or is another process that reused
the pid), or when its heartbeat (the file's mtime, touched every ``HEARTBEAT_S``) is older than
``STALE_AFTER_S``: a holder on a dead node.

The heartbeat comes from a small process the holder starts (:data:`TOUCHER`), not from one of its threads:
a thread stops while its process holds the GIL, and a rank 0 in one long C call (megatron-core's index
builds, minutes at trillion-token scale) would let a job on another host take the run directory from a
live run. The toucher ignores the job's signals (the holder handles them) and ends when its holder is
gone or the lock no longer names it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from launcher.errors import RampError
from launcher.resilience import kill_children

LOCK_NAME = "ramp.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0

#: The lock's toucher, run as ``python -I -S -c TOUCHER LOCK HOLDER_PID HEARTBEAT_S`` (standard library
#: only; ``-I``: no working directory or PYTHONPATH on its path). It stops when the lock is gone or names
#: another holder; a passing file-system error (NFS) is retried at the next beat.
TOUCHER = """
import json, os, signal, sys, time
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, signal.SIG_IGN)
path, holder, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
due = 0.0
while os.getppid() == holder:
    if time.monotonic() >= due:
        due = time.monotonic() + every
        try:
            with open(path) as f:
                if json.load(f).get("pid") != holder:
                    break
            os.utime(path)
        except (FileNotFoundError, ValueError):
            break
        except OSError:
            pass
    time.sleep(min(every, 0.5))
"""


def _me() -> dict:
    proc = psutil.Process()
    return {"host": socket.gethostname(), "pid": proc.pid, "started": proc.create_time()}


def _holder_alive(holder: dict, lock: Path) -> bool:
    if holder.get("host") == socket.gethostname():
        try:
            return abs(psutil.Process(int(holder["pid"])).create_time() - float(holder["started"])) < 1.0
        except (psutil.NoSuchProcess, KeyError, ValueError):
            return False
    try:
        return time.time() - lock.stat().st_mtime < STALE_AFTER_S
    except FileNotFoundError:
        return False


class RunLock:
    """Take with :meth:`acquire` (one-line RampError if held), release with :meth:`release`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._toucher: subprocess.Popen | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = json.dumps(_me())
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    holder = {}
                if holder and _holder_alive(holder, self.path):
                    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
                    raise RampError(
                        f"run directory {self.path.parent} is in use by pid {holder['pid']} on "
                        f"{holder['host']} (started {started}); stop that job or set logging.run_dir to "
                        f"another directory (lock: {self.path})"
                    ) from None
                print(
                    f"ramp: taking over a stale lock {self.path} ({holder or 'unreadable'})", file=sys.stderr
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            try:
                self._toucher = subprocess.Popen(
                    [
                        sys.executable,
                        "-I",
                        "-S",
                        "-c",
                        TOUCHER,
                        str(self.path),
                        str(os.getpid()),
                        str(HEARTBEAT_S),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                )
            except OSError as e:
                self.path.unlink(missing_ok=True)
                raise RampError(
                    f"could not start the run lock's heartbeat process ({e}); lock {self.path}"
                ) from None
            return
        raise RampError(f"could not take the run lock {self.path}; another job races for it")

    def release(self) -> None:
        if self._toucher is not None:  # first: it must not touch a lock file the next job creates
            self._toucher.kill()
            self._toucher.wait()
            self._toucher = None
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def die_with_parent(poll_s: float = 0.5) -> None:
    """A worker started by a launcher (torchrun, deepspeed) ends when the launcher dies, even by SIGKILL:
    a daemon thread polls the parent pid and, when it changes (re-parented), kills this process and the
    processes it forked."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(f"ramp: launcher (pid {parent}) is gone; worker {os.getpid()} exits", file=sys.stderr)
                kill_children()
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="ramp-parent-watch", daemon=True).start()
    os.register_at_fork(after_in_child=kill_me_with_parent)


def kill_me_with_parent() -> None:
    """In a process this worker forks (megatron's checkpoint writers): SIGKILL when the worker dies. A
    forked child has none of the worker's threads, so the watch above does not cover it, and a worker
    killed during a save would otherwise leave its writer waiting on a pipe forever (seen: an orphan from
    a killed rank, still alive an hour and a half later). A parent that died before this call sends no
    signal: the child then kills itself (the forking pid is noted just before every fork)."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere the orphan risk stays
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if _forked_by is not None and os.getppid() != _forked_by:  # the parent is already gone
            os.kill(os.getpid(), signal.SIGKILL)


_forked_by: int | None = None  # in a forked child: the pid of the process that forked it


def _note_forking_pid() -> None:
    global _forked_by
    _forked_by = os.getpid()


os.register_at_fork(before=_note_forking_pid)
