"""PNG plots beside the run at the end of training (and at every checkpoint but a layout switch's, so a long
run shows them)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from launcher.callbacks.base import Callback
from launcher.plots import plot_run

if TYPE_CHECKING:
    from launcher.trainer import Trainer


class Plots(Callback):
    name = "plots"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def _draw(self) -> None:
        metrics = self.run_dir / "metrics.jsonl"
        if dist.get_rank() == 0 and metrics.exists():
            plot_run(metrics, self.run_dir / "plots")

    def on_checkpoint_saved(self, trainer: Trainer, path: str) -> None:
        # Not at a layout switch's checkpoint: rank 0 drawing (seconds of matplotlib) would hold every rank
        # at the switch's next collective; the next checkpoint or the end of training draws.
        if not trainer.switching:
            self._draw()

    def on_train_end(self, trainer: Trainer) -> None:
        self._draw()
