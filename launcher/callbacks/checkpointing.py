"""Periodic and final checkpoints (also on SIGTERM, which the trainer turns into a clean stop)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.callbacks.base import Callback

if TYPE_CHECKING:
    from launcher.trainer import Trainer


class Checkpointing(Callback):
    name = "checkpointing"

    def __init__(self, interval: int, save_at_exit: bool) -> None:
        self.interval, self.save_at_exit = interval, save_at_exit
        self._saved_step = -1

    def on_train_start(self, trainer: Trainer) -> None:
        # A requeued finished run loads its last checkpoint: saving that step again would be a no-op at
        # best, so do not.
        loaded = trainer.loaded_from
        if loaded is not None and loaded.parent.resolve() == trainer.recipe.checkpoint_dir.resolve():
            self._saved_step = trainer.state.step

    def on_rewind(self, trainer: Trainer) -> None:
        self._saved_step = trainer.state.step  # the rewind saved it again, with the skipped window

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.state.step
        if self.interval and step % self.interval == 0:
            trainer.save_checkpoint()
            self._saved_step = step

    def on_train_end(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if trainer.last_saved and trainer.last_saved[0] == step:  # a relayout or probe pause saved it
            self._saved_step = step
        if self.save_at_exit and trainer.state.step != self._saved_step:
            trainer.save_checkpoint()
            self._saved_step = trainer.state.step
