"""Loss-spike detection: the z-score of each step's loss against the previous ``window`` finite losses."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from launcher.callbacks.base import Callback

if TYPE_CHECKING:
    from launcher.trainer import Trainer

MIN_HISTORY = 10


class LossSpikes(Callback):
    """Adds ``loss_z`` to the step's metrics (the metrics callback logs it) and prints spikes."""

    name = "loss_spikes"

    def __init__(self, window: int, threshold: float) -> None:
        self.window, self.threshold = window, threshold
        self.history: list[float] = []

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        loss = metrics["loss"]
        if self.window and len(self.history) >= MIN_HISTORY:
            z = zscore(loss, self.history)
            metrics["loss_z"] = z
            if z > self.threshold and dist.get_rank() == 0:
                print(f"ramp: loss spike at step {trainer.state.step}: {loss:.4f}, z={z:.1f}", flush=True)
        if self.window and math.isfinite(loss):
            self.history = [*self.history, loss][-self.window :]

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))


def zscore(x: float, history: list[float]) -> float:
    n = len(history)
    mean = sum(history) / n
    var = sum((h - mean) ** 2 for h in history) / max(n - 1, 1)
    return (x - mean) / math.sqrt(var) if var > 0 else 0.0
