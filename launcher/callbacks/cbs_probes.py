"""Online CBS probes: the run forks branches from itself while it trains, reads off the critical batch
size, and (``batch_schedule: {kind: cbs, cbs_source: probes}``) grows its batch by the newest estimate.

When: at the recipe's ``probes:`` grid (``laws.cbs.fork_points``). A fork happens at the start of the first
step after its point is reached, so the steps before it are logged and checkpointed as in any run, and the
decision applies to that step. This callback runs first at a step start, before the batch-size callback,
which then switches the batch (and the layout, when the new batch has another).

How: every rank pauses the run (``Trainer.pause``: checkpoint this step, free the layout); rank 0 runs the
fork's branches through ``launcher/probes.py`` (child jobs, one after another, in
``<run_dir>/probes/fork_<tokens>/k<k>``; the run's own checkpoints and metrics are only read) and every
rank receives the record. The run then continues from its checkpoint, as a resumed job would.

The decision: the doubling rule of 2505.23971 on the newest read-off (``laws.batch_size.cbs_decision``:
double while ``cbs_fraction * CBS > 2 * batch``, up to ``max_batch``), from this step on
(``laws.batch_size.grow_at``, ``Recipe.replan``). Under WSD, ``cbs_fraction < 1`` or
``probes.lr_schedule: decay`` corrects for the decay still to come (calibration.md, last section).

Resume: the checkpoint a fork is taken from holds this callback's state from before the fork, so a job
resumed from it finds the fork pending and runs it again (a leftover branch directory of the interrupted
attempt is replaced): the same branches from the same checkpoint, the same read-off, the same decision.
The decisions so far are in the state and re-applied at start. A failed branch or fork is recorded and
printed, and the run goes on at its batch.

Cost: ``probe_tokens`` (tokens trained by branches) and ``probe_cost_frac`` (those over the run's tokens)
are in every logged step, with the newest ``cbs``; ``probes/probes.jsonl`` has one record per fork and
``probes/cbs_vs_tokens.png`` the CBS over training with its fitted curve.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from launcher import probes
from launcher.callbacks.base import Callback
from launcher.laws.batch_size import BatchPhase, BatchScheduleConfig, cbs_decision, grow_at
from launcher.laws.cbs import ProbeConfig, fork_points

if TYPE_CHECKING:
    from launcher.trainer import Trainer

PROBES_DIR = "probes"


class CbsProbes(Callback):
    name = "cbs_probes"

    def __init__(self, cfg: ProbeConfig, run_dir: Path, train_tokens: int, drive: BatchScheduleConfig | None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.out_dir = self.run_dir / PROBES_DIR
        self.points = fork_points(cfg, train_tokens)
        self.drive = drive  # the batch schedule the decisions feed (kind=cbs, cbs_source=probes), or None
        self.records: list[dict[str, Any]] = []  # one per fork, in order (probes.jsonl's lines)
        self.phases: list[list[int]] | None = None  # the batch schedule the decisions made, [[tokens, batch]]
        self.done_until = 0  # fork points at or below this token count are done (or skipped)
        self._planned: list[list[int]] = []  # the recipe's plan, before any decision

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        phases = [list(p) for p in self.phases] if self.phases is not None else None
        return {"records": [dict(r) for r in self.records], "phases": phases, "done_until": self.done_until}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = list(state.get("records", []))
        self.phases = state.get("phases")
        self.done_until = int(state.get("done_until", 0))

    @property
    def probe_tokens(self) -> int:
        return sum(int(r.get("branch_tokens", 0)) for r in self.records)

    # -- hooks --------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        self._planned = [[p.start_tokens, p.batch] for p in trainer.derived.batch_schedule.phases]
        if self.phases is not None:  # resumed: the decisions taken before
            self._apply(trainer, self.phases)
        if dist.get_rank() == 0:
            if self.points:
                print(f"ramp: CBS probes at tokens {self.points}", flush=True)
            if self.records or (self.out_dir / probes.PROBES_FILE).exists():
                self._write_records()  # a resume from an earlier checkpoint forgets the later forks

    def on_rewind(self, trainer: Trainer) -> None:
        # the reloaded state's decisions (or none: the plan the run started with) replace the current ones
        phases = self.phases
        self._apply(trainer, phases if phases is not None else self._planned)
        self.phases = phases

    def on_step_start(self, trainer: Trainer) -> None:
        self._maybe_fork(trainer)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        metrics["probe_tokens"] = self.probe_tokens
        metrics["probe_cost_frac"] = self.probe_tokens / trainer.derived.train_tokens
        with_cbs = [r for r in self.records if r.get("cbs")]
        if with_cbs:
            metrics["cbs"] = with_cbs[-1]["cbs"]

    # -- forks ----------------------------------------------------------------------------------------------
    def _maybe_fork(self, trainer: Trainer) -> None:
        tokens = trainer.state.consumed_tokens
        due = [p for p in self.points if self.done_until < p <= tokens]
        if not due:
            return
        batch = trainer.state.global_batch_size
        cap = self.drive.max_batch if self.drive is not None else None
        if cap is not None and batch >= cap:  # nothing left to decide
            self.done_until = tokens
            return
        if trainer.agree_to_stop():  # a SIGTERM since the last host sync: no fork, the requeued job forks
            trainer.stop_requested = True
            return
        record = trainer.pause(lambda path: self._run_fork(trainer, path, tokens))
        if record.get("interrupted"):  # SIGTERM while branching: stop here, a requeued job forks again
            trainer.stop_requested = True
            if dist.get_rank() == 0:
                print(f"ramp: SIGTERM during the CBS probe at {tokens:,} tokens: stopping", flush=True)
            return
        record["step"] = trainer.state.step
        record["batch_before"] = batch
        record["batch_after"] = batch
        if self.drive is not None and record.get("cbs"):
            new = cbs_decision(batch, record["cbs"], self.drive.cbs_fraction, cap)
            record["batch_after"] = new
            if new != batch:
                schedule = grow_at(trainer.derived.batch_schedule, tokens, new)
                self._apply(trainer, [[p.start_tokens, p.batch] for p in schedule.phases])
        self.records.append(record)
        self.done_until = tokens
        if dist.get_rank() == 0:
            self._report(record)

    def _run_fork(self, trainer: Trainer, checkpoint: Path, tokens: int) -> dict[str, Any]:
        """Every rank: rank 0 runs the branches and tells the others the record (on a group of its own
        whose timeout covers the branches; the run's groups would time out while rank 0 trains them).
        A SIGTERM reaches the branches too, so a fork during which rank 0 got one is marked interrupted."""
        record: dict[str, Any] = {}
        if dist.get_rank() == 0:
            t0 = time.perf_counter()
            fork_dir = self.out_dir / probes.fork_dirname(tokens)
            shutil.rmtree(fork_dir, ignore_errors=True)  # an interrupted attempt at this fork
            try:
                record = probes.run_fork(
                    self.run_dir,
                    checkpoint,
                    self.out_dir,
                    self.cfg,
                    inside_run=True,
                    should_stop=lambda: trainer.signalled,
                )
            except Exception as e:  # a fork that cannot run is recorded; the run goes on at its batch
                record = {"tokens": tokens, "cbs": None, "error": f"{type(e).__name__}: {e}"}
            record["interrupted"] = trainer.signalled
            record["seconds"] = time.perf_counter() - t0  # rank 0's: every rank checkpoints the same state
        if dist.get_world_size() > 1:
            timeout = self.cfg.timeout_s * len(self.cfg.multipliers) + 600 if self.cfg.timeout_s else 86_400
            group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
            box = [record]
            dist.broadcast_object_list(box, src=0, group=group)
            dist.destroy_process_group(group)
            record = box[0]
        return record

    def _apply(self, trainer: Trainer, phases: list[list[int]]) -> None:
        """Train on with the batch phases ``phases`` (the batch callback switches at this step's start)."""
        schedule = dataclasses.replace(
            trainer.derived.batch_schedule, phases=tuple(BatchPhase(int(t), int(b)) for t, b in phases)
        )
        trainer.derived = trainer.recipe.replan(trainer.derived, schedule)
        self.phases = [list(p) for p in phases]

    def _write_records(self) -> None:
        """probes.jsonl is this state's records: a fork run again after a requeue is not listed twice."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / probes.PROBES_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def _report(self, record: dict[str, Any]) -> None:
        self._write_records()
        try:
            probes.fit_and_plot(self.out_dir, self.records)
        except Exception as e:  # a plot never stops training
            print(f"ramp: CBS plot failed: {e}", flush=True)
        what = record.get("error") or f"CBS {record.get('cbs')} sequences ({record.get('note', '')})"
        print(
            f"ramp: step {record['step']}: CBS probe at {record['tokens']:,} tokens: {what}; batch "
            f"{record['batch_before']} -> {record['batch_after']}; {record.get('branch_tokens', 0):,} branch "
            f"tokens in {record['seconds']:.1f}s",
            flush=True,
        )
