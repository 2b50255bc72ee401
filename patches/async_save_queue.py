"""Give dist_checkpointing's save a fork-started results queue.

``filesystem_async._get_write_results_queue`` starts a *spawn* multiprocessing Manager on first save.
Spawn re-imports ``__main__``, which re-runs an unguarded training script and deadlocks the save, and
costs 1-2 s per process even when guarded. A fork-context Manager queue, created once, avoids both.
"""

from __future__ import annotations

import multiprocessing

from patches import Patch


def _needed() -> bool:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return hasattr(filesystem_async, "_results_queue") and filesystem_async._results_queue is None


def _apply() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


PATCH = Patch(
    name="async_save_queue",
    fixes="spawn Manager in dist_checkpointing save re-imports __main__ (deadlock, slow saves)",
    versions=">=0.16,<0.20",
    cpu_only=False,
    apply_fn=_apply,
    needed=_needed,
)
