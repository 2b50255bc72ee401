"""Learning rate from tokens consumed: each param group at its peak (muP multiplier) times the schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from launcher import optim
from launcher.callbacks.base import Callback
from launcher.laws.schedule import TokenSchedule

if TYPE_CHECKING:
    from launcher.trainer import Trainer


class LRSchedule(Callback):
    """Stateless by design: the LR is a function of consumed tokens, which the trainer state carries.

    So a resume, a batch-size change or a branched decay (a new schedule from a stable-phase checkpoint)
    needs nothing restored; the schedule in force is the one in the recipe.
    """

    name = "lr_schedule"

    def __init__(self, schedule: TokenSchedule) -> None:
        self.schedule = schedule

    def on_step_start(self, trainer: Trainer) -> None:
        optim.set_lr(trainer.optimizer, self.schedule.factor(trainer.state.consumed_tokens))

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.describe()}
