"""A real one-host Slurm cluster for the `slurm` tests: Debian's slurm-wlm daemons (munged, slurmctld,
slurmd) started on this machine with a configuration, keys, sockets, ports and state of their own.

Nothing outside the state directory is read or changed: munged gets its own key and socket, the daemons
their own TCP ports, and every client command finds the cluster through ``SLURM_CONF`` (``Cluster.env``).
The node is this host with 2 CPUs and no GPUs; proctrack/linuxproc and task/none need neither cgroups
nor systemd, so it runs in a container. ``make test-slurm`` installs the packages (apt-get, as root).

    cluster = start()                     # SlurmUnavailable (with the reason) where it cannot start
    job = cluster.sbatch(["--time=5", "script.sh"], cwd=repo, env=cluster.env)
    cluster.job(job)["JobState"]
    cluster.stop()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ramp_run import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel")
START_TIMEOUT_S = 60


class SlurmUnavailable(RuntimeError):
    """The cluster cannot run here; the message says why (a test skips with it)."""


def slurm_conf(state: Path, host: str, cpus: int) -> str:
    """The whole configuration. Everything not set here is Slurm's default, among them KillWait=30 s
    (SIGTERM to SIGKILL at a time limit) and OverTimeLimit=0. AuthInfo's cred_expire also sets how long
    a requeued job waits before it may start again (default 120 s): 20 s here."""
    return f"""\
ClusterName=ramp-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={state}/munge.socket,cred_expire=20
SlurmUser=root
SlurmdUser=root
StateSaveLocation={state}/slurmctld
SlurmdSpoolDir={state}/slurmd
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
PlugStackConfig={state}/plugstack.conf
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2
JobRequeue=1
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    state: Path
    node: str
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.state / "slurm.conf"

    def env_for(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` for commands and jobs on this cluster: SLURM_CONF names it, and an enclosing job's
        SLURM_* variables are dropped."""
        return {k: v for k, v in base.items() if not k.startswith("SLURM_")} | {"SLURM_CONF": str(self.conf)}

    @property
    def env(self) -> dict[str, str]:
        """This process's environment for Slurm's commands and daemons."""
        return self.env_for(dict(os.environ))

    def cmd(self, *args: str, timeout: float = 30) -> str:
        """Run a Slurm client command against this cluster; its stdout."""
        res = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
        return res.stdout

    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str]) -> str:
        """Submit; the job id. ``env`` is the job's environment (sbatch exports it) and must carry
        ``SLURM_CONF`` (start from ``self.env``)."""
        res = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
        )
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, TimeLimit, ...)."""
        out = self.cmd("scontrol", "--oneliner", "show", "job", job_id)
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def node_state(self) -> str:
        return self.cmd("sinfo", "--noheader", "--Node", "--format=%T").strip()

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for name in (*DAEMONS, "slurmctld.log", "slurmd.log"):
            path = self.state / (name if name.endswith(".log") else f"{name}.out")
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job (its processes run under slurmstepd, which outlives slurmd), then stop the
        daemons, and remove the state directory."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.cmd("scancel", "--full", "--user=root")
                deadline = time.monotonic() + 60
                while self.cmd("squeue", "--noheader").strip() and time.monotonic() < deadline:
                    time.sleep(1)
        for name in reversed(DAEMONS):
            proc = self.daemons.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.state, ignore_errors=True)


def _start(cluster: Cluster, name: str, *args: str) -> None:
    out = open(cluster.state / f"{name}.out", "w")  # noqa: SIM115 (closed with the daemon's process)
    cluster.daemons[name] = subprocess.Popen(
        [name, *args], env=cluster.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    out.close()


def _wait(cluster: Cluster, what: str, ready) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        dead = [n for n, p in cluster.daemons.items() if p.poll() is not None]
        if dead:
            raise SlurmUnavailable(f"{dead[0]} exited ({cluster.daemons[dead[0]].returncode})")
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if ready():
                return
        if time.monotonic() > deadline:
            raise SlurmUnavailable(f"{what} not ready after {START_TIMEOUT_S} s")
        time.sleep(0.5)


def start(cpus: int = 2) -> Cluster:
    """Start munged, slurmctld and slurmd and wait until the node is idle. SlurmUnavailable if this
    machine cannot (programs missing, not root, a daemon that exits or never gets ready)."""
    missing = [p for p in (*DAEMONS, *CLIENTS, "sinfo") if shutil.which(p) is None]
    if missing:
        raise SlurmUnavailable(
            f"{', '.join(missing)} not installed: `make test-slurm` installs Debian's slurm-wlm and munge"
        )
    if os.geteuid() != 0:
        raise SlurmUnavailable("the daemons run as root (SlurmdUser=root): run `make test-slurm` as root")
    # munged refuses a socket in a directory that not everyone may enter (pytest's tmp_path is 0700).
    state = Path(tempfile.mkdtemp(prefix="ramp-slurm-"))
    state.chmod(0o755)
    for sub in ("slurmctld", "slurmd"):
        (state / sub).mkdir()
    (state / "plugstack.conf").write_text("")
    key = state / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]  # slurmctld and slurmd recognise themselves by this name
    cluster = Cluster(state, host)
    cluster.conf.write_text(slurm_conf(state, host, cpus))
    try:
        _start(
            cluster,
            "munged",
            "--foreground",
            f"--socket={state}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={state}/munged.pid",
            f"--log-file={state}/munged.log",
            f"--seed-file={state}/munged.seed",
        )
        _wait(cluster, "munged", lambda: (state / "munge.socket").exists())
        _start(cluster, "slurmctld", "-D", "-f", str(cluster.conf))
        _wait(cluster, "slurmctld", lambda: cluster.cmd("scontrol", "ping").count("is UP") == 1)
        _start(cluster, "slurmd", "-D", "-f", str(cluster.conf), "-N", host)
        _wait(cluster, f"node {host}", lambda: cluster.node_state() == "idle")
    except (SlurmUnavailable, OSError) as e:
        logs = cluster.log_tail()
        cluster.stop()
        raise SlurmUnavailable(f"{e}\n{logs}") from e
    return cluster
