"""Resume consistency and bad steps.

A checkpoint's data position (``consumed_samples``) indexes an order fixed by the data, the split, the
seed and the sequence length, and its step sits on a schedule fixed in tokens: :func:`fingerprint` names
those values and :func:`check_resume` refuses a resume that changes one, unless the run is a branch.
:class:`BadStepGuard` skips an update whose loss or gradient norm is not finite (exactly: the optimizer is
not stepped, so weights and Adam moments stay as they were); after too many in a row it stops the run, or
has the trainer rewind to the last checkpoint and skip the bad steps' samples for good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist

from launcher.errors import RampError
from launcher.laws import bad_steps
from launcher.optim import step_with_grad_norm


class RunStopped(RuntimeError):
    """The run cannot go on (not a user-input problem): printed as one line, exit 3."""


def fingerprint(recipe, data_key: str, schedule) -> dict[str, Any]:
    """Everything that fixes the data order, the LR schedule and the batch schedule (which sets each step's
    batch and LR factor), as flat ``section.key`` fields. The batch schedule's layouts are left out: a
    layout changes how a step is computed, not which step it is."""
    fp: dict[str, Any] = {
        "data.paths": recipe.data.paths,
        "data.tokenizer": recipe.data.tokenizer,
        "data.split": recipe.data.split,
        "data.max_epochs": recipe.data.max_epochs,
        "data.content": data_key,
        "training.seed": recipe.training.seed,
        "model.seq_length": recipe.model.seq_length,
        "optimizer.lr": recipe.optimizer.lr,
    }
    for k, v in dataclasses.asdict(recipe.batch_schedule).items():
        if k != "layouts":
            fp[f"batch_schedule.{k}"] = v
    if recipe.batch_schedule.cbs_source == "probes":  # the probes decide the batch: what they measure too
        for k, v in dataclasses.asdict(recipe.probes).items():
            if k not in ("nproc", "timeout_s"):
                fp[f"probes.{k}"] = v
    points = schedule.to_dict()
    # Lengthening a run is fine while the schedule's points stay put; without a decay (constant) the
    # decay points are only the run's end.
    ignored = {"total_tokens"} | ({"decay_start", "decay_end"} if points.get("shape") == "none" else set())
    for k, v in points.items():
        if k not in ignored:
            fp[f"schedule.{k}"] = v
    return fp


def check_resume(
    saved: dict[str, Any] | None, current: dict[str, Any], branch: bool, path: Path
) -> list[str]:
    """The fields that differ; a RampError naming the first unless ``branch``."""
    if saved is None:  # a checkpoint from before fingerprints (or ramp-convert): nothing to compare
        return []
    changed = [k for k in sorted(set(saved) | set(current)) if _plain(saved.get(k)) != _plain(current.get(k))]
    if changed and not branch:
        k = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:])})" if len(changed) > 1 else ""
        raise RampError(
            f"resuming {path} changes {k}: the checkpoint has {saved.get(k)!r}, this run {current.get(k)!r}"
            f"{more}; restore it, or branch into a new logging.run_dir with checkpoint.branch=true"
        )
    return changed


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def check_branch_target(loaded: Path, checkpoint_dir: Path) -> None:
    """A branch writes into its own run directory: never beside the checkpoint it starts from."""
    if loaded.resolve().parent == checkpoint_dir.resolve():
        raise RampError(
            f"checkpoint.branch=true but {loaded} is in this run's checkpoint directory; a branch writes its "
            f"checkpoints and metrics elsewhere: set logging.run_dir to a new directory"
        )


class _NaNInBackward(torch.autograd.Function):
    """Identity forward; a NaN gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()  # not a view: megatron divides the loss in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def nan_in_backward(loss: torch.Tensor) -> torch.Tensor:
    """Fault injection: ``loss`` unchanged, but its gradients NaN, as an overflow in the backward pass
    makes them: the NaN goes through the pipeline and the data-parallel reduction like a real one."""
    return _NaNInBackward.apply(loss)


class Rewind(Exception):
    """Raised by :class:`BadStepGuard` (policy ``rewind``): the trainer reloads the last checkpoint and
    skips ``window``, the data positions [start, end) of the bad steps."""

    def __init__(self, step_no: int, window: tuple[int, int], what: str) -> None:
        super().__init__(f"step {step_no}: {what}")
        self.step_no, self.window = step_no, window


class BadStepGuard:
    """Decides before the optimizer step; keeps its counts, and the data windows rewinds skipped, in the
    trainer state (so they resume). ``policy`` is what ``max_in_a_row`` non-finite steps in a row do:
    ``stop`` the run, or ``rewind`` to the last checkpoint and skip those steps' samples (at most
    ``max_rewinds`` times)."""

    def __init__(self, max_in_a_row: int, policy: str = "stop", max_rewinds: int = 0) -> None:
        self.max_in_a_row, self.policy, self.max_rewinds = max_in_a_row, policy, max_rewinds

    def data_position(self, state) -> int:
        """The position to train the next step from, past any skipped window (a resume keeps skipping)."""
        state.consumed_samples = bad_steps.past_skipped(state.consumed_samples, _windows(state))
        return state.consumed_samples

    def position_after(self, state, position: int) -> int:
        """The position a step would train from after ``position`` (past any skipped window); no change."""
        return bad_steps.past_skipped(position, _windows(state))

    def step(self, optimizer, read_loss: Callable[[], float], state) -> tuple[bool, float | None]:
        """Step ``optimizer`` unless the loss or the global grad norm is non-finite. Returns
        (updated, grad_norm). The norm computed here is the one the update clips by
        (:func:`launcher.optim.step_with_grad_norm`): one norm per step, as in megatron's own step. The
        loss is read (``read_loss``) after the norm: megatron's norm already waits for the device
        (``.item()``), so reading the loss, reduced before it, waits for nothing more."""
        counts = state.extra.setdefault("bad_steps", {"total": 0, "in_a_row": 0})
        # megatron's overflow flag: fp16 loss scaling only, which ramp does not offer (bf16/fp32 never set
        # it); an fp16 option would have to keep the loss scale's early back-off out of the bad-step counts
        if optimizer.prepare_grads():
            norm = math.inf
        else:
            norm = optimizer.get_grad_norm()
            norm = float(norm) if norm is not None else None
        loss = read_loss()
        if not math.isfinite(loss):
            norm = None  # the loss names the step's fault; its norm is not reported
        step_no = state.step + 1
        if norm is not None and math.isfinite(norm) and math.isfinite(loss):
            require_ok(step_with_grad_norm(optimizer, norm), step_no)
            counts["in_a_row"] = 0
            return True, norm
        if counts["in_a_row"] == 0:
            counts["from"] = state.consumed_samples  # where the bad run's samples start
        counts["total"] += 1
        counts["in_a_row"] += 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"grad norm {norm}"
        if dist.get_rank() == 0:
            print(f"ramp: step {step_no}: {what}; update skipped ({counts['total']} so far)", flush=True)
        if counts["in_a_row"] >= self.max_in_a_row:
            in_a_row = f"{counts['in_a_row']} non-finite steps in a row ({what})"
            rewinds = len(_windows(state))
            if self.policy == "rewind" and rewinds < self.max_rewinds:
                window = (
                    counts.get("from", state.consumed_samples),
                    state.consumed_samples + state.global_batch_size,
                )
                raise Rewind(step_no, window, in_a_row)
            after = (
                f" after {rewinds} rewinds (resilience.max_rewinds={self.max_rewinds})"
                if self.policy == "rewind"
                else ""
            )
            raise RunStopped(
                f"step {step_no}: {in_a_row}; stopping{after} "
                f"(resilience.max_bad_steps={self.max_in_a_row}); resume from the last checkpoint with a "
                "lower LR or other data"
            )
        return False, norm if norm is not None else float("nan")

    def rewound(self, bad: Rewind, before, loaded, path: Path | None) -> None:
        """Carry what happened past the checkpoint into its state: the skipped window and the counts."""
        if path is None:
            raise RunStopped(
                f"{bad}; resilience.on_bad_steps=rewind but there is no checkpoint to rewind to: lower "
                "checkpoint.interval, or resume with a lower LR or other data"
            )
        windows = [*_windows(before), list(bad.window)]
        loaded.extra["skipped_samples"] = windows
        loaded.extra["bad_steps"] = {"total": before.extra["bad_steps"]["total"], "in_a_row": 0}
        if dist.get_rank() == 0:
            print(
                f"ramp: {bad}: rewound to {path.name} (step {loaded.step}); skipping samples "
                f"[{bad.window[0]}, {bad.window[1]}) (rewind {len(windows)} of {self.max_rewinds})",
                flush=True,
            )

    @staticmethod
    def metrics(state) -> dict[str, int]:
        windows = _windows(state)
        return {
            "bad_steps": state.extra.get("bad_steps", {}).get("total", 0),
            "rewinds": len(windows),
            "skipped_samples": bad_steps.skipped_samples(windows),
        }


def _windows(state) -> list[list[int]]:
    return state.extra.get("skipped_samples", [])


def require_ok(ok: bool, step_no: int) -> None:
    if not ok:  # megatron refused an update that ramp's finite checks let through: say so
        raise RunStopped(f"step {step_no}: the optimizer refused the update after ramp's finite check")


class Heartbeat:
    """Every rank bumps a counter in the launcher's TCP store each ``every_s`` and reads its peers'.
    A peer whose counter has not moved for ``misses`` beats (dead, frozen, or its node gone) is named and
    this rank exits non-zero, instead of waiting in a collective until the collective timeout. Counters,
    not clocks: hosts need not agree on the time. A store that stops answering means the store's host is
    gone (torchrun's agent on node 0; under the DeepSpeed launcher or srun, rank 0).

    The beats come from a small process forked from the rank (:meth:`fork_beater`), not from a thread of
    it: a thread needs the GIL, and a rank that holds the GIL in one long C call is alive but would fall
    silent (megatron-core's sample and blending index builds hold it for the whole build: minutes on rank 0
    at trillion-token scale, while the other ranks wait). The beater beats while its rank's process exists
    and is not stopped (SIGSTOP, a debugger): it reports liveness, not progress, so a rank alive but stuck
    is left to the collective timeout. Reading the peers stays in a thread of the rank (:meth:`start`),
    so a dead peer ends the rank with its own message and exit code; that thread only pauses while its
    own rank holds the GIL, it never misreads a peer. The beater shares the rank's memory copy-on-write;
    pages the rank writes afterwards become the beater's own copies, at most the rank's private memory at
    the fork (about 175 MB for a CPU rank of moe-tiny; 50 MB of it copied after one full garbage collection).
    """

    def __init__(self, every_s: float, misses: int = 3, connect_timeout_s: float = 600.0) -> None:
        self.every_s, self.misses, self.connect_timeout_s = every_s, misses, connect_timeout_s
        self._stop = threading.Event()
        self._prefix = f"ramp/hb/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._beater_pid: int | None = None

    def fork_beater(self, rank: int, world: int) -> None:
        """Fork this rank's beater. Call while the rank runs no Python thread (the child then finds no
        lock held by one; numpy's idle BLAS pools are fork-aware) and before the store may exist: the
        beater waits for it."""
        if world == 1 or self.every_s <= 0 or "MASTER_PORT" not in os.environ:
            return
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the beater: never returns into the rank's code
            code = 0
            try:
                self._beat(parent, rank)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        self._beater_pid = pid

    @staticmethod
    def _store_address() -> tuple[str, int]:
        """Where the launcher's store listens: MASTER_ADDR (default this host) and MASTER_PORT."""
        return os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])

    def _store(self, timeout_s: float) -> dist.TCPStore:
        """A client of the launcher's store (its own connection: clients are not shared across threads)."""
        host, port = self._store_address()
        return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))

    def _beat(self, parent: int, rank: int) -> None:
        from launcher.runlock import kill_me_with_parent

        kill_me_with_parent()
        # Signals meant for the job (scancel's TERM, Ctrl-C) are the rank's to handle: a rank saving a
        # checkpoint on SIGTERM is alive, so its beater goes on until the rank itself is gone.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        stopped = (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
        key, store, said = f"{self._prefix}/{rank}", None, set()
        self._await_store(parent)
        while os.getppid() == parent:
            try:
                if psutil.Process(parent).status() not in stopped:
                    store = store or self._store(self.every_s * self.misses)
                    store.add(key, 1)
            except Exception as e:  # the rank's own thread names a lost store; say why once per kind
                store = None
                if type(e) not in said:
                    said.add(type(e))
                    print(
                        f"ramp: rank {rank}: heartbeat: {type(e).__name__}: {e}", file=sys.stderr, flush=True
                    )
            time.sleep(self.every_s)

    def _await_store(self, parent: int) -> None:
        """Until the store accepts connections (under the DeepSpeed launcher or srun, rank 0 creates it with
        its process group), for as long as a collective would wait: a bare connect to its port, quiet,
        every 0.2 s growing to 1 s with jitter (thousands of ranks probe one host). Not a store client with
        a long timeout: its constructor backs off exponentially and connected up to 11 s after a store that
        came up 12 s late (8 clients, torch 2.13), while peers wait about ``misses`` beats for a first one.
        A rank's start-up under load is that slow: a Slurm job beside other runs stopped twice on a peer
        "not answered for 15s" that was alive and training."""
        address = self._store_address()
        deadline = time.monotonic() + self.connect_timeout_s
        pause = 0.2
        while os.getppid() == parent and time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(address, timeout=1.0) as probe:
                # Linux can connect a socket to itself when its free source port is the port probed
                if probe.getsockname() != probe.getpeername():
                    return
            time.sleep(pause * random.uniform(0.75, 1.25))
            pause = min(pause * 1.5, 1.0)

    def start(self) -> None:
        """Start reading the peers (after the process group exists)."""
        if self._beater_pid is None:
            return
        store = self._store(self.every_s * self.misses)
        args = (store, dist.get_rank(), dist.get_world_size())
        threading.Thread(target=self._watch, args=args, name="ramp-heartbeat", daemon=True).start()

    def stop(self) -> None:
        """Before leaving (normally or not): peers then read this rank's 'done' key, not a silence."""
        if self._beater_pid is None or self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(Exception):  # a client of its own: the thread's may be mid-call
            self._store(self.every_s).set(f"{self._prefix}/done/{dist.get_rank()}", "1")
        with contextlib.suppress(OSError):
            os.kill(self._beater_pid, signal.SIGKILL)
            os.waitpid(self._beater_pid, 0)

    def _beater_alive(self) -> bool:
        try:
            return os.waitpid(self._beater_pid, os.WNOHANG)[0] == 0
        except ChildProcessError:
            return False

    def _watch(self, store, rank: int, world: int) -> None:
        seen: dict[int, tuple[int, int]] = {}  # peer -> (last counter, checks without change)
        checks = 0
        prefix = self._prefix
        while not self._stop.wait(self.every_s):
            try:
                checks += 1
                if not self._beater_alive():
                    if self._stop.is_set():  # stop() reaped it while this check ran
                        return
                    _die(f"its heartbeat process (pid {self._beater_pid}) died: peers would take it for dead")
                for peer in range(world):
                    if peer == rank or store.check([f"{prefix}/done/{peer}"]):
                        continue
                    count = store.add(f"{prefix}/{peer}", 0)
                    last, still = seen.get(peer, (-1, 0))
                    still = still + 1 if count == last else 0
                    seen[peer] = (count, still)
                    if still >= self.misses and checks > self.misses:
                        _die(f"rank {peer} has not answered for {still * self.every_s:.0f}s (dead or hung)")
            except Exception as e:  # the store went away with its host
                if not self._stop.is_set():
                    _die(f"the rendezvous store at {self._store_address()[0]} stopped answering ({e})")
                return


def _die(message: str) -> None:
    print(f"ramp: error: rank {dist.get_rank()}: {message}; exiting", file=sys.stderr, flush=True)
    kill_children()
    os._exit(4)


def kill_children() -> None:
    """The processes this one forked (data and checkpoint helpers, the heartbeat's beater) go with it."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
