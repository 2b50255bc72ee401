"""launcher/launch/ramp.sbatch under a real Slurm: Debian's slurm-wlm on this host (tests/slurm_cluster.py).

The template is submitted as a user would, for moe-tiny on 2 processes through the DeepSpeed launcher, with
command-line options in place of the cluster-sized #SBATCH lines (one node, no GPUs, this host's 2 CPUs, a
2-minute lead time instead of 300 s). Once training runs, the test shortens the job's time limit
(`scontrol update TimeLimit`, as an administrator would) so that the limit's warning signal falls mid-run
however long start-up took; slurmctld's own time-limit check sends it (B:TERM, to the batch shell).
From there on everything is the template's and ramp's doing: the trap passes SIGTERM on to the job step,
ramp finishes the step, checkpoints and exits, the template requeues the job, and the second start resumes
from `latest` (checkpoint.load=auto) and trains to the end, with the per-step losses and gradient norms of
an uninterrupted run, bitwise. (The test lengthens the limit again once the job has requeued: the second
start would otherwise be signalled at once.)

A failure requeues too: with periodic checkpoints, the test SIGKILLs one training rank of the running job
(as a crashed process or an OOM kill would). The other rank stops naming it, the launcher, srun and the
batch script exit non-zero, the template requeues the job, and the second start resumes from the last
periodic checkpoint and finishes with the same losses, bitwise.

`make test-slurm` installs the packages and runs this; plain `pytest` skips it (see tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import slurm_cluster
from ramp_run import ROOT, TINY, ramp_env, ranks_among, read_metrics, run_ramp

pytestmark = pytest.mark.slurm

SBATCH = ROOT / "launcher" / "launch" / "ramp.sbatch"
NPROC = 2
# Long enough that the signal, at most 30 s after the limit is shortened (slurmctld checks time limits
# every 30 s), lands mid-run on an idle 2-core machine (~0.15 s a step, ~0.3 s beside the reference run);
# on a loaded one the first start just stops at an earlier step.
STEPS = 300
FIRST_STEPS = 10  # the first start trains at least these steps before the time limit is shortened
SETS = [*TINY, f"training.train_steps={STEPS}", "checkpoint.interval=0"]
LEAD_S = 120  # --signal lead time: slurmctld signals once fewer than LEAD_S + 30 s remain
JOB_TIMEOUT_S = 1800


@pytest.fixture(scope="module")
def cluster():
    try:
        c = slurm_cluster.start()
    except slurm_cluster.SlurmUnavailable as e:
        pytest.skip(f"no Slurm cluster on this machine: {e}")
    yield c
    c.stop()


def _elapsed_s(run_time: str) -> int:
    """Slurm's RunTime ([D-]HH:MM:SS) in seconds."""
    days, _, hms = run_time.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def _submit(
    cluster: slurm_cluster.Cluster, run_dir: Path, out: Path, sets: list[str] = SETS, time_min: int = 10
) -> str:
    """sbatch the template for moe-tiny as a user would; command-line options replace the #SBATCH lines
    sized for a GPU cluster."""
    env = cluster.env_for(ramp_env())
    env.update(LAUNCHER="deepspeed", GPUS_PER_NODE=str(NPROC), RAMP_VENV=sys.prefix)
    args = [
        "--nodes=1",
        "--gpus-per-node=0",  # the template asks for 8 GPUs per node; this node has none
        f"--cpus-per-task={NPROC}",
        f"--time={time_min}",
        f"--signal=B:TERM@{LEAD_S}",
        f"--output={out}",
        str(SBATCH),
        "moe-tiny",
    ]
    for s in [*sets, f"logging.run_dir={run_dir}"]:
        args += ["--set", s]
    return cluster.sbatch(args, cwd=ROOT, env=env)


def _follow(cluster: slurm_cluster.Cluster, job_id: str, run_dir: Path, out: Path) -> dict[str, str]:
    """Wait for the job to end, moving its time limit: shortened once FIRST_STEPS steps are trained, so
    that the limit's signal comes within 30 s; lengthened once the job has requeued itself. The job's
    final record."""
    shortened = lengthened = False
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = cluster.job(job_id)
        if job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return job
        if not shortened and job["JobState"] == "RUNNING" and len(read_metrics(run_dir)[0]) >= FIRST_STEPS:
            # Training runs (ramp's SIGTERM handler is in place). From now on fewer than LEAD_S + 30 s
            # are left, so slurmctld's next time-limit check signals the batch shell; the limit itself
            # is over 60 s away: time to checkpoint.
            minutes = _elapsed_s(job["RunTime"]) // 60 + 2
            cluster.cmd("scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}")
            shortened = True
        requeued = int(job["Restarts"]) > 0 or (out.exists() and "ramp: requeueing job" in out.read_text())
        if shortened and not lengthened and requeued:
            cluster.cmd("scontrol", "update", f"JobId={job_id}", "TimeLimit=30")
            lengthened = True
        time.sleep(1)
    cluster.cmd("scancel", job_id)
    pytest.fail(f"job {job_id} not done after {JOB_TIMEOUT_S} s:\n{out.read_text()[-6000:]}")


def _job_text(cluster: slurm_cluster.Cluster, job: dict[str, str], job_id: str, out: Path) -> str:
    """Both starts' output (the template appends: --open-mode=append), once the job completed with exit 0."""
    text = out.read_text(errors="replace")
    if job["JobState"] != "COMPLETED" or job["ExitCode"] != "0:0":
        pytest.fail(
            f"job {job_id} ended {job['JobState']} ({job['ExitCode']}):\n{text[-6000:]}\n{cluster.log_tail()}"
        )
    return text


def _assert_finished_like(ref, run_dir: Path, text: str) -> None:
    """One fresh start, ``latest`` at the last step, every step logged once, with the losses and gradient
    norms of the uninterrupted reference, bitwise."""
    assert text.count("no checkpoint: fresh start") == 1
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
    train, _ = read_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)), "metrics.jsonl tells more than one story"
    for key in ("loss", "grad_norm"):
        assert {r["step"]: r[key] for r in train} == ref.series(key), key


def test_time_limit_signal_requeues_and_the_job_resumes_bitwise(cluster, tmp_path: Path):
    run_dir, out = tmp_path / "job", tmp_path / "slurm.out"
    with ThreadPoolExecutor(1) as pool:
        # The uninterrupted reference trains meanwhile: the job idles between its starts.
        ref = pool.submit(run_ramp, tmp_path / "ref", SETS, nproc=NPROC, timeout=JOB_TIMEOUT_S)
        job_id = _submit(cluster, run_dir, out)
        job = _follow(cluster, job_id, run_dir, out)
        ref = ref.result().check()
    text = _job_text(cluster, job, job_id, out)

    # The first start trained from scratch until the signal stopped it after step k; the template requeued.
    stopped = {int(k) for k in re.findall(r"ramp: rank \d: stopping after step (\d+)", text)}
    assert len(stopped) == 1, f"the signal never stopped the first start (raise STEPS?):\n{text[-6000:]}"
    k = stopped.pop()
    assert FIRST_STEPS <= k < STEPS, f"the signal did not land mid-run (step {k} of {STEPS})"
    assert (
        job["Restarts"] == "1" and text.count(f"ramp: requeueing job {job_id} (time limit; restart 0)") == 1
    )
    # The second start resumed from the checkpoint the first one saved at step k, and trained to the end.
    ckpt = run_dir / "checkpoints" / f"step_{k:07d}"
    assert f"resumed from {ckpt} at step {k}" in text, (
        f"the first start did not save step {k}:\n{text[-8000:]}"
    )
    _assert_finished_like(ref, run_dir, text)
    print(f"job {job_id}: steps 1-{k} in the first start, {k + 1}-{STEPS} after the requeue")


FAIL_EVERY = 20  # periodic checkpoints of the failure test
FAIL_SETS = [*TINY, f"training.train_steps={STEPS}", f"checkpoint.interval={FAIL_EVERY}"]


def _job_rank(job_id: str, rank: int) -> psutil.Process | None:
    """Training rank ``rank`` of the Slurm job."""
    job = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get("SLURM_JOB_ID") == job_id and "launcher.pretrain" in " ".join(p.cmdline()):
                job.append(p)
    return ranks_among(job).get(rank)


def test_a_killed_rank_fails_the_start_and_the_requeued_job_resumes_bitwise(cluster, tmp_path: Path):
    run_dir, out = tmp_path / "job", tmp_path / "slurm.out"
    with ThreadPoolExecutor(1) as pool:
        ref = pool.submit(run_ramp, tmp_path / "ref", FAIL_SETS, nproc=NPROC, timeout=JOB_TIMEOUT_S)
        job_id = _submit(cluster, run_dir, out, FAIL_SETS, time_min=30)
        killed, deadline = None, time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            job = cluster.job(job_id)
            if job["JobState"] in (
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            ):
                break
            latest = run_dir / "checkpoints" / "latest"
            if killed is None and latest.exists() and len(read_metrics(run_dir)[0]) >= FAIL_EVERY + 5:
                rank1 = _job_rank(job_id, 1)
                if rank1 is not None:
                    rank1.send_signal(signal.SIGKILL)
                    psutil.wait_procs([rank1], timeout=30)
                    killed = len(read_metrics(run_dir)[0])  # no step completes without rank 1
            time.sleep(1)
        else:
            cluster.cmd("scancel", job_id)
            pytest.fail(f"job {job_id} not done after {JOB_TIMEOUT_S} s:\n{out.read_text()[-6000:]}")
        ref = ref.result().check()
    text = _job_text(cluster, job, job_id, out)
    assert killed is not None, "rank 1 was never found to kill"
    assert killed < STEPS, f"the kill came after the run ended ({killed} steps logged)"
    # The first start failed: the template requeued it for its exit status, once.
    requeues = re.findall(rf"ramp: requeueing job {job_id} \((.*?); restart (\d+)\)", text)
    assert len(requeues) == 1 and requeues[0][0].startswith("exit ") and requeues[0][1] == "0", requeues
    assert job["Restarts"] == "1"
    # The second start resumed from the last periodic checkpoint the first one completed before the kill
    # (the one before, when the kill landed while the checkpoint of the last step logged was being saved).
    resumed = [int(k) for k in re.findall(r"ramp: resumed from \S+ at step (\d+)", text)]
    last = killed // FAIL_EVERY * FAIL_EVERY
    assert len(resumed) == 1 and resumed[0] in (last, last - FAIL_EVERY) and resumed[0] > 0, (resumed, killed)
    _assert_finished_like(ref, run_dir, text)
    print(
        f"job {job_id}: rank 1 killed after {killed} steps, resumed from step {resumed[0]} after the requeue"
    )
