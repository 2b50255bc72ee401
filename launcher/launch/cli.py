"""``ramp-launch``: print the exact deepspeed/torchrun command for this machine, then run it.

    ramp-launch --nproc 2 -- --recipe moe-tiny                       # one node, DeepSpeed launcher
    ramp-launch --hostfile H --node-rank 1 --master-addr node0 -- --recipe moe-1b   # one node of many
    ramp-launch --launcher torchrun --nproc 8 --nnodes 4 --rdzv-endpoint node0:29500 -- --recipe moe-1b

Everything after ``--`` goes to the training program (``python -m launcher.pretrain`` unless --script or
--module says otherwise). The launcher runs in its own process group, and SIGINT/SIGTERM/SIGHUP are passed
to that whole group: DeepSpeed's runner does not forward signals to its workers in the --no_ssh and
single-node modes, so without this a killed job leaves training processes behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from launcher.errors import RampError
from launcher.launch.commands import DEFAULT_MODULE, LAUNCHERS, LaunchPlan, LaunchSpec, Target, cpu_env, plan
from launcher.launch.hostfile import read_hostfile

_MODULES = {"deepspeed": "deepspeed.launcher.runner", "torchrun": "torch.distributed.run"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ramp-launch",
        description="Start ramp training with the DeepSpeed launcher or torchrun (prints the command first).",
        usage="ramp-launch [options] -- [training args, e.g. --recipe moe-tiny --set training.train_steps=3]",
    )
    p.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed")
    p.add_argument(
        "--nproc", type=int, help="processes per node (default: hostfile slots, else GPUs, else 1)"
    )
    p.add_argument("--hostfile", help="DeepSpeed/MPI-style hostfile: one 'HOST slots=N' line per node")
    f = p.add_mutually_exclusive_group()
    f.add_argument("--include", default="", help="hosts/slots to use: NAME[:SLOT,...]@NAME...")
    f.add_argument("--exclude", default="", help="hosts/slots to leave out, same syntax as --include")
    p.add_argument("--node-rank", type=int, help="start only this node's processes (deepspeed --no_ssh)")
    p.add_argument("--nnodes", type=int, help="torchrun without a hostfile: number of nodes")
    p.add_argument("--master-addr", help="address of node rank 0, reachable from every node")
    p.add_argument("--master-port", type=int, help="free TCP port on node rank 0 (launcher default 29500)")
    p.add_argument("--rdzv-endpoint", help="torchrun c10d rendezvous HOST:PORT (Slurm: first node)")
    p.add_argument("--rdzv-id", help="torchrun rendezvous id, the same on every node (Slurm: job id)")
    t = p.add_mutually_exclusive_group()
    t.add_argument(
        "--module", default=DEFAULT_MODULE, help=f"python module to run (default {DEFAULT_MODULE})"
    )
    t.add_argument("--script", help="python script to run instead of a module")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="cpu: set DS_ACCELERATOR etc."
    )
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Options before the first ``--`` are ours; everything after belongs to the training program."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def launcher_prog(name: str) -> list[str]:
    """The launcher next to this Python (the venv's), else on PATH, else ``python -m`` its module."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", _MODULES[name]]


def _cuda_devices() -> int:
    import torch  # only here: the pure parts of launch/ must not pay for importing torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_spec(args: argparse.Namespace, train_args: list[str], gpus: int) -> LaunchSpec:
    """Turn parsed options into a validated LaunchSpec; ``gpus`` fills in --nproc when nothing else does."""
    hosts = read_hostfile(args.hostfile) if args.hostfile else None
    nproc = args.nproc
    if nproc is None and hosts is None:
        nproc = gpus or 1
    target = (
        Target(args.script, False, tuple(train_args))
        if args.script
        else Target(args.module, True, tuple(train_args))
    )
    return LaunchSpec(
        launcher=args.launcher,
        target=target,
        nproc=nproc,
        hostfile=args.hostfile,
        hosts=hosts,
        include=args.include,
        exclude=args.exclude,
        node_rank=args.node_rank,
        nnodes=args.nnodes,
        master_addr=args.master_addr,
        master_port=args.master_port,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
    )


# A backstop for workers that outlive the launcher: DeepSpeed's launch.py and torchrun SIGKILL their
# workers 30 s after SIGTERM, so a save at SIGTERM must fit in those 30 s.
STOP_GRACE_S = 120.0


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in group ``pgid``: orphaned zombies may wait for an
    init that never reaps them."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
    return False


def _stop_group(pgid: int, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM what is left of the group and wait for it to exit (a worker stopped by SIGTERM is writing
    its checkpoint); SIGKILL it after ``grace_s``. DeepSpeed's runner (single node, ``--no_ssh``) dies of
    SIGTERM at once while its workers still save: a job step that ended then (Slurm's cgroup tracking,
    ``--kill-on-bad-exit``) would kill them mid-save."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            print(
                f"ramp-launch: workers still running {grace_s:.0f} s after SIGTERM: killing them",
                file=sys.stderr,
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.2)


def run(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` as the leader of its own process group; forward signals to the group; stop leftovers
    and wait for them (:func:`_stop_group`) before returning."""
    child = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        rc = child.wait()
        # Workers that outlived the launcher (it died first, say) must not keep training, and a worker
        # that is saving at SIGTERM must finish before this returns (signals are still forwarded meanwhile).
        _stop_group(child.pid)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 - rc if rc < 0 else rc


def main(argv: Sequence[str] | None = None) -> int:
    ours, train_args = split_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(ours)
    gpus = 0 if args.device == "cpu" else _cuda_devices()
    try:
        if args.device == "cuda" and gpus == 0:
            raise RampError("--device cuda: torch sees no CUDA device on this machine")
        spec = make_spec(args, train_args, gpus)
        launch: LaunchPlan = plan(spec, launcher_prog(spec.launcher))
    except RampError as e:
        print(f"ramp-launch: error: {e}", file=sys.stderr)
        return 2
    on_cpu = gpus == 0
    from launcher.layout import available_cores  # torch: imported only once a launch is planned

    extra = cpu_env(os.environ, launch.local_procs, available_cores()) if on_cpu else {}
    prefix = " ".join(f"{k}={v}" for k, v in extra.items())
    print(f"ramp-launch: {launch.describe()}{' on CPU' if on_cpu else ''}", flush=True)
    print(f"+ {prefix + ' ' if prefix else ''}{shlex.join(launch.cmd)}", flush=True)
    if args.dry_run:
        return 0
    return run(launch.cmd, {**os.environ, **extra})


if __name__ == "__main__":
    sys.exit(main())
