"""The training loop: megatron-core forward-backward schedules, optimizer step, evaluation, callbacks.

Everything that changes behaviour over the run (LR schedule, metrics, checkpoints, progress, plots) is a
callback; the loop only runs steps. The data position is the number of samples consumed, so a resume or
a change of the global batch never skips or repeats a sample.

Host syncs. A step waits on the device once: megatron's gradient norm (``.item()``), which clipping needs
and on which the bad-step guard decides before the optimizer steps. The losses (LM, MoE auxiliary) are
reduced across ranks on the device before it and read by the host right after it, so reading them costs no
further wait, and the guard and the loss-spike callback keep their per-step host values. The ranks' stop
agreement (a SIGTERM on any rank) and the completion of an asynchronous checkpoint are collectives with a
host read: they run only on the steps :meth:`Trainer.host_sync_due` names (every
``training.sync_interval`` steps, log, eval, checkpoint and last steps), the same steps on every rank.
Data: :class:`data.Prefetcher` reads the next step's micro-batches on a thread while a step trains;
each rank reads only the fields of its pipeline stage.
"""

from __future__ import annotations

import gc
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from launcher import checkpoint, data, gpu, layout, model, optim, parametrization, resilience
from launcher.callbacks.base import Callback
from launcher.errors import RampError, require
from launcher.laws.bad_steps import is_bad_batch
from launcher.laws.mup import MupTable
from launcher.laws.schedule import resolve_schedule
from launcher.recipe import Derived, PhasePlan, Recipe

T = TypeVar("T")


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    global_batch_size: int = 0
    lr_scale: float = 1.0  # the batch-size scheduler's LR rule, a factor on every group's peak LR
    extra: dict[str, Any] = field(default_factory=dict)


#: The names megatron's router records its losses under (``moe_router_load_balancing_type="aux_loss"``).
LOAD_BALANCING_LOSS, Z_LOSS = "load_balancing_loss", "z_loss"


def moe_loss_coeffs(m) -> dict[str, float]:
    """The MoE losses megatron's router records for this model in a training step, with the coefficient
    each enters the objective with: the load-balancing loss when its coefficient is positive, the z-loss
    when it has a coefficient."""
    coeffs = {LOAD_BALANCING_LOSS: m.moe_aux_loss_coeff, Z_LOSS: m.moe_z_loss_coeff}
    return {name: c for name, c in coeffs.items() if c is not None and c > 0}


#: Key marking a micro-batch whose loss is given NaN gradients (fault injection; not a data field).
NAN_IN_BACKWARD = "nan_in_backward"


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor, nan_in_backward: bool = False):
    losses = output.float().view(-1)
    mask = loss_mask.view(-1).float()
    total = torch.sum(losses * mask)
    loss = total / mask.sum()
    if nan_in_backward:  # fault injection (resilience.inject_nan_steps)
        loss = resilience.nan_in_backward(loss)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm_loss": loss.detach().clone(), "lm_sum": total.detach(), "tokens": mask.sum()}


def forward_step(data_iterator, chunk):
    """megatron-core's forward step: one micro-batch through one model chunk, and its loss function.
    A stage reads only its fields (``data.stage_fields``): a first stage has no labels, a last no tokens,
    a middle one nothing (the model takes its input from the previous stage, and its loss is not called)."""
    batch = next(data_iterator)
    output = chunk(batch.get("tokens"), batch.get("position_ids"), None, labels=batch.get("labels"))
    return output, partial(_loss_func, batch.get("loss_mask"), nan_in_backward=NAN_IN_BACKWARD in batch)


@dataclass
class SwitchTimes:
    """Seconds a layout switch spent in each part (``Trainer.relayout``)."""

    save: float = 0.0
    teardown: float = 0.0
    rebuild: float = 0.0
    load: float = 0.0

    @property
    def total(self) -> float:
        return self.save + self.teardown + self.rebuild + self.load


class Trainer:
    """Model chunks, optimizer and data of one run in one layout, and the loop over steps.

    ``recipe`` is the run's recipe as given; ``active`` is the same recipe in the layout of the batch
    phase being trained (``phase``), which is what the model, DDP and optimizer are built from.
    """

    def __init__(
        self,
        recipe: Recipe,
        derived: Derived,
        table: MupTable,
        callbacks: list[Callback] | None = None,
        phase: PhasePlan | None = None,
    ) -> None:
        self.recipe, self.derived = recipe, derived
        self.callbacks: list[Callback] = list(callbacks or [])
        names = [cb.name for cb in self.callbacks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        require(not dupes, f"callbacks share the name {', '.join(dupes)}: each needs its own checkpoint key")
        self.phase = phase or derived.phases[0]
        self.active = recipe.with_layout(self.phase.parallel, self.phase.micro_batch_size)
        self.state = TrainState(global_batch_size=self.phase.batch)
        self.table = table
        self._signalled = False  # set by SIGTERM on this rank
        self.stop_requested = False  # set only when all ranks agree, so every rank leaves at the same step
        self.last_eval: dict[str, float] = {}
        rs = recipe.resilience
        self.guard = resilience.BadStepGuard(rs.max_bad_steps, rs.on_bad_steps, rs.max_rewinds)
        self.loaded_from: Path | None = None
        self.last_saved: tuple[int, Path] | None = None  # (step, directory) of the newest complete save
        self.switching = False  # inside relayout: callbacks skip slow extras (plots) at its checkpoint
        self.prefetcher = data.Prefetcher(pin_memory=derived.device == "cuda")
        self.saves = checkpoint.AsyncSaves() if recipe.checkpoint.async_enabled(derived.device) else None
        self._build()

    # -- construction -------------------------------------------------------------------------------------
    def _build(self) -> None:
        r, d = self.recipe, self.derived
        self.bundle = data.build_datasets(
            r.data,
            seq_length=r.model.seq_length,
            seed=r.training.seed,
            train_samples=max(d.train_tokens, d.data_tokens) // r.model.seq_length,
            valid_samples=r.training.eval_samples,
        )
        tokenizer_vocab = self.bundle.tokenizer.vocab_size
        require(
            r.model.vocab_size is None or r.model.vocab_size >= tokenizer_vocab,
            f"model.vocab_size={r.model.vocab_size} is below the tokenizer's {tokenizer_vocab} tokens; "
            f"raise it or leave it unset",
        )
        schedule = resolve_schedule(r.schedule, d.train_tokens, d.tokens_per_step, d.warmup_tokens)
        self.fingerprint = resilience.fingerprint(r, self.bundle.index_key, schedule)
        self._build_model()

    def _build_model(self) -> None:
        """Process groups, model chunks, DDP and optimizer for ``self.active``'s layout."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        r, d = self.active, self.derived
        layout.init_parallel(r.parallel, r.training.seed)
        self.vocab_size = model.padded_vocab_size(
            r.model.vocab_size or self.bundle.tokenizer.vocab_size,
            r.model.make_vocab_size_divisible_by,
            r.parallel.tp,
        )
        self.config = model.transformer_config(r, d, self.table)
        self.config.finalize_model_grads_func = finalize_model_grads
        chunks = model.build_chunks(r, d, self.config, self.vocab_size)
        parametrization.apply(chunks, self.table, self.config)  # muP init and multipliers, before DDP
        self.chunks = model.wrap_ddp(r, d, self.config, chunks)
        self.gpu = gpu.resolve(r, d.device)
        self.config.no_sync_func = [c.no_sync for c in self.chunks]
        if len(self.chunks) == 1:
            self.config.no_sync_func = self.config.no_sync_func[0]
        self.optimizer = optim.build_optimizer(r, d, self.chunks, self.table)
        # The schedules take the micro-batch count per call (a batch change needs nothing else);
        # megatron's global micro-batch calculator is only read by CUDA graphs, which ramp does not use.
        self.forward_backward = get_forward_backward_func()

    def _teardown_model(self) -> None:
        """Drop model, optimizer and every process group of the layout (megatron's own teardown only
        forgets them: their gloo/NCCL communicators would leak at every switch)."""
        if self.recipe.model.is_moe:
            from megatron.core.transformer.moe import moe_utils

            moe_utils.clear_aux_losses_tracker()
            moe_utils.get_moe_layer_wise_logging_tracker().clear()  # it holds the old groups
        self.chunks = self.optimizer = self.config = self.forward_backward = None
        layout.destroy_parallel()
        # Megatron's modules hold reference cycles (DDP hooks, config.no_sync_func), and ManualGC turns the
        # automatic collector off: collect now, and hand the cached device memory back, so a paused run's
        # device is free for its probe branches and a new layout does not sit beside the old one.
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def enter_phase(self, phase: PhasePlan) -> SwitchTimes | None:
        """Train the next steps in ``phase``'s layout: a new micro-batch size needs nothing rebuilt (it only
        splits the data differently); a new TP/PP/EP/DP split is a :meth:`relayout` (its times returned)."""
        if phase.parallel == self.phase.parallel:
            self.phase = phase
            self.active = self.recipe.with_layout(phase.parallel, phase.micro_batch_size)
            return None
        return self.relayout(phase)

    def relayout(self, phase: PhasePlan) -> SwitchTimes:
        """Continue this run in ``phase``'s layout without restarting processes: checkpoint (a real one,
        so a crash after the switch resumes from it, and a fresh job loading it is the reference), tear
        the layout down, build the new one, load the checkpoint resharded into it."""
        times = SwitchTimes()
        t0 = time.perf_counter()
        path = self.checkpoint_now()
        t1 = time.perf_counter()
        self._teardown_model()
        t2 = time.perf_counter()
        self.phase = phase
        self.active = self.recipe.with_layout(phase.parallel, phase.micro_batch_size)
        self._build_model()
        t3 = time.perf_counter()
        self._reload(path)
        t4 = time.perf_counter()
        times.save, times.teardown, times.rebuild, times.load = t1 - t0, t2 - t1, t3 - t2, t4 - t3
        return times

    def pause(self, work: Callable[[Path], T]) -> T:
        """Collective: checkpoint this step, free the layout (model, optimizer, process groups: the device
        memory a child job needs), run ``work(checkpoint)`` on every rank, then rebuild the same layout and
        load the checkpoint. The run continues exactly as a job resumed from that checkpoint would; the CBS
        probes fork their branches from it while the run is paused."""
        path = self.checkpoint_now()
        self._teardown_model()
        try:
            return work(path)
        finally:
            self._build_model()
            self._reload(path)

    def checkpoint_now(self) -> Path:
        """Collective: a complete checkpoint of this step (saved now unless it exists), for :meth:`relayout`,
        :meth:`pause` and the CBS probes' forks. An asynchronous save is completed first: its writers and
        its finalisation use the layout's process groups."""
        self.switching = True  # also for a pending save completed here
        try:
            self.finish_saves()
            saved = self.last_saved
            if not (saved and saved[0] == self.state.step):
                self.save_checkpoint()
                self.finish_saves()
        finally:
            self.switching = False
        return self.last_saved[1]

    def _reload(self, path: Path) -> None:
        """Load the checkpoint just saved into the rebuilt layout; the state and the callbacks' in-memory
        state are this process's own (the loaded copies are the same)."""
        state = self.state
        checkpoint.load(path, self.chunks, self.optimizer)
        self.state = state

    # -- checkpoint interface --------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {
            "state": asdict(self.state),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "layout": layout.sizes(),
            "batch_schedule": self.derived.batch_schedule.to_dict(),  # as planned now (online decisions)
            "recipe": self.recipe.to_dict(),
            "fingerprint": self.fingerprint,
        }

    def save_checkpoint(self) -> Path:
        """Save this step. With ``checkpoint.async_save`` the files are written by a background process
        and the save completes (manifest, rename, ``latest``, ``on_checkpoint_saved``) at a later host-sync
        step or :meth:`finish_saves`; one save is in flight at a time. Returns the final directory."""
        gpu.gather_params(self.chunks, self.gpu)
        self.finish_saves()  # the previous save completes (and names `latest`) before this one starts
        step = self.state.step

        def saved(path: Path) -> None:
            self.last_saved = (step, path)
            for cb in self.callbacks:
                cb.on_checkpoint_saved(self, str(path))

        return checkpoint.save(
            self.recipe.checkpoint_dir,
            step,
            self.chunks,
            self.optimizer,
            self.trainer_state(),
            self.recipe.checkpoint.keep_last,
            checksums=self.recipe.checkpoint.checksums,
            saves=self.saves,
            on_saved=saved,
        )

    def finish_saves(self) -> None:
        """Collective: wait for an asynchronous save in flight and complete it (nothing without one)."""
        if self.saves is not None:
            self.saves.finish(blocking=True)

    def load_checkpoint(self, path: Path) -> Path:
        """Load ``path`` (from :func:`find_checkpoint`) on every rank, resharded into this layout."""
        ck = self.recipe.checkpoint
        if ck.branch and self.loaded_from is None:  # a rewind reloads the branch's own checkpoint
            resilience.check_branch_target(path, self.recipe.checkpoint_dir)
        stored = checkpoint.read_trainer_state(path)
        resilience.check_resume(stored.get("fingerprint"), self.fingerprint, ck.branch, path)
        # The run's own checkpoints (a resume, a requeue, a rewind) are whole and load whole:
        # checkpoint.load_optimizer=false is for starting from other weights (an HF import), not for
        # dropping Adam's state at every requeue of such a run.
        own = path.parent.resolve() == self.recipe.checkpoint_dir.resolve() and not stored.get("model_only")
        with_optimizer = ck.load_optimizer or own
        saved = checkpoint.load(path, self.chunks, self.optimizer, with_optimizer=with_optimizer)
        self.loaded_from = path
        self.state = TrainState(**saved["state"])
        if own:
            self.last_saved = (self.state.step, path)  # a switch or pause here need not save it again
        # The checkpoint carries the data position; the batch of the next step (and its LR factor) is the
        # batch schedule's at that position, set by its callback at every step start.
        for cb in self.callbacks:
            if cb.name in saved["callbacks"]:
                cb.load_state_dict(saved["callbacks"][cb.name])
        return path

    # -- steps ---------------------------------------------------------------------------------------------
    @property
    def dp(self) -> tuple[int, int]:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    def _batch_key(self, start: int, global_batch: int, micro_batch: int | None = None) -> data.BatchKey:
        from megatron.core import parallel_state as ps

        rank, size = self.dp
        first, last = ps.is_pipeline_first_stage(ignore_virtual=True), layout.is_last_stage()
        mbs = self.active.training.micro_batch_size if micro_batch is None else micro_batch
        return data.BatchKey(start, global_batch, mbs, rank, size, data.stage_fields(first, last))

    def _next_batch_key(self, start: int, global_batch: int) -> data.BatchKey | None:
        """The guess of the next step's key, made as this step starts: the next data position, and the
        batch of the phase there (None at the run's end or when a layout switch comes first)."""
        tokens = self.state.consumed_tokens + global_batch * self.recipe.model.seq_length
        if tokens >= self.derived.train_tokens:
            return None
        phase = self.derived.phase_at(tokens)
        if phase.parallel != self.phase.parallel:
            return None
        nxt = self.guard.position_after(self.state, start + global_batch)
        return self._batch_key(nxt, phase.batch, phase.micro_batch_size)

    def to_device(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        if self.derived.device == "cuda":  # pinned by the reader: the copies overlap
            return [{k: v.cuda(non_blocking=True) for k, v in b.items()} for b in batches]
        return batches

    def _train_batches(self, start: int, global_batch: int) -> list[dict[str, torch.Tensor]]:
        """This step's micro-batches (prefetched if the guess was right), and the next step's guess sent
        to the reader thread."""
        batches = self.prefetcher.get(self.bundle.train, self._batch_key(start, global_batch))
        nxt = self._next_batch_key(start, global_batch)
        if nxt is not None:
            self.prefetcher.prefetch(self.bundle.train, nxt)
        return self.to_device(batches)

    def _run(
        self, batches: list[dict[str, torch.Tensor]], forward_only: bool
    ) -> list[dict[str, torch.Tensor]]:
        iters = [iter(batches) for _ in self.chunks] if len(self.chunks) > 1 else iter(batches)
        return self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=iters,
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(batches),
            seq_length=self.recipe.model.seq_length,
            micro_batch_size=self.active.training.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self) -> dict[str, float]:
        """One optimizer step. Losses are reduced on the device; the host reads them right after the one
        wait a step has anyway (megatron's gradient norm, which clipping and the bad-step guard need)."""
        gbs = self.state.global_batch_size
        batches = self._train_batches(self.guard.data_position(self.state), gbs)
        if is_bad_batch(self.recipe.resilience.inject_nan_steps, self.state.consumed_samples, gbs):
            batches = [{**batches[0], NAN_IN_BACKWARD: True}, *batches[1:]]  # a copy: the reader's stays
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run(batches, forward_only=False)
        lm_dev = _reduce_over_last_stage([x["lm_loss"] for x in losses])
        aux_dev = self._moe_aux_sums()
        host: dict[str, Any] = {}

        def read_loss() -> float:
            host["lm"] = float(lm_dev)
            host["aux"] = self._moe_aux_losses(aux_dev, len(batches))
            return host["lm"] + sum(host["aux"].values())

        ok, grad_norm = self.guard.step(self.optimizer, read_loss, self.state)
        lm, aux = host["lm"], host["aux"]
        self.state.step += 1
        self.state.consumed_samples += gbs
        self.state.consumed_tokens += gbs * self.recipe.model.seq_length
        return {
            "loss": lm + sum(aux.values()),
            "lm_loss": lm,
            "aux_loss": aux.get(LOAD_BALANCING_LOSS, 0.0),
            **({"z_loss": aux[Z_LOSS]} if Z_LOSS in aux else {}),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_ok": float(bool(ok)),
            **self.guard.metrics(self.state),
        }

    def _moe_aux_sums(self) -> dict[str, torch.Tensor]:
        """This step's MoE loss sums over layers and micro-batches, reduced across ranks on the device.

        megatron's reduction is a collective over the pipeline group, so every rank reduces the same
        names: a stage without MoE layers (``first_k_dense`` covers it) records none, and gets megatron's
        own zero entries for them first, as Megatron-LM's ``track_moe_metrics`` does (without them that
        stage skipped the collective and the run hung in the next one)."""
        m = self.recipe.model
        if not m.is_moe:
            return {}
        from megatron.core import parallel_state
        from megatron.core.transformer.moe import moe_utils

        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        names = list(moe_loss_coeffs(m))
        for name in names:
            if name not in tracker:  # zeros over every layer, as the router's first record makes them
                # with the group the router records it with: the load-balancing loss is summed over
                # TP x CP (then averaged over DP), the z-loss not reduced; a dense stage reduces the same
                tp_cp = parallel_state.get_tensor_and_context_parallel_group()
                zero = torch.zeros((), device=self.derived.device)
                moe_utils.save_to_aux_losses_tracker(
                    name,
                    zero,
                    layer_number=1,
                    num_layers=m.num_layers,
                    reduce_group=tp_cp if name == LOAD_BALANCING_LOSS else None,
                )
        moe_utils.reduce_aux_losses_tracker_across_ranks(names)
        sums = {name: tracker[name]["values"].sum() for name in names}
        moe_utils.clear_aux_losses_tracker()
        return sums

    def _moe_aux_losses(self, sums: dict[str, torch.Tensor], num_microbatches: int) -> dict[str, float]:
        """MoE losses as added to the objective (with coefficients), mean over layers and micro-batches."""
        m = self.recipe.model
        n_moe = m.num_layers - m.first_k_dense
        coeffs = moe_loss_coeffs(m)
        return {name: coeffs[name] * (float(s) / n_moe / num_microbatches) for name, s in sums.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss on the fixed validation set: the same sequences, in one pass, at every evaluation, in every
        layout and at every batch size (the mean over tokens, so the micro-batch split does not matter)."""
        n = self.recipe.training.eval_samples
        if not n or self.bundle.valid is None:
            return {}
        for c in self.chunks:
            c.eval()
        key = self._batch_key(0, n)
        batches = data.microbatches(
            self.bundle.valid, 0, n, key.micro_batch, key.dp_rank, key.dp_size, key.fields
        )
        out = self._run(self.to_device(batches), forward_only=True)
        if self.recipe.model.is_moe:
            from megatron.core.transformer.moe import moe_utils

            moe_utils.clear_aux_losses_tracker()
        return {
            "val_loss": float(_reduce_over_last_stage([x["lm_sum"] for x in out], [x["tokens"] for x in out]))
        }

    # -- the loop ----------------------------------------------------------------------------------------
    def emit(self, hook: str, *args) -> None:
        """Call ``hook`` on every callback, in order (tools driving steps by hand call it too)."""
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    @property
    def done(self) -> bool:
        """The run has consumed its tokens (the last step of the last batch phase is behind it)."""
        return self.state.consumed_tokens >= self.derived.train_tokens

    def host_sync_due(self) -> bool:
        """Whether the step just done ends with the ranks' stop agreement (and the completion of an
        asynchronous save that has finished writing): every ``training.sync_interval`` steps, on logging,
        evaluation and checkpoint steps, and on the last step. A function of the step number only, so
        every rank meets the same collectives at the same steps."""
        s, t, every = self.state.step, self.recipe.training, self.recipe.checkpoint.interval
        due = (t.sync_interval, t.log_interval, t.eval_interval, every)
        return self.done or any(n and s % n == 0 for n in due)

    def agree_to_stop(self) -> bool:
        """Collective: whether any rank got SIGTERM (every rank gets the same answer)."""
        flag = torch.tensor([1.0 if self._signalled else 0.0])
        if self.derived.device == "cuda":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def step(self) -> None:
        """One step with its callbacks, evaluation when due, and the collective stop decision."""
        self.emit("on_step_start")
        if self.stop_requested:  # agreed by every rank inside a step-start callback (a paused run's stop)
            return
        t0 = time.perf_counter()
        try:
            metrics = self.train_step()
        except resilience.Rewind as bad:
            self.rewind(bad)
            return
        metrics["step_time"] = time.perf_counter() - t0
        self.emit("on_step_end", metrics)
        interval = self.recipe.training.eval_interval
        if interval and (self.state.step % interval == 0 or self.done):
            self._eval()
        if self.host_sync_due():
            if self.saves is not None:
                self.saves.finish(blocking=False)
            if self.agree_to_stop():
                self.stop_requested = True
                print(f"ramp: rank {dist.get_rank()}: stopping after step {self.state.step}", flush=True)

    def rewind(self, bad: resilience.Rewind) -> None:
        """Reload the last checkpoint and skip the bad steps' samples (resilience.on_bad_steps=rewind).
        The checkpoint is saved again with the skipped window in its state: a resume skips it too."""
        before = self.state
        self.finish_saves()  # the checkpoint to rewind to may be the one still being written
        path = find_checkpoint(self.recipe, "auto")
        if path is not None:
            self.load_checkpoint(path)
        self.guard.rewound(bad, before, self.state, path)
        self.save_checkpoint()
        self.emit("on_rewind")

    def _eval(self) -> None:
        self.last_eval = self.evaluate()
        if self.last_eval:
            self.emit("on_eval", self.last_eval)

    def fit(self) -> TrainState:
        """Train until the run's tokens are consumed (the batch may change on the way) or a stop."""
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self.emit("on_train_start")
            if self.recipe.training.eval_interval and self.state.step == 0:
                self._eval()  # the starting point of the validation curve
            while not self.done and not self.stop_requested:
                self.step()
            self.emit("on_train_end")
            self.finish_saves()  # the last checkpoint is complete, and named by `latest`, before exit
        finally:
            signal.signal(signal.SIGTERM, previous)
            for cb in self.callbacks:
                cb.close()
        return self.state

    @property
    def signalled(self) -> bool:
        """Whether this rank got SIGTERM (the ranks' agreement to stop comes later, at a host sync)."""
        return self._signalled

    def _on_sigterm(self, signum, frame) -> None:
        # Slurm sends SIGTERM before a time limit: finish the step, checkpoint, exit cleanly.
        self._signalled = True


def find_checkpoint(recipe: Recipe, spec: str | None = None) -> Path | None:
    """Collective: ``spec`` (default ``checkpoint.load``) resolved on rank 0 (verifying checksums) and told
    to every rank; None: start fresh (``auto`` with no checkpoint, or nothing to load)."""
    ck = recipe.checkpoint
    spec = ck.load if spec is None else spec
    if spec is None:
        return None
    found: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            found = [checkpoint.resolve(spec, recipe.checkpoint_dir, verify_checksums=ck.checksums)]
        except RampError as e:
            found = [e]
    dist.broadcast_object_list(found, src=0)
    if isinstance(found[0], RampError):
        raise found[0]
    return found[0]


def resume_tokens(path: Path | None) -> int:
    """Tokens consumed at checkpoint ``path`` (0 without one): where the run continues, which fixes the
    batch phase (and layout) to build."""
    if path is None:
        return 0
    return int(checkpoint.read_trainer_state(path)["state"]["consumed_tokens"])


def _reduce_over_last_stage(
    values: list[torch.Tensor], weights: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """Mean over micro-batches and DP ranks, made visible on every rank (only last stages hold losses),
    as a 0-d tensor on the device: nothing waits for it until the host reads it.
    With ``weights`` (token counts), ``values`` are sums and the result is their total over the weights'."""
    last = layout.is_last_stage()
    have = last and bool(values)
    # NCCL reduces CUDA tensors. The constants are made there: a pageable host-to-device copy is one more
    # synchronising call per step (measured on a GPU, tools/gpu_smoke.py); the losses already are.
    dev = torch.device("cuda") if torch.cuda.is_available() and dist.get_backend() == "nccl" else None
    if weights is None:
        num = torch.stack(values).float().mean() if have else torch.zeros((), device=dev)
        den = torch.ones((), device=dev)
    else:
        num = torch.stack(values).float().sum() if have else torch.zeros((), device=dev)
        den = torch.stack(weights).float().sum() if have else torch.zeros((), device=dev)
    if dev is not None:
        num, den = num.to(dev), den.to(dev)
    buf = torch.stack([num * float(last), den * float(last)])
    dist.all_reduce(buf)
    return buf[0] / buf[1]
