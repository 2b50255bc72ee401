"""Metrics to metrics.jsonl, tensorboard and wandb (offline unless asked and possible), plus progress."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from launcher import optim
from launcher.callbacks.base import Callback

if TYPE_CHECKING:
    from launcher.trainer import Trainer


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Metrics(Callback):
    """Writes on global rank 0 only; every rank computes the same reduced values."""

    name = "metrics"

    def __init__(
        self,
        run_dir: Path,
        log_interval: int,
        tensorboard: bool = True,
        wandb_cfg: Any = None,
        run_name: str = "run",
        config: dict | None = None,
    ) -> None:
        self.run_dir, self.log_interval = Path(run_dir), log_interval
        self.use_tb, self.wandb_cfg, self.run_name, self.config = tensorboard, wandb_cfg, run_name, config
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = self._wandb = None
        self._window_time = 0.0
        self._window_tokens = 0
        self._t_start = time.perf_counter()
        self._tokens_at_start = 0
        self._last_batch: int | None = None

    @property
    def writer(self) -> bool:
        return dist.get_rank() == 0

    def on_train_start(self, trainer: Trainer) -> None:
        self._tokens_at_start = trainer.state.consumed_tokens
        self._t_start = time.perf_counter()
        if not self.writer:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(trainer.state.step)
        if self.use_tb:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._wandb = _init_wandb(self.wandb_cfg, self.run_dir, self.run_name, self.config)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the file tells one consistent history."""
        if not self.path.exists():
            return
        keep = []
        for i, ln in enumerate(self.path.read_text().splitlines(), 1):
            if not ln.strip():
                continue
            try:
                rec = json.loads(ln)
            except ValueError:  # a kill during an append tears the line being written
                print(f"ramp: {self.path}: dropped torn line {i} ({ln[:40]!r}...)", file=sys.stderr)
                continue
            if rec["step"] <= step:
                keep.append(ln)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)

    def on_rewind(self, trainer: Trainer) -> None:
        if self.writer:
            self._truncate_after(trainer.state.step)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """Logs every ``log_interval`` steps, the first and last step, and every step whose batch differs from
        the previous one (a batch phase starts: its columns, such as a layout switch's, are never lost)."""
        st = trainer.state
        tokens = st.global_batch_size * trainer.recipe.model.seq_length
        self._window_time += metrics["step_time"]
        self._window_tokens += tokens
        new_batch = self._last_batch is not None and st.global_batch_size != self._last_batch
        self._last_batch = st.global_batch_size
        last = st.consumed_tokens >= trainer.derived.train_tokens
        if not (st.step % self.log_interval == 0 or st.step == 1 or last or new_batch):
            return
        rec = {
            "step": st.step,
            "tokens": st.consumed_tokens,
            **optim.group_lrs(trainer.optimizer),
            "global_batch": st.global_batch_size,
            "tokens_per_s": self._window_tokens / max(self._window_time, 1e-9),
            # the step's own numbers and any column a callback added (loss_z, layout switch times ...)
            **metrics,
        }
        self._window_time, self._window_tokens = 0.0, 0
        self._write(rec)
        if self.writer:
            elapsed = time.perf_counter() - self._t_start
            done = st.consumed_tokens - self._tokens_at_start
            eta = elapsed / max(done, 1) * (trainer.derived.train_tokens - st.consumed_tokens)
            val = f" | val {trainer.last_eval['val_loss']:.4f}" if trainer.last_eval else ""
            total = trainer.derived.train_steps  # as planned now (online probes may change it)
            print(
                f"step {st.step}/{total} | loss {rec['loss']:.4f}{val} | lr {rec['lr']:.3g} "
                f"| gnorm {rec['grad_norm']:.3f} | gbs {st.global_batch_size} "
                f"| {rec['tokens_per_s'] / 1e3:.1f}k tok/s | ETA {_fmt_time(eta)}",
                flush=True,
            )

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._write({"step": trainer.state.step, "tokens": trainer.state.consumed_tokens, **metrics})

    def _write(self, rec: dict[str, float]) -> None:
        if not self.writer:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        step = rec["step"]
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar("valid/loss" if k == "val_loss" else f"train/{k}", v, step)
        if self._tb is not None:
            self._tb.flush()
        if self._wandb is not None:
            numbers = {k: v for k, v in rec.items() if k != "step" and not isinstance(v, str)}
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _init_wandb(cfg: Any, run_dir: Path, name: str, config: dict | None):
    """Offline by default; online only when asked for and credentials exist. Never needs an account."""
    if cfg is None or not cfg.enabled or cfg.mode == "disabled":
        return None
    mode = cfg.mode
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists()):
        print("ramp: wandb online mode asked for but no credentials found; logging offline", file=sys.stderr)
        mode = "offline"
    try:
        import wandb
    except ImportError:
        print("ramp: wandb is not installed; skipping it", file=sys.stderr)
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=name,
        mode=mode,
        dir=str(run_dir),
        config=config or {},
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
