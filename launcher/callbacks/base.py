"""The callback protocol: every training-time behaviour hooks into the loop here, never inside it.

The trainer calls the hooks in list order on every rank; names are unique (the trainer refuses two
callbacks with one name). A callback that keeps state across a resume
returns it from ``state_dict`` (plain Python values); the checkpoint stores it under the callback's
``name`` and hands it back through ``load_state_dict`` before training continues.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launcher.trainer import Trainer


class Callback:
    name: str = "callback"

    def on_train_start(self, trainer: Trainer) -> None:
        """After model, optimizer, data and any checkpoint are loaded; before the first step."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before forward-backward of step ``trainer.state.step``: set LR, batch size, layout."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After the optimizer step; ``trainer.state`` already counts the step."""

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After a validation pass."""

    def on_checkpoint_saved(self, trainer: Trainer, path: str) -> None:
        """After a checkpoint is complete and ``latest`` points at it."""

    def on_rewind(self, trainer: Trainer) -> None:
        """After bad steps made the trainer reload its last checkpoint mid-run (``trainer.state`` is the
        checkpoint's, its callback states loaded); the steps after it are trained again."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step, or when a stop was requested (SIGTERM)."""

    def close(self) -> None:
        """Release files and writers; called from ``fit``'s ``finally``, so also after an error."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
