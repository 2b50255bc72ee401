"""Give dist_checkpointing's save a fork-started results queue.

``filesystem_async._get_write_results_queue`` starts a *spawn* multiprocessing Manager on first save.
Spawn re-imports ``__main__``, which re-runs an unguarded training script and deadlocks the save, and
costs 1-2 s per process even when guarded. A fork-context Manager queue, created once, avoids both.

The Manager ignores SIGTERM and SIGINT: Slurm's time-limit signal (``scancel --signal=TERM``, what
``ramp.sbatch`` sends) reaches every process of the job step, and a Manager that died of it took the
queue from the checkpoint the worker then saves. It still dies with its worker (``PR_SET_PDEATHSIG``
SIGKILL, ``runlock.kill_me_with_parent``); SIGINT it already ignores (CPython's manager server does).
"""

from __future__ import annotations

import multiprocessing
import signal
from multiprocessing.managers import SyncManager

from patches import Patch


def _needed() -> bool:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return hasattr(filesystem_async, "_results_queue") and filesystem_async._results_queue is None


def _ignore_stop_signals() -> None:
    from launcher.runlock import kill_me_with_parent

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kill_me_with_parent()  # also where no launcher registered it at fork (plain python, srun, tools)


def _apply() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    manager = SyncManager(ctx=multiprocessing.get_context("fork"))
    manager.start(initializer=_ignore_stop_signals)
    filesystem_async._results_queue = manager.Queue()


PATCH = Patch(
    name="async_save_queue",
    fixes="spawn Manager in dist_checkpointing save re-imports __main__ (deadlock, slow saves); "
    "a SIGTERM to the job step killed it before the save at SIGTERM",
    versions=">=0.16,<0.20",
    cpu_only=False,
    apply_fn=_apply,
    needed=_needed,
)
