"""Learning rate from tokens consumed: each param group at its peak (muP multiplier) times the schedule.

The batch-size schedule's LR rule (sqrt or linear in the batch) multiplies it: ``TrainState.lr_scale``, set
by ``callbacks/batch_size_schedule.py`` before this callback runs and carried in checkpoints.

A step's LR is the schedule at the tokens the run will have consumed *after* that step: the first step
trains at ``factor(tokens of one step)``, not at the warmup floor ``factor(0)`` (0 by default, a wasted
step), and the last step of a decay lands exactly on the decay's end value. The weight decay of every
group is written with the LR (``optim.apply_schedule``).
"""

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
        st = trainer.state
        tokens_after = st.consumed_tokens + st.global_batch_size * trainer.recipe.model.seq_length
        factor = self.schedule.factor(tokens_after) * st.lr_scale  # lr_scale: the batch schedule's LR rule
        optim.apply_schedule(trainer.optimizer, factor, trainer.recipe.optimizer.weight_decay)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.describe()}
