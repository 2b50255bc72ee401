"""The global batch of every step, from the batch-size schedule, and the layout switch at a phase change.

At each step start the batch is the one of the phase the consumed tokens fall in
(``Derived.phase_at``, planned by ``laws/batch_size.py`` before any process started), and the LR rule's
factor for that batch goes into ``TrainState.lr_scale`` for the LR callback (which must run after this
one). When the phase's layout differs from the one being trained, the trainer switches layout in the same
processes (``Trainer.relayout``) and the step's metrics get the switch's timings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from launcher import layout
from launcher.callbacks.base import Callback
from launcher.trainer import SwitchTimes

if TYPE_CHECKING:
    from launcher.trainer import Trainer


def _slowest(times: SwitchTimes) -> SwitchTimes:
    """Each part's time on the slowest rank: the switch is over when every rank is, and every rank then
    records the same numbers (the checkpointed callback state must agree across ranks)."""
    parts = torch.tensor([times.save, times.teardown, times.rebuild, times.load], dtype=torch.float64)
    dist.all_reduce(parts, op=dist.ReduceOp.MAX)
    return SwitchTimes(*parts.tolist())


class BatchSizeSchedule(Callback):
    name = "batch_size_schedule"

    def __init__(self, lr_scale: Callable[[int], float]) -> None:
        self.lr_scale = lr_scale
        self.switches: list[dict[str, Any]] = []  # every layout switch of the run (kept across resumes)
        self._pending: dict[str, Any] = {}

    def on_train_start(self, trainer: Trainer) -> None:
        self._pending = {"process_groups": layout.live_process_groups()}

    def on_step_start(self, trainer: Trainer) -> None:
        st = trainer.state
        phase = trainer.derived.phase_at(st.consumed_tokens)
        if not phase.same_layout(trainer.phase):
            before = trainer.phase.describe_layout()
            switched = trainer.enter_phase(phase)
            if switched is not None:
                self._record_switch(trainer, before, _slowest(switched))
        if phase.batch != st.global_batch_size and dist.get_rank() == 0 and st.step > 0:
            print(f"ramp: step {st.step}: global batch {st.global_batch_size} -> {phase.batch}", flush=True)
        st.global_batch_size = phase.batch
        st.lr_scale = self.lr_scale(phase.batch)

    def _record_switch(self, trainer: Trainer, before: str, times: SwitchTimes) -> None:
        st = trainer.state
        record = {
            "step": st.step,
            "tokens": st.consumed_tokens,
            "from": before,
            "to": trainer.phase.describe_layout(),
            "switch_time_s": times.total,
            "switch_save_s": times.save,
            "switch_teardown_s": times.teardown,
            "switch_rebuild_s": times.rebuild,
            "switch_load_s": times.load,
        }
        self.switches.append(record)
        self._pending = {k: v for k, v in record.items() if k.startswith("switch_")}
        # equal to a fresh job's count in this layout: the old layout's groups were freed
        self._pending["process_groups"] = layout.live_process_groups()
        if dist.get_rank() == 0:
            print(
                f"ramp: step {st.step}: layout {before} -> {record['to']} in {times.total:.2f}s "
                f"(save {times.save:.2f}, teardown {times.teardown:.2f}, rebuild {times.rebuild:.2f}, "
                f"load {times.load:.2f})",
                flush=True,
            )

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        metrics["layout"] = trainer.phase.describe_layout()
        metrics["lr_scale"] = trainer.state.lr_scale
        metrics.update(self._pending)
        self._pending = {}

    def state_dict(self) -> dict[str, Any]:
        return {"switches": list(self.switches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.switches = list(state.get("switches", []))
