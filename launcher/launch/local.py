"""Run ramp's entry point (``launcher.pretrain``) in a fresh process on this machine: one process, or N gloo
ranks under torchrun. The CBS probes (``launcher/probes.py``), the tests and the benchmarks start runs
through here; a fresh process per run is also what a user gets (the CPU patches change torch globally).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from launcher.plots import read_metrics

#: The project root: children import this checkout's ``launcher`` (PYTHONPATH), not another install.
ROOT = Path(__file__).resolve().parent.parent.parent


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


#: What launchers tell a worker about its job: a child run is a job of its own. Left in, torchrun's
#: TORCHELASTIC_USE_AGENT_STORE makes the child wait for an agent's store that does not exist, and srun's
#: SLURM_PROCID/SLURM_STEP_ID make it believe it is one task of the enclosing step.
_JOB_VARS = frozenset(
    (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "LOCAL_SIZE",
        "MASTER_PORT",
        "MASTER_ADDR",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "ROLE_RANK",
        "ROLE_NAME",
        "ROLE_WORLD_SIZE",
        "CROSS_RANK",
        "CROSS_SIZE",
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "SLURM_STEP_ID",
        "SLURM_STEPID",
    )
)


def child_env() -> dict[str, str]:
    """This process's environment for a child run: this checkout importable, one thread per rank unless
    the recipe says otherwise, and no rendezvous variables of an enclosing job (a CBS probe's branches
    start from inside a running job)."""
    env = {k: v for k, v in os.environ.items() if k not in _JOB_VARS and not k.startswith("TORCHELASTIC_")}
    env.update(
        PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TORCH_NCCL_ASYNC_ERROR_HANDLING="1"
    )
    return env


def pretrain_command(args: list[str], nproc: int = 1) -> list[str]:
    """``python -m launcher.pretrain ARGS``, under torchrun on one node when ``nproc > 1``."""
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


@dataclass
class Run:
    """A finished child run: exit status, output, and the metrics it wrote."""

    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    def series(self, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in self.train}

    @property
    def error(self) -> str | None:
        """None if it succeeded; else the exit status and the last ``ramp: error`` line (or stderr line)."""
        if self.returncode == 0:
            return None
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        said = [ln for ln in lines if ln.startswith("ramp: error")]
        last = (said or lines or ["(no output)"])[-1]
        return f"exit {self.returncode}: {last.strip()[:300]}"

    def check(self) -> Run:
        assert self.returncode == 0, (
            f"ramp failed ({self.returncode}):\n{self.stdout[-3000:]}\n{self.stderr[-5000:]}"
        )
        return self


def run_pretrain(
    recipe: str | Path,
    sets: list[str],
    run_dir: Path,
    nproc: int = 1,
    timeout: float | None = None,
    cwd: Path | None = None,
    extra_args: list[str] | None = None,
) -> Run:
    """Train ``recipe`` with ``--set`` overrides (``logging.run_dir=run_dir`` last) in a child process and
    read back its metrics.jsonl. A run past ``timeout`` seconds is killed with its workers (returncode -9)."""
    run_dir = Path(run_dir)
    args = ["--recipe", str(recipe)]
    for s in [*sets, f"logging.run_dir={run_dir}"]:
        args += ["--set", s]
    args += extra_args or []
    p = subprocess.Popen(
        pretrain_command(args, nproc),
        cwd=cwd or ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        kill_tree(p.pid, grace_s=5)
        out, err = p.communicate()
        rc, err = -9, err + f"\nramp: error: killed after {timeout}s"
    run = Run(rc, out, err, run_dir)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        run.train, run.evals = read_metrics(metrics)
    return run
