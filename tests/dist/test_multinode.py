"""Multi-node launch on one machine: one ``ramp-launch`` per "node", talking over loopback.

The two-node test writes a hostfile with two names for this machine (``127.0.0.1`` and ``localhost``,
``slots=1`` each) and starts ``deepspeed --hostfile H --no_ssh --node_rank 0`` and ``... --node_rank 1``
through ``ramp-launch``, exactly as the Slurm template does on a cluster. (In --no_ssh mode DeepSpeed
never resolves the hostfile names: they only fix the node order; rank 0's address is --master_addr.)

TWO_NODE_CASES says what each process runs. The stand-in proves the launch mechanics on its own: one gloo
group across both nodes, DDP gradients averaged over it, the node rank each process came from. PRETRAIN
runs the real entry point, ``launcher/pretrain.py --recipe moe-tiny`` for 3 steps, and reads its metrics.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from ramp_run import kill_tree

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # per launch; the stand-in needs ~10 s, moe-tiny for 3 steps well under a minute

STAND_IN = textwrap.dedent(
    """
    import faulthandler, json, os, sys
    faulthandler.dump_traceback_later(240, exit=True)  # a gloo hang must end with a traceback, not a timeout
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, as launcher.pretrain does
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    # Three DDP steps on rank-dependent data: equal weights afterwards prove gradients crossed the nodes.
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        x = torch.full((8, 4), float(rank + 1))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = sys.argv[sys.argv.index("--out") + 1]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({
            "rank": rank, "world": world, "sum": total.item(), "argv": sys.argv[1:],
            "node": os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK")),
            "local_rank": os.environ["LOCAL_RANK"],
            "weights": [v for p in model.parameters() for v in p.detach().flatten().tolist()],
            "moved": any(not torch.equal(a, p.detach()) for a, p in zip(start, model.parameters())),
        }, f)
    dist.barrier()  # leave together: a gloo peer that vanishes mid-teardown aborts the other rank
    dist.destroy_process_group()
    """
)


@dataclass(frozen=True)
class Target:
    """What every process runs: ramp-launch options that pick it, and the check that it worked."""

    name: str
    argv: Callable[[Path], list[str]]  # tmp dir -> ramp-launch target options, "--", program args
    check: Callable[[Path, list[str]], None]  # tmp dir, each node's output


def _stand_in_argv(tmp: Path) -> list[str]:
    script = tmp / "stand_in.py"
    script.write_text(STAND_IN)
    (tmp / "out").mkdir()
    return ["--script", str(script), "--", "--out", str(tmp / "out")]


def _check_stand_in(tmp: Path, outputs: list[str]) -> None:
    recs = [json.loads((tmp / "out" / f"rank{r}.json").read_text()) for r in range(len(outputs))]
    world = len(outputs)
    for r, rec in enumerate(recs):
        assert (rec["rank"], rec["world"], rec["sum"]) == (r, world, world * (world + 1) / 2)
        assert rec["node"] == str(r), f"rank {r} ran on node {rec['node']}: node order is not the hostfile's"
        assert rec["local_rank"] == "0"
        assert rec["argv"][-2:] == ["--out", str(tmp / "out")]
        assert rec["moved"]
    assert all(rec["weights"] == recs[0]["weights"] for rec in recs), "DDP replicas diverged across nodes"


def _pretrain_argv(tmp: Path) -> list[str]:
    sets = [
        "training.train_tokens=null",
        "training.train_steps=3",
        "training.log_interval=1",
        "training.eval_interval=0",
        f"logging.run_dir={tmp / 'run'}",
        "logging.wandb.enabled=false",
        "logging.tensorboard=false",
        "logging.plots=false",
        "checkpoint.save_at_exit=false",
    ]
    return [
        "--script",
        "launcher/pretrain.py",
        "--",
        "--recipe",
        "moe-tiny",
        *(a for s in sets for a in ("--set", s)),
    ]


def _check_pretrain(tmp: Path, outputs: list[str]) -> None:
    assert "world_size=2" in outputs[0], outputs[0][-3000:]
    lines = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x) for x in lines if "loss" in json.loads(x)]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(math.isfinite(s["loss"]) for s in steps)


STAND_IN_TARGET = Target("stand-in", _stand_in_argv, _check_stand_in)
PRETRAIN = Target("pretrain", _pretrain_argv, _check_pretrain)
# One two-node run per (launcher, target). The stand-in proves the launch mechanics without the training
# code; PRETRAIN is the real check that a two-node run trains (3 steps of moe-tiny, ~1 min on 2 cores).
TWO_NODE_CASES = [("deepspeed", STAND_IN_TARGET), ("torchrun", STAND_IN_TARGET), ("deepspeed", PRETRAIN)]


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    # Two "nodes" share this machine's cores; one thread each keeps them from fighting over them.
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def _ramp_launch(args: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launcher.launch.cli", "--device", "cpu", *args]
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen) -> None:
    kill_tree(proc.pid)
    if proc.poll() is None:
        proc.wait(timeout=15)


def _run_nodes(node_args: list[list[str]], tmp: Path) -> list[str]:
    """Start one ramp-launch per node, wait for all with a deadline, return each node's output."""
    procs, logs = [], []
    try:
        for i, args in enumerate(node_args):
            logs.append(tmp / f"node{i}.log")
            procs.append(_ramp_launch(args, logs[-1]))
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            codes = [p.poll() for p in procs]
            # Stop at the first failure too: the other nodes would wait for it until the deadline.
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}" for log in logs)
                pytest.fail(f"launch timed out after {TIMEOUT_S}s\n{tails}")
            time.sleep(0.2)
        outputs = [log.read_text() for log in logs]
        for i, (p, out) in enumerate(zip(procs, outputs)):
            assert p.returncode == 0, f"node {i} exited {p.returncode}:\n{out[-4000:]}"
        return outputs
    finally:
        for p in procs:
            _stop(p)


@pytest.mark.parametrize(
    ("launcher", "target"), TWO_NODE_CASES, ids=[f"{a}-{t.name}" for a, t in TWO_NODE_CASES]
)
def test_two_nodes_over_loopback(tmp_path: Path, port: int, launcher: str, target: Target):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    program = target.argv(tmp_path)
    nodes = [
        [
            *("--launcher", launcher, "--hostfile", str(hostfile), "--node-rank", str(rank)),
            *("--master-addr", "127.0.0.1", "--master-port", str(port), *program),
        ]
        for rank in (0, 1)
    ]
    outputs = _run_nodes(nodes, tmp_path)
    if launcher == "deepspeed":  # the command each node printed is the --no_ssh form, with its own rank
        for rank, out in enumerate(outputs):
            assert f"--no_ssh --node_rank {rank} --master_addr 127.0.0.1 --master_port {port}" in out
    target.check(tmp_path, outputs)


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_single_node_two_processes(tmp_path: Path, port: int, launcher: str):
    program = STAND_IN_TARGET.argv(tmp_path)
    outputs = _run_nodes(
        [["--launcher", launcher, "--nproc", "2", "--master-port", str(port), *program]], tmp_path
    )
    recs = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["sum"], r["local_rank"]) for r in recs] == [
        (0, 2, 3.0, "0"),
        (1, 2, 3.0, "1"),
    ]
    assert recs[0]["weights"] == recs[1]["weights"]
    assert "world size 2, 2 processes per node" in outputs[0]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


SLEEPER = textwrap.dedent(
    """
    import os, sys, time
    out = sys.argv[sys.argv.index("--out") + 1]
    with open(os.path.join(out, f"pid{os.environ['RANK']}"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(300)
    """
)


def test_sigterm_to_ramp_launch_ends_every_worker(tmp_path: Path):
    """DeepSpeed's runner does not forward signals in single-node mode; ramp-launch must."""
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    proc = _ramp_launch(
        ["--nproc", "2", "--script", str(script), "--", "--out", str(tmp_path)], tmp_path / "log"
    )
    try:
        deadline = time.monotonic() + 120
        pid_files = [tmp_path / "pid0", tmp_path / "pid1"]
        while not all(p.exists() and p.read_text() for p in pid_files):
            assert proc.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in pid_files]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        end = time.monotonic() + 30
        while any(_running(w) for w in workers):
            assert time.monotonic() < end, "a worker outlived ramp-launch after SIGTERM"
            time.sleep(0.2)
    finally:
        _stop(proc)
