"""Online CBS probes: the run forks branches from itself while it trains, reads off the critical batch
size, and (``batch_schedule: {kind: cbs, cbs_source: probes}``) grows its batch by the newest estimate.

When: at the recipe's ``probes:`` grid (``laws.cbs.fork_points``). A fork happens at the start of the first
step after its point is reached, so the steps before it are logged and checkpointed as in any run. This
callback runs first at a step start, before the batch-size callback, which then switches the batch (and the
layout, when the new batch has another).

The run as the k = 1 branch (``probes.reference: run``, the default, where it can be: multipliers start at
1, branches hold the fork's LR and are read off on the fixed validation set, and over the branch's tokens
the run's LR and batch do not move and the run does not end): the k = 1 branch would train the run's own
next sequences at the run's batch and LR, so the run *is* that branch. At the fork the run checkpoints and
keeps that checkpoint under ``probes/fork_<tokens>/checkpoint`` (hard links); it trains on, evaluating
where a k = 1 branch would (``probes.eval_steps``; an evaluation the run makes there anyway counts); once
it has trained the branch's tokens it pauses, runs the other branches from the kept checkpoint, reads off
with its own loss as k = 1, and the decision applies from there. One child job fewer per fork; the
decision comes a branch length later. Fork points inside that window are folded into the fork. A rewind
(bad steps) inside it skips sequences, so the run stops being the branch and a k = 1 child job runs.
Otherwise (``reference: branch``) the fork pauses at its point, runs every branch, and decides at once.

How: every rank pauses the run (``Trainer.pause``: checkpoint this step, free the layout); rank 0 runs the
fork's branches through ``launcher/probes.py`` (child jobs, one after another, in
``<run_dir>/probes/fork_<tokens>/k<k>``; the run's own checkpoints and metrics are only read) and every
rank receives the record. The run then continues from its checkpoint, as a resumed job would.

The decision: the doubling rule of 2505.23971 on the newest read-off (``laws.batch_size.cbs_decision``:
double while ``cbs_fraction * CBS > 2 * batch``, up to ``max_batch``), from this step on
(``laws.batch_size.grow_at``, ``Recipe.replan``). Under WSD, ``cbs_fraction < 1`` or
``probes.lr_schedule: decay`` corrects for the decay still to come (calibration.md, last section).

Resume: a checkpoint holds this callback's state as of its step. One taken at a fork holds the state from
before it, so a job resumed from it forks again (a leftover branch directory of the interrupted attempt
is replaced): the same branches from the same checkpoint, the same read-off, the same decision. One taken
while the run is the k = 1 branch holds the pending fork and the evaluations so far; the resumed job
evaluates the missing points on the same weights. The decisions so far are in the state and re-applied at
start. A failed branch or fork is recorded and printed, and the run goes on at its batch.

Cost: ``probe_tokens`` (tokens trained by branches), ``probe_eval_tokens`` (tokens their evaluations and
the run's extra k = 1 evaluations ran forward) and ``probe_cost_frac`` (the probes' compute over the run's,
an evaluated token counting a third of a trained one) are in every logged step, with the newest ``cbs``;
``probes/probes.jsonl`` has one record per fork and ``probes/cbs_vs_tokens.png`` the CBS over training
with its fitted curve.
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
from launcher.laws import cbs as cbs_law
from launcher.laws.batch_size import (
    BatchPhase,
    BatchScheduleConfig,
    cbs_decision,
    deciding_multipliers,
    grow_at,
)
from launcher.laws.cbs import ProbeConfig, fork_points

if TYPE_CHECKING:
    from launcher.laws.schedule import TokenSchedule
    from launcher.trainer import Trainer

PROBES_DIR = "probes"
FORK_CHECKPOINT = "checkpoint"  # a pending fork's kept checkpoint, under its directory


class CbsProbes(Callback):
    name = "cbs_probes"

    def __init__(
        self,
        cfg: ProbeConfig,
        run_dir: Path,
        train_tokens: int,
        drive: BatchScheduleConfig | None,
        schedule: TokenSchedule | None = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.out_dir = self.run_dir / PROBES_DIR
        self.points = fork_points(cfg, train_tokens)
        self.drive = drive  # the batch schedule the decisions feed (kind=cbs, cbs_source=probes), or None
        self.schedule = schedule  # the run's LR schedule (None: the run is never the k = 1 branch)
        self.records: list[dict[str, Any]] = []  # one per fork, in order (probes.jsonl's lines)
        self.phases: list[list[int]] | None = None  # the batch schedule the decisions made, [[tokens, batch]]
        self.done_until = 0  # fork points at or below this token count are done (or skipped)
        self.pending: dict[str, Any] | None = None  # a fork whose k = 1 branch the run is training
        self.evals = 0  # the run's own validation passes (the denominator of the cost)
        self._planned: list[list[int]] = []  # the recipe's plan, before any decision

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        phases = [list(p) for p in self.phases] if self.phases is not None else None
        return {
            "records": [dict(r) for r in self.records],
            "phases": phases,
            "done_until": self.done_until,
            "pending": dict(self.pending) if self.pending is not None else None,
            "evals": self.evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = list(state.get("records", []))
        self.phases = state.get("phases")
        self.done_until = int(state.get("done_until", 0))
        self.pending = state.get("pending")
        self.evals = int(state.get("evals", 0))

    @property
    def probe_tokens(self) -> int:
        return sum(int(r.get("branch_tokens", 0)) for r in self.records)

    def cost(self, trainer: Trainer) -> dict[str, float]:
        """The probes' compute against the run's: trained tokens, plus evaluated tokens at a third of a
        trained token (a forward pass without the backward)."""
        seq, n_eval = trainer.recipe.model.seq_length, trainer.recipe.training.eval_samples
        pending = self.pending["extra_evals"] if self.pending is not None else 0  # in no record yet
        evaluated = sum(int(r.get("eval_tokens", 0)) for r in self.records) + pending * n_eval * seq
        run = trainer.derived.train_tokens + self.evals * n_eval * seq / 3
        return {
            "probe_tokens": self.probe_tokens,
            "probe_eval_tokens": evaluated,
            "probe_cost_frac": (self.probe_tokens + evaluated / 3) / run,
        }

    # -- hooks --------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        self._planned = [[p.start_tokens, p.batch] for p in trainer.derived.batch_schedule.phases]
        if self.phases is not None:  # resumed: the decisions taken before
            self._apply(trainer, self.phases)
        if dist.get_rank() == 0:
            self._drop_kept_checkpoints()  # those of forks decided before this state
            if self.points:
                print(f"ramp: CBS probes at tokens {self.points}", flush=True)
            if self.records or (self.out_dir / probes.PROBES_FILE).exists():
                self._write_records()  # a resume from an earlier checkpoint forgets the later forks

    def on_rewind(self, trainer: Trainer) -> None:
        # the reloaded state's decisions (or none: the plan the run started with) replace the current ones
        phases = self.phases
        self._apply(trainer, phases if phases is not None else self._planned)
        self.phases = phases
        p = self.pending
        if p is not None and trainer.state.consumed_tokens < p["tokens"] + p["budget"]:
            p["run_is_k1"] = False  # the run skips bad sequences inside the window: no longer the branch

    def on_checkpoint_saved(self, trainer: Trainer, path: str) -> None:
        if dist.get_rank() == 0:
            self._drop_kept_checkpoints()

    def on_step_start(self, trainer: Trainer) -> None:
        if self.pending is not None:
            self._follow_pending(trainer)
        else:
            self._maybe_fork(trainer)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        metrics.update(self.cost(trainer))
        with_cbs = [r for r in self.records if r.get("cbs")]
        if with_cbs:
            metrics["cbs"] = with_cbs[-1]["cbs"]

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.evals += 1
        p = self.pending
        if p is not None and trainer.state.consumed_tokens in p["eval_tokens"]:
            p["evals"][str(trainer.state.consumed_tokens)] = metrics["val_loss"]

    def _drop_kept_checkpoints(self) -> None:
        """Rank 0: delete the kept checkpoints of decided forks, once a checkpoint without their pending
        state is complete (a resume from the decision step's own checkpoint runs the fork's branches again
        from the kept one); the pending fork's stays."""
        keep = self._kept_checkpoint(self.pending["tokens"]) if self.pending is not None else None
        for kept in self.out_dir.glob(f"fork_*/{FORK_CHECKPOINT}"):
            if kept != keep:
                shutil.rmtree(kept, ignore_errors=True)

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
        cfg = self._fork_cfg(batch)
        if cfg is None:  # no outcome of any branch would change the batch
            self.done_until = tokens
            if dist.get_rank() == 0:
                print(f"ramp: CBS probe at {tokens:,} tokens skipped: no multiplier can grow batch {batch}")
            return
        budget = probes.budget_tokens(cfg, batch, trainer.recipe.model.seq_length)
        if self._run_can_be_k1(trainer, cfg, tokens, budget):
            self._start_pending(trainer, cfg, budget)
            return
        if trainer.agree_to_stop():  # a SIGTERM since the last host sync: no fork, the requeued job forks
            trainer.stop_requested = True
            return
        record = trainer.pause(lambda path: self._run_fork(trainer, cfg, path, tokens))
        self._decide(trainer, record, batch)

    def _fork_cfg(self, batch: int) -> ProbeConfig | None:
        """The probe settings of a fork at ``batch``: with ``deciding_only`` in a run the decisions drive,
        only the multipliers that can change the decision (None: none can)."""
        if self.drive is None or not self.cfg.deciding_only:
            return self.cfg
        ks = deciding_multipliers(self.cfg.multipliers, batch, self.drive.cbs_fraction, self.drive.max_batch)
        return dataclasses.replace(self.cfg, multipliers=ks) if len(ks) > 1 else None

    def _run_can_be_k1(self, trainer: Trainer, cfg: ProbeConfig, tokens: int, budget: int) -> bool:
        """Whether the run's next ``budget`` tokens are the k = 1 branch of a fork here: the read-off is
        the final validation loss (which the run can evaluate at the branch's points), the branch holds the
        fork's LR and the run's LR does not move over those tokens, the batch does not change, no decision
        would be too late to matter (the run goes on past them)."""
        r, st = trainer.recipe, trainer.state
        if (
            cfg.reference != "run"
            or cfg.multipliers[0] != 1
            or cfg.lr_schedule != "hold"
            or cfg.rule != "val"
            or cfg.extra_sets  # the branches train with overrides the run does not have
        ):
            return False
        if (
            self.schedule is None
            or not r.training.eval_samples
            or tokens + budget >= trainer.derived.train_tokens
        ):
            return False
        # this step's batch (the batch callback, after this one, may switch at a phase start) and no phase
        # start before the window's end
        if trainer.derived.phase_at(tokens).batch != st.global_batch_size:
            return False
        if any(tokens < p.start_tokens < tokens + budget for p in trainer.derived.phases):
            return False
        per_step = st.global_batch_size * r.model.seq_length
        lr = self.schedule.factor(tokens)
        return all(
            self.schedule.factor(t) == lr for t in range(tokens + per_step, tokens + budget + 1, per_step)
        )

    def _start_pending(self, trainer: Trainer, cfg: ProbeConfig, budget: int) -> None:
        """Fork here with the run as the k = 1 branch: keep this step's checkpoint for the other branches
        (hard links under the fork's directory: the run's retention may delete its own copy), note where
        a k = 1 branch would evaluate, and train on; the branches run once the run has trained ``budget``."""
        st, seq = trainer.state, trainer.recipe.model.seq_length
        path = trainer.checkpoint_now()  # holds this callback's state from before the fork
        base = self._kept_checkpoint(st.consumed_tokens)
        if dist.get_rank() == 0:
            shutil.rmtree(base.parent, ignore_errors=True)  # an interrupted attempt at this fork
            probes.keep_checkpoint(path, base)
        steps = budget // (st.global_batch_size * seq)
        at = probes.eval_steps(st.step, steps, cfg.evals)
        self.pending = {
            "tokens": st.consumed_tokens,
            "batch": st.global_batch_size,
            "budget": budget,
            "eval_tokens": [st.consumed_tokens + (s - st.step) * st.global_batch_size * seq for s in at],
            "evals": {},  # str(tokens): val loss
            "extra_evals": 0,  # evaluations run for the read-off only (probe compute)
            "run_is_k1": True,
        }
        self.done_until = st.consumed_tokens

    def _kept_checkpoint(self, tokens: int) -> Path:
        """Where a pending fork at ``tokens`` keeps its checkpoint (under the run directory, by name: a
        moved run directory keeps working)."""
        return self.out_dir / probes.fork_dirname(tokens) / FORK_CHECKPOINT

    def _follow_pending(self, trainer: Trainer) -> None:
        """Evaluate the run where a k = 1 branch would (unless the run evaluated there anyway); at the end
        of the branch's tokens, run the other branches from the kept checkpoint and decide."""
        p, tokens = self.pending, trainer.state.consumed_tokens
        if tokens in p["eval_tokens"] and str(tokens) not in p["evals"]:
            p["evals"][str(tokens)] = trainer.evaluate()["val_loss"]
            p["extra_evals"] += 1
        if tokens < p["tokens"] + p["budget"]:
            return
        if trainer.agree_to_stop():  # as for any fork: the requeued job runs the branches
            trainer.stop_requested = True
            return
        reference = None
        if (
            p["run_is_k1"]
            and len(p["evals"]) == len(p["eval_tokens"])
            and tokens == p["tokens"] + p["budget"]
        ):
            series = sorted((int(t), v) for t, v in p["evals"].items())
            reference = cbs_law.branch_loss("val", [], series)
        checkpoint, cfg = self._kept_checkpoint(p["tokens"]), self._fork_cfg(p["batch"])
        extra = p["extra_evals"] if reference is not None else 0
        record = trainer.pause(
            lambda _: self._run_fork(trainer, cfg, checkpoint, p["tokens"], reference, extra)
        )
        self._decide(trainer, record, p["batch"])
        if not record.get("interrupted"):
            self.pending = None  # its kept checkpoint goes once a checkpoint of this state is complete

    def _decide(self, trainer: Trainer, record: dict[str, Any], batch: int) -> None:
        """Apply a fork's read-off from this step on (or stop, if a SIGTERM interrupted it)."""
        tokens = trainer.state.consumed_tokens
        if record.get("interrupted"):  # SIGTERM while branching: stop here, a requeued job forks again
            trainer.stop_requested = True
            if dist.get_rank() == 0:
                print(f"ramp: SIGTERM during the CBS probe at {tokens:,} tokens: stopping", flush=True)
            return
        record.setdefault("step", trainer.state.step)  # the fork's step (run_fork's record has it)
        record["decided_at_step"] = trainer.state.step
        record["decided_at_tokens"] = tokens
        record["batch_before"] = batch
        record["batch_after"] = batch
        if self.drive is not None and record.get("cbs"):
            new = cbs_decision(batch, record["cbs"], self.drive.cbs_fraction, self.drive.max_batch)
            record["batch_after"] = new
            if new != batch:
                schedule = grow_at(trainer.derived.batch_schedule, tokens, new)
                self._apply(trainer, [[p.start_tokens, p.batch] for p in schedule.phases])
        self.records.append(record)
        self.done_until = tokens
        if dist.get_rank() == 0:
            self._report(record)

    def _run_fork(
        self,
        trainer: Trainer,
        cfg: ProbeConfig,
        checkpoint: Path,
        tokens: int,
        reference: tuple[float, float | None] | None = None,
        reference_evals: int = 0,
    ) -> dict[str, Any]:
        """Every rank: rank 0 runs the branches and tells the others the record (on a group of its own
        whose timeout covers the branches; the run's groups would time out while rank 0 trains them).
        A SIGTERM reaches the branches too, so a fork during which rank 0 got one is marked interrupted."""
        record: dict[str, Any] = {}
        if dist.get_rank() == 0:
            t0 = time.perf_counter()
            fork_dir = self.out_dir / probes.fork_dirname(tokens)
            for old in fork_dir.glob("k*"):  # an interrupted attempt at this fork's branches
                shutil.rmtree(old, ignore_errors=True)
            try:
                record = probes.run_fork(
                    self.run_dir,
                    checkpoint,
                    self.out_dir,
                    cfg,
                    inside_run=True,
                    should_stop=lambda: trainer.signalled,
                    reference=reference,
                    reference_evals=reference_evals,
                )
            except Exception as e:  # a fork that cannot run is recorded; the run goes on at its batch
                record = {"tokens": tokens, "cbs": None, "error": f"{type(e).__name__}: {e}"}
            record["interrupted"] = trainer.signalled
            record["seconds"] = time.perf_counter() - t0  # rank 0's: every rank checkpoints the same state
        if dist.get_world_size() > 1:
            timeout = cfg.timeout_s * len(cfg.multipliers) + 600 if cfg.timeout_s else 86_400
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
