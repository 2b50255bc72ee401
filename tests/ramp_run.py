"""Run ramp's real entry point in fresh processes (1 process, or N gloo ranks under torchrun).

Training runs in subprocesses, never inside pytest: the CPU patches change torch globally, and a fresh
process per run is also what a user gets.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

# A model small enough that the whole layout suite runs in minutes on 2 cores (design.md), with every
# structural feature the layouts split: 4 layers (PP2 x VPP2), 4 heads (TP2), 4 experts (EP2/EP4).
TINY = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=128",
    "model.num_experts=4",
    "model.moe_ffn_hidden_size=64",
    "model.seq_length=64",
    "training.micro_batch_size=2",
    "training.global_batch_size=16",
    "training.log_interval=1",
    "training.eval_interval=0",
    "training.train_tokens=null",
    "logging.tensorboard=false",
    "logging.plots=false",
    "logging.wandb.enabled=false",
    "schedule.style=constant",
    "schedule.warmup_frac=null",
]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago; the OS picks it, so parallel runs don't collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int, grace_s: float = 15.0) -> None:
    """End a launcher and every process it started (torchrun and deepspeed start workers in sessions of
    their own, so a process-group kill misses them). ``grace_s=0``: SIGKILL at once, as a crash would."""
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    alive = procs
    if grace_s > 0:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    def series(self, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in self.train}

    def check(self) -> Run:
        assert self.returncode == 0, (
            f"ramp failed ({self.returncode}):\n{self.stdout[-3000:]}\n{self.stderr[-5000:]}"
        )
        return self


def ramp_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TORCH_NCCL_ASYNC_ERROR_HANDLING="1"
    )
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("MASTER_PORT", None)
    return env


def ramp_command(
    run_dir: Path,
    sets: list[str],
    nproc: int = 1,
    recipe: str = "moe-tiny",
    extra_args: list[str] | None = None,
    base: list[str] | None = None,
) -> list[str]:
    """The command line that trains ``recipe`` (``base`` overrides, by default the tiny model ``TINY``, then
    ``sets``) into ``run_dir``."""
    args = ["--recipe", recipe]
    for s in [*(TINY if base is None else base), f"logging.run_dir={run_dir}", *sets]:
        args += ["--set", s]
    args += extra_args or []
    if nproc == 1:
        return [sys.executable, "-m", "launcher.pretrain", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "launcher.pretrain",
        *args,
    ]


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl as (train records, eval records)."""
    train: list[dict] = []
    evals: list[dict] = []
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            (evals if "val_loss" in rec else train).append(rec)
    return train, evals


def run_ramp(
    run_dir: Path,
    sets: list[str],
    nproc: int = 1,
    recipe: str = "moe-tiny",
    timeout: int = 600,
    extra_args: list[str] | None = None,
    base: list[str] | None = None,
) -> Run:
    """Train through ``launcher.pretrain`` and read back metrics.jsonl. ``base``: overrides applied before
    ``sets`` (default: the tiny test model, ``TINY``; benchmarks pass their own)."""
    run_dir = Path(run_dir)
    cmd = ramp_command(run_dir, sets, nproc, recipe, extra_args, base)
    p = subprocess.run(cmd, cwd=ROOT, env=ramp_env(), capture_output=True, text=True, timeout=timeout)
    train, evals = read_metrics(run_dir)
    return Run(p.returncode, p.stdout, p.stderr, run_dir, train, evals)


def step_checkpoint(run: Run, step: int) -> Path:
    return run.run_dir / "checkpoints" / f"step_{step:07d}"


# Another layout sums the same fp32 numbers in another order (TP splits matmuls, DP splits the batch): the
# feasibility study saw agreement to 6 digits; allow a little more for thread-count differences.
LOSS_ATOL = 5e-5
GNORM_RTOL = 1e-3


def assert_continues(
    run: Run, ref: Run, first: int, last: int, loss_atol: float = LOSS_ATOL, gnorm_rtol: float = GNORM_RTOL
) -> None:
    """``run`` (resumed at ``first - 1``) trains steps first..last with ``ref``'s loss and grad norm."""
    import pytest

    loss, ref_loss = run.series("loss"), ref.series("loss")
    gnorm, ref_gnorm = run.series("grad_norm"), ref.series("grad_norm")
    assert sorted(loss) == list(range(first, last + 1)), "did not resume at the checkpoint"
    for step in loss:
        assert loss[step] == pytest.approx(ref_loss[step], abs=loss_atol), f"loss at step {step}"
        assert gnorm[step] == pytest.approx(ref_gnorm[step], rel=gnorm_rtol), f"grad norm at step {step}"
