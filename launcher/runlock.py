"""One writer per run directory: a lock file naming its holder, and workers that die with their launcher.

``RUN_DIR/ramp.lock`` holds ``{"host", "pid", "started"}`` of the global rank 0 that owns the run. It is
created with O_EXCL; a second job finds it and stops with one line naming the holder. A lock is stale
(taken over) when its holder is on this host and that process is gone (or is another process that reused
the pid), or when its heartbeat (the file's mtime, touched every ``HEARTBEAT_S``) is older than
``STALE_AFTER_S``: a holder on a dead node.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
            self._thread = threading.Thread(target=self._heartbeat, name="ramp-lock", daemon=True)
            self._thread.start()
            return
        raise RampError(f"could not take the run lock {self.path}; another job races for it")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
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
    a killed rank, still alive an hour and a half later)."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere the orphan risk stays
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
