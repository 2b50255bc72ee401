"""Process groups: the torch.distributed world and megatron-core's parallel_state layout on top of it."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from launcher.recipe import ParallelConfig


def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup/Slurm affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def set_threads(threads: int | None, env: Env) -> None:
    """torch threads per process: ``threads`` if given, else this process's share of the cores."""
    n = threads or max(1, available_cores() // max(env.local_world_size, 1))
    torch.set_num_threads(n)


@dataclass(frozen=True)
class Env:
    """What the launcher (deepspeed, torchrun, srun or none) told this process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    from_launcher: bool = False  # a launcher (or srun) set the world size; False: a plain `python` run

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> Env:
        """torch's variables (deepspeed, torchrun) first; else an srun step's SLURM_PROCID/SLURM_LOCALID."""
        e = os.environ if environ is None else environ
        if "WORLD_SIZE" in e:
            world = int(e["WORLD_SIZE"])
            return cls(
                rank=int(e.get("RANK", "0")),
                world_size=world,
                local_rank=int(e.get("LOCAL_RANK", "0")),
                local_world_size=int(e.get("LOCAL_WORLD_SIZE", e.get("LOCAL_SIZE", str(world)))),
                from_launcher=True,
            )
        # One process per task under srun (SLURM_STEP_ID: inside a job step, not the batch script).
        if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and "SLURM_STEP_ID" in e:
            per_node = e.get("SLURM_NTASKS_PER_NODE") or e.get("SLURM_TASKS_PER_NODE", "1")
            return cls(
                rank=int(e["SLURM_PROCID"]),
                world_size=int(e["SLURM_NTASKS"]),
                local_rank=int(e.get("SLURM_LOCALID", "0")),
                local_world_size=int(per_node.split("(")[0].split(",")[0]),
                from_launcher=True,
            )
        return cls(rank=0, world_size=1, local_rank=0, local_world_size=1)


def init_world(device: str, env: Env, timeout_min: int = 10) -> None:
    """Create the default process group (gloo on CPU, NCCL on GPU); a single process gets one too."""
    if dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(env.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set: start multi-process runs through a launcher")
        os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group(
        backend="nccl" if device == "cuda" else "gloo",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_min),
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(p: ParallelConfig, seed: int) -> None:
    """Build megatron's TP/PP/DP/EP groups for this layout and seed its RNG streams."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.vpp and p.vpp > 1 else None,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=1,
    )
    seed_streams(
        seed,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=p.ep,
    )


def seed_streams(seed: int, pp_rank: int, tp_rank: int, ep_rank: int, ep_size: int) -> None:
    """Seed megatron's RNG streams (default, tensor-parallel, expert) for one rank, each different on every
    rank that must draw its own weights.

    megatron's streams depend on the TP and EP rank only: Megatron-LM adds 100 x stage to the seed, without
    which stages that hold no embedding draw identical layers. The expert stream (megatron: seed + 1024 +
    100 x EP rank) would then repeat across stages (stage 1 / EP rank 0 = stage 0 / EP rank 1), so its EP
    rank is made unique over (stage, EP rank).
    """
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(
        seed + 100 * pp_rank, tp_rank=tp_rank, ep_rank=ep_rank + ep_size * pp_rank, etp_rank=0
    )


def destroy_parallel(free_groups: bool = True) -> None:
    """Drop megatron's layout so a new one can be built in the same processes (a relayout).

    ``destroy_model_parallel`` only forgets its groups; with ``free_groups`` their communicators (gloo
    pairs, NCCL communicators) are destroyed too, or every switch would leak a set. Every rank calls this.
    """
    from megatron.core import parallel_state as ps

    groups = _layout_groups(ps) if free_groups else []
    ps.destroy_model_parallel()
    registered = dist.distributed_c10d._world.pg_map  # what destroy_process_group accepts (private API)
    for g in groups:
        if g in registered:
            dist.destroy_process_group(g)


def live_process_groups() -> int:
    """Process groups this rank holds now (the world's included): constant across relayouts unless leaked."""
    return len(dist.distributed_c10d._world.pg_map)


def _layout_groups(ps) -> list[dist.ProcessGroup]:
    """The process groups megatron's module globals hold for this rank (not the world's default group)."""
    found: dict[int, dist.ProcessGroup] = {}

    def visit(v) -> None:
        if isinstance(v, dist.ProcessGroup):
            if v is not dist.GroupMember.WORLD and v != dist.group.WORLD:
                found.setdefault(id(v), v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)

    for name, value in vars(ps).items():
        if name.startswith("_") and name.upper() == name:
            visit(value)
    return list(found.values())


def sizes() -> dict[str, int]:
    """The current layout's sizes; a checkpoint records them so a load can tell a reshard."""
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    }


def is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage(ignore_virtual=True)


def shutdown() -> None:
    """Tear down megatron's groups and the world, so a test process can start another run."""
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        dist.destroy_process_group()
