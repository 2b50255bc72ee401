"""Python's garbage collector on a fixed step cadence (Megatron-LM's ``--manual-gc``), GPU runs only.

Automatic collection starts at arbitrary moments, on every rank at a different one; a collective then
waits for the slowest rank. With ``gpu.manual_gc`` the automatic collector is off during training and
every rank collects at the same steps (``gpu.manual_gc_interval``; 0: once, at the start).
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

from launcher.callbacks.base import Callback

if TYPE_CHECKING:
    from launcher.trainer import Trainer


class ManualGC(Callback):
    name = "manual_gc"

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self._was_enabled = True

    def on_train_start(self, trainer: Trainer) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()
        gc.collect()

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.interval and trainer.state.step % self.interval == 0:
            gc.collect()

    def on_train_end(self, trainer: Trainer) -> None:
        if self._was_enabled:
            gc.enable()
