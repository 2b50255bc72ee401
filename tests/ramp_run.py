"""Run ramp's real entry point in fresh processes (1 process, or N gloo ranks under torchrun).

Training runs in subprocesses, never inside pytest: the CPU patches change torch globally, and a fresh
process per run is also what a user gets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import psutil

from launcher import plots
from launcher.launch.local import ROOT, Run, child_env, free_port, kill_tree, pretrain_command, run_pretrain

__all__ = [
    "ROOT",
    "TINY",
    "Run",
    "assert_continues",
    "free_port",
    "kill_tree",
    "ramp_command",
    "ramp_env",
    "read_metrics",
    "run_ramp",
    "step_checkpoint",
]

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


def cuda_sets() -> list[str]:
    """A GPU test run's overrides: CUDA and bf16, with megatron's local spec where TransformerEngine does not
    load (a GPU machine without TE still checks NCCL, bf16 and the local spec, and says which it built)."""
    from launcher import gpu

    local = [] if gpu.have_te() else ["gpu.transformer_engine=local"]
    return ["training.device=cuda", "training.precision=bf16", *local]


#: The attention and expert classes megatron builds (launcher.gpu.built_classes) with TE and without.
TE_CLASSES = {"attention": "TEDotProductAttention", "experts": "TEGroupedMLP"}
LOCAL_CLASSES = {"attention": "DotProductAttention", "experts": "SequentialMLP"}


def ramp_env() -> dict[str, str]:
    return child_env()


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
    return pretrain_command([*args, *(extra_args or [])], nproc)


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl of ``run_dir`` as (train records, eval records); empty if it has none."""
    metrics = Path(run_dir) / "metrics.jsonl"
    return plots.read_metrics(metrics) if metrics.exists() else ([], [])


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
    return run_pretrain(
        recipe, [*(TINY if base is None else base), *sets], run_dir, nproc, timeout, ROOT, extra_args
    )


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
        assert loss[step] == pytest.approx(ref_loss[step], abs=loss_atol), (
            f"loss at step {step}: {loss[step]!r} against {ref_loss[step]!r} (atol {loss_atol})"
        )
        assert gnorm[step] == pytest.approx(ref_gnorm[step], rel=gnorm_rtol), (
            f"grad norm at step {step}: {gnorm[step]!r} against {ref_gnorm[step]!r} (rtol {gnorm_rtol})"
        )


def rank_processes(launcher_pid: int) -> dict[int, psutil.Process]:
    """The training ranks under a launcher, by global rank (:func:`ranks_among` its descendants)."""
    return ranks_among(psutil.Process(launcher_pid).children(recursive=True))


def ranks_among(procs: Iterable[psutil.Process]) -> dict[int, psutil.Process]:
    """The training ranks among ``procs``, by global rank: processes with a RANK in their environment whose
    parent has none (a process a rank forks, its heartbeat's beater or a checkpoint writer, inherits the
    environment but is not a rank)."""
    ranked: dict[int, tuple[psutil.Process, int, int]] = {}  # pid -> (process, rank, parent pid)
    for p in procs:
        with contextlib.suppress(psutil.Error):  # gone meanwhile, or not ours to read
            env = p.environ()
            if "RANK" in env:
                ranked[p.pid] = (p, int(env["RANK"]), p.ppid())
    return {rank: p for p, rank, parent in ranked.values() if parent not in ranked}
