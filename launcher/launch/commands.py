"""Exact deepspeed / torchrun command lines for every way ramp starts a job, as pure functions.

One place decides the flags so that ``ramp-launch``, the Slurm template, the README and the tests agree.
Modes (``LaunchSpec`` picks one from what is given):

- single node:            ``deepspeed --num_gpus N`` / ``torchrun --standalone --nproc_per_node N``
- hostfile, fan-out:      ``deepspeed --hostfile H`` started once; DeepSpeed reaches the other nodes by ssh
- hostfile, one node:     ``deepspeed --hostfile H --no_ssh --node_rank i`` started on every node
                          (Slurm's srun, or by hand); torchrun ``--nnodes M --node_rank i`` likewise
- rendezvous (torchrun):  ``--rdzv_backend c10d --rdzv_endpoint HOST:PORT``; nodes need no rank

The training program reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, which both launchers set,
and ignores the ``--local_rank=N`` that DeepSpeed appends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from launcher.errors import RampError, require
from launcher.launch.hostfile import is_local_host, select_resources

LAUNCHERS = ("deepspeed", "torchrun")
DEFAULT_MODULE = "launcher.pretrain"


@dataclass(frozen=True)
class Target:
    """What every process runs: ``python -m MODULE ARGS`` or ``python SCRIPT ARGS``."""

    program: str = DEFAULT_MODULE
    is_module: bool = True
    args: tuple[str, ...] = ()

    def argv(self, module_flag: str) -> list[str]:
        return [*([module_flag] if self.is_module else []), self.program, *self.args]


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a launch needs; validated on construction so a bad combination fails before any import.

    ``hosts`` is the parsed hostfile (``read_hostfile``) and ``hostfile`` its path; both or neither.
    ``nproc`` is processes per node: required without a hostfile, else it trims every node to N slots.
    ``node_rank`` set means "start only this node's processes" (deepspeed --no_ssh, torchrun static).
    """

    launcher: str = "deepspeed"
    target: Target = field(default_factory=Target)
    nproc: int | None = None
    hostfile: str | None = None
    hosts: Mapping[str, int] | None = None
    include: str = ""
    exclude: str = ""
    node_rank: int | None = None
    nnodes: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None

    def __post_init__(self) -> None:
        require(
            self.launcher in LAUNCHERS, f"launcher {self.launcher!r}: choose one of {', '.join(LAUNCHERS)}"
        )
        require(
            (self.hostfile is None) == (self.hosts is None),
            "LaunchSpec: pass the hostfile path together with its parsed hosts (read_hostfile)",
        )
        if self.nproc is not None:
            require(self.nproc >= 1, f"--nproc {self.nproc}: must be >= 1")
        if self.master_port is not None:
            require(1 <= self.master_port <= 65535, f"--master-port {self.master_port}: must be in 1..65535")
        if self.node_rank is not None:
            require(self.node_rank >= 0, f"--node-rank {self.node_rank}: must be >= 0")
        if self.hosts is None:
            require(
                not (self.include or self.exclude),
                "--include/--exclude filter a hostfile: give --hostfile too",
            )
            require(self.nproc is not None, "give --nproc N (processes on this node) or a --hostfile")
        else:
            require(self.nnodes is None, "--nnodes comes from the hostfile: drop one of them")
        if self.launcher == "deepspeed":
            require(self.rdzv_endpoint is None, "--rdzv-endpoint is torchrun's: use --launcher torchrun")
            if self.hosts is None:
                require(
                    self.node_rank is None and self.nnodes in (None, 1),
                    "deepspeed across nodes needs --hostfile (DeepSpeed takes the node list only from it)",
                )
            elif self.node_rank is not None:
                require(
                    bool(self.master_addr),
                    "--node-rank (deepspeed --no_ssh) needs --master-addr, the address of node rank 0",
                )
        else:
            multi = self.hosts is not None or (self.nnodes or 1) > 1
            if self.rdzv_endpoint is not None:
                require(multi, "--rdzv-endpoint needs --nnodes M (or a --hostfile) for torchrun")
                require(":" in self.rdzv_endpoint, f"--rdzv-endpoint {self.rdzv_endpoint!r}: write HOST:PORT")
            elif multi:
                require(
                    self.node_rank is not None and bool(self.master_addr),
                    "torchrun across nodes: give --node-rank and --master-addr on every node "
                    "(or --rdzv-endpoint HOST:PORT)",
                )
        nnodes = len(self.resources()) if self.hosts is not None else (self.nnodes or 1)
        if self.node_rank is not None:
            require(
                self.node_rank < nnodes,
                f"--node-rank {self.node_rank}: the job has {nnodes} node(s), ranks 0..{nnodes - 1}",
            )

    def resources(self) -> dict[str, list[int]]:
        """The hostfile after the filters: {host: slot ids}; empty without a hostfile."""
        if self.hosts is None:
            return {}
        return select_resources(dict(self.hosts), self.include, self.exclude, slots_per_node=self.nproc)


@dataclass(frozen=True)
class LaunchPlan:
    """The command to run on this machine, and the shape of the job it starts."""

    cmd: list[str]
    nnodes: int
    local_procs: int  # processes this command starts on this machine (max per node when it fans out)
    world_size: int

    def describe(self) -> str:
        nodes = f"{self.nnodes} node{'s' if self.nnodes > 1 else ''}"
        procs = f"{self.local_procs} process{'es' if self.local_procs > 1 else ''}"
        return f"{nodes}, world size {self.world_size}, {procs} per node"


def plan(spec: LaunchSpec, prog: Sequence[str] | None = None) -> LaunchPlan:
    """Build the command for ``spec``; ``prog`` replaces the launcher executable (default: its name)."""
    if spec.launcher == "deepspeed":
        return _deepspeed(spec, list(prog or ["deepspeed"]))
    return _torchrun(spec, list(prog or ["torchrun"]))


def _deepspeed(spec: LaunchSpec, cmd: list[str]) -> LaunchPlan:
    if spec.hosts is None:
        cmd += ["--num_gpus", str(spec.nproc)]
        if spec.master_port is not None:
            cmd += ["--master_port", str(spec.master_port)]
        n = spec.nproc or 1
        return LaunchPlan(cmd + spec.target.argv("--module"), nnodes=1, local_procs=n, world_size=n)
    res = spec.resources()
    cmd += ["--hostfile", str(spec.hostfile)]
    if spec.include:
        cmd += ["--include", spec.include]
    if spec.exclude:
        cmd += ["--exclude", spec.exclude]
    if spec.nproc is not None:
        cmd += ["--num_gpus", str(spec.nproc)]
    if spec.node_rank is not None:
        cmd += ["--no_ssh", "--node_rank", str(spec.node_rank)]
        local = len(list(res.values())[spec.node_rank])
    else:
        # One local host: DeepSpeed still checks ssh to it and fails without sshd; nothing needs ssh here.
        if len(res) == 1 and is_local_host(next(iter(res))):
            cmd += ["--no_ssh_check"]
        local = max(len(s) for s in res.values())
    if spec.master_addr:
        cmd += ["--master_addr", spec.master_addr]
    if spec.master_port is not None:
        cmd += ["--master_port", str(spec.master_port)]
    world = sum(len(s) for s in res.values())
    return LaunchPlan(
        cmd + spec.target.argv("--module"), nnodes=len(res), local_procs=local, world_size=world
    )


def _torchrun(spec: LaunchSpec, cmd: list[str]) -> LaunchPlan:
    res = spec.resources()
    if res:
        nnodes = len(res)
        per_node = [len(s) for s in res.values()]
    else:
        nnodes = spec.nnodes or 1
        per_node = [spec.nproc or 1] * nnodes
    if spec.rdzv_endpoint is not None:
        # Elastic rendezvous: every node runs the same line; torchrun assigns node ranks itself. Nodes
        # may differ in process count only with a fixed node rank, so use the largest slot count.
        local = spec.nproc or max(per_node)
        cmd += ["--nnodes", str(nnodes), "--nproc_per_node", str(local)]
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", spec.rdzv_endpoint]
        if spec.rdzv_id:
            cmd += ["--rdzv_id", spec.rdzv_id]
        world = local * nnodes
    elif nnodes == 1 and spec.node_rank is None:
        local = per_node[0]
        if spec.master_port is None:
            cmd += ["--standalone", "--nproc_per_node", str(local)]  # picks a free port itself
        else:
            cmd += ["--nnodes", "1", "--nproc_per_node", str(local)]
            cmd += ["--master_addr", spec.master_addr or "127.0.0.1", "--master_port", str(spec.master_port)]
        world = local
    else:
        if spec.node_rank is None or not spec.master_addr:  # unreachable: LaunchSpec checks it
            raise RampError("torchrun across nodes needs --node-rank and --master-addr")
        local = per_node[spec.node_rank]
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(spec.node_rank), "--nproc_per_node", str(local)]
        cmd += ["--master_addr", spec.master_addr]
        if spec.master_port is not None:
            cmd += ["--master_port", str(spec.master_port)]
        world = sum(per_node)
    return LaunchPlan(cmd + spec.target.argv("-m"), nnodes=nnodes, local_procs=local, world_size=world)


def cpu_env(base: Mapping[str, str], local_procs: int, cpu_count: int) -> dict[str, str]:
    """Variables to add for a CPU-only machine; values the user already set are kept.

    DS_ACCELERATOR=cpu stops DeepSpeed probing for CUDA (and its warning); OMP_NUM_THREADS splits the
    cores between the local processes, as torchrun's default of 1 thread would leave most of them idle.
    """
    extra: dict[str, str] = {}
    if "DS_ACCELERATOR" not in base:
        extra["DS_ACCELERATOR"] = "cpu"
    if "OMP_NUM_THREADS" not in base:
        extra["OMP_NUM_THREADS"] = str(max(1, cpu_count // max(1, local_procs)))
    return extra
