"""Fault injection: moe-tiny on 2 gloo processes, a matrix of faults at random moments, each trial resumed
with ``checkpoint.load=auto`` until it finishes, and its per-step losses compared bitwise with an
uninterrupted reference run of the same recipe.

    nice -n 10 python benchmarks/fault_injection.py --trials 2 --kills 20

Per fault: trials, survived (the run finished after its recoveries), identical (its metrics.jsonl losses
equal the reference's, step for step, and every step appears once), restarts and steps retrained. NaN
trials inject a NaN gradient at a random step and are compared with a reference that injects the same
one. Writes benchmarks/results/fault_injection.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ramp_run import ROOT as REPO  # noqa: E402
from ramp_run import kill_tree, ramp_command, ramp_env, read_metrics  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fault_injection.json"
STEPS, EVERY = 12, 2


def base(steps: int) -> list[str]:
    return [f"training.train_steps={steps}", f"checkpoint.interval={EVERY}", "checkpoint.load=auto"]


def storm_steps(kills: int) -> int:
    """A storm run long enough that ``kills`` kills land before it can finish (each restart is killed at
    most 3 steps past where it resumed)."""
    return max(STEPS, 3 * kills)


class Trial:
    """One run directory driven through faults and restarts until it finishes (or gives up)."""

    def __init__(self, root: Path, sets: list[str], rng: random.Random, steps: int = STEPS) -> None:
        self.dir, self.sets, self.rng, self.steps = root, sets, rng, steps
        self.restarts = self.retrained = self.kills = 0
        self.errors: list[str] = []

    def start(self) -> subprocess.Popen:
        return subprocess.Popen(
            ramp_command(self.dir, self.sets, nproc=2),
            cwd=REPO,
            env=ramp_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def last_step(self) -> int:
        train, _ = _metrics(self.dir)
        return max((r["step"] for r in train), default=0)

    def wait_for(self, proc: subprocess.Popen, ready: Callable[[], bool], limit_s: float = 300) -> bool:
        deadline = time.time() + limit_s
        while not ready():
            if proc.poll() is not None or time.time() > deadline:
                return False
            time.sleep(0.05)
        return True

    def interrupt(
        self, how: Callable[[subprocess.Popen], None], when: Callable[[subprocess.Popen], bool]
    ) -> bool:
        """Start, wait for ``when``, apply ``how``, reap everything; a restart follows. False when the run
        ended (finished or failed) before ``when``: the fault hit nothing."""
        proc = self.start()
        if not self.wait_for(proc, lambda: when(proc)):
            _reap(proc)
            return False
        before = self.last_step()
        how(proc)
        self.restarts += 1
        _reap(proc)
        # steps logged by the end (a SIGTERM'd run finishes its step) that the resume trains again
        self.retrained += max(before, self.last_step()) - self.resumable_step()
        return True

    def finished(self) -> bool:
        return (self.dir / "checkpoints" / f"step_{self.steps:07d}").exists()

    def resumable_step(self) -> int:
        from launcher import checkpoint

        root = self.dir / "checkpoints"
        name = checkpoint.latest_name(root)
        return int(name.removeprefix("step_")) if name else 0

    def finish(self, attempts: int = 4) -> bool:
        for _ in range(attempts):
            proc = self.start()
            _, err = proc.communicate(timeout=900)
            if proc.returncode == 0:
                return True
            self.errors.append(err.strip().splitlines()[-1] if err.strip() else f"rc {proc.returncode}")
            self.restarts += 1
        return False


def _metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    try:
        return read_metrics(run_dir)
    except ValueError:  # a torn last line while the run writes: read again later
        return [], []


def _reap(proc: subprocess.Popen) -> None:
    kill_tree(proc.pid, grace_s=0)
    with contextlib.suppress(Exception):
        proc.communicate(timeout=60)


def _after_steps(trial: Trial, lo: int, hi: int) -> Callable[[subprocess.Popen], bool]:
    target = trial.rng.randint(lo, hi)
    return lambda proc: trial.last_step() >= target


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return [
            c for c in psutil.Process(proc.pid).children() if "launcher.pretrain" in " ".join(c.cmdline())
        ]
    return []


# --- the faults: each drives one trial and returns whether it finished -----------------------------------


def kill_storm(trial: Trial, kills: int) -> bool:
    """SIGKILL of the launcher and every worker at once, at random moments (starting up, training, saving),
    until ``kills`` kills have landed on a live run: each restart dies after a random delay or 1-3 steps
    past where it resumed (and past any step it has to retrain), whichever comes first."""
    for _ in range(2 * kills):  # a start that ends before its kill does not count; bounded all the same
        if trial.kills >= kills or trial.finished():
            break
        # The metrics file still holds the lost steps until the restart truncates it: a step past those.
        target = max(trial.last_step() + 1, trial.resumable_step() + trial.rng.randint(1, 3))
        deadline = time.time() + trial.rng.uniform(3.0, 25.0)
        trial.kills += trial.interrupt(
            lambda p: kill_tree(p.pid, grace_s=0),
            lambda p, d=deadline, s=target: time.time() > d or trial.last_step() >= s,
        )
    return trial.finish()


def kill_launcher(trial: Trial) -> bool:
    trial.interrupt(lambda p: p.send_signal(signal.SIGKILL), _after_steps(trial, 1, STEPS - 2))
    return trial.finish()


def kill_rank(trial: Trial) -> bool:
    def kill_one(p):
        victims = _workers(p)
        if victims:
            trial.rng.choice(victims).kill()
        time.sleep(5)  # torchrun notices and tears the rest down

    trial.interrupt(kill_one, _after_steps(trial, 1, STEPS - 2))
    return trial.finish()


def sigterm(trial: Trial) -> bool:
    def term(p):
        for w in _workers(p):  # as Slurm's --signal=B:TERM reaches the job's processes
            w.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=120)

    trial.interrupt(term, _after_steps(trial, 1, STEPS - 2))
    return trial.finish()


def kill_during_checkpoint(trial: Trial) -> bool:
    root = trial.dir / "checkpoints"
    skip = trial.rng.randint(0, STEPS // EVERY - 2)  # which save to hit

    def saving(p) -> bool:
        return any(x.name.endswith(".tmp") for x in root.glob("step_*")) and trial.last_step() >= skip * EVERY

    trial.interrupt(lambda p: kill_tree(p.pid, grace_s=0), saving)
    return trial.finish()


def kill_during_metrics(trial: Trial) -> bool:
    """A kill lands mid-append: the kill at a random step, then the torn half-line it would leave."""

    def kill_and_tear(p):
        kill_tree(p.pid, grace_s=0)
        with open(trial.dir / "metrics.jsonl", "a") as f:
            f.write('{"step": 99, "loss": 3.')

    trial.interrupt(kill_and_tear, _after_steps(trial, 1, STEPS - 2))
    return trial.finish()


def disk_full(trial: Trial) -> bool:
    """The checkpoint directory on a tmpfs too small for a second checkpoint; room is made, the run
    resumes from what survived (tmpfs needs root: a trial that cannot mount one is not run)."""
    mnt = trial.dir / "checkpoints"
    mnt.mkdir(parents=True)
    size_kb = trial.rng.randint(3000, 6000)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)]).returncode:
        raise NotImplementedError("cannot mount a tmpfs here")
    try:
        proc = trial.start()
        proc.communicate(timeout=900)
        trial.restarts += 1
        kept = sorted(p for p in mnt.iterdir())
        # Free space as an operator would: everything but the newest complete checkpoint goes to disk.
        spill = trial.dir / "spill"
        spill.mkdir()
        for p in kept:
            shutil.move(str(p), spill / p.name)
        subprocess.run(["umount", str(mnt)], check=True)
        for p in (spill).iterdir():
            shutil.move(str(p), mnt / p.name)
        return trial.finish()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def flipped_byte(trial: Trial) -> bool:
    trial.interrupt(lambda p: kill_tree(p.pid, grace_s=0), _after_steps(trial, 3, STEPS - 2))
    from launcher import checkpoint

    root = trial.dir / "checkpoints"
    latest = root / checkpoint.latest_name(root)
    shards = sorted(latest.glob("*.distcp"))
    shard = trial.rng.choice(shards)
    data = bytearray(shard.read_bytes())
    data[trial.rng.randrange(len(data))] ^= 0xFF
    shard.write_bytes(bytes(data))
    return trial.finish()


def truncated_idx(trial: Trial) -> bool:
    """The corpus index cut short: refused in one line (exit 2) before any work; restored, the run resumes."""
    src = next((REPO / ".cache" / "ramp").glob("embedded-*"))
    cache = trial.dir / "cache"
    shutil.copytree(src, cache / src.name)
    idx = cache / src.name / "stdlib.idx"
    good = idx.read_bytes()
    trial.interrupt(lambda p: kill_tree(p.pid, grace_s=0), _after_steps(trial, 1, STEPS - 2))
    idx.write_bytes(good[: trial.rng.randrange(64, len(good))])
    proc = trial.start()
    _, err = proc.communicate(timeout=900)
    # Each rank exits 2 with the one line; torchrun reports its failed workers as exit 1.
    refused = proc.returncode != 0 and any(
        ln.startswith("ramp: error: data:") and "is truncated" in ln for ln in err.splitlines()
    )
    if not refused:
        tail = err.strip().splitlines()[-1] if err.strip() else ""
        trial.errors.append(f"truncated .idx not refused in one line: rc {proc.returncode} {tail}")
    idx.write_bytes(good)
    return trial.finish() and refused


def nan_gradient(trial: Trial) -> bool:
    trial.interrupt(lambda p: kill_tree(p.pid, grace_s=0), _after_steps(trial, 1, STEPS - 2))
    return trial.finish()


FAULTS: dict[str, Callable[..., bool]] = {
    "kill_all_storm": kill_storm,
    "kill_launcher": kill_launcher,
    "kill_one_rank": kill_rank,
    "sigterm": sigterm,
    "kill_during_checkpoint": kill_during_checkpoint,
    "kill_during_metrics_write": kill_during_metrics,
    "disk_full_during_save": disk_full,
    "flipped_checkpoint_byte": flipped_byte,
    "truncated_idx": truncated_idx,
    "nan_gradient": nan_gradient,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2, help="trials per fault")
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs over one kill-storm trial")
    ap.add_argument("--seed", type=int, default=0, help="seeds the fault timing and the trials' data seeds")
    ap.add_argument(
        "--only", nargs="*", default=None, help="run only these faults (their rows replace those in the JSON)"
    )
    args = ap.parse_args()
    rng = random.Random(args.seed)
    references: dict[tuple[str, ...], dict[int, float]] = {}
    work = Path(tempfile.mkdtemp(prefix="ramp-faults-"))
    table: dict[str, dict] = {}
    t_start = time.time()
    for fault, drive in FAULTS.items():
        if args.only and fault not in args.only:
            continue
        row = {"trials": 0, "survived": 0, "identical": 0, "restarts": 0, "steps_retrained": 0, "errors": []}
        steps = storm_steps(args.kills) if fault == "kill_all_storm" else STEPS
        if fault == "kill_all_storm":
            row["kills_landed"] = []
        for t in range(args.trials):
            seed = rng.choice([1234, 7])  # two data orders; each has its uninterrupted reference
            sets = [*base(steps), f"training.seed={seed}"]
            if fault == "flipped_checkpoint_byte":
                sets.append("checkpoint.checksums=true")
            if fault == "nan_gradient":
                sets.append(f"resilience.inject_nan_steps=[{rng.randint(2, STEPS - 1)}]")
            if fault == "truncated_idx":
                sets.append(f"data.cache_dir={work / f'{fault}-{t}' / 'cache'}")
            ref_key = tuple(s for s in sets if not s.startswith(("data.cache_dir", "checkpoint.checksums")))
            if ref_key not in references:
                ref = Trial(work / f"ref-{len(references)}", list(ref_key), rng, steps)
                assert ref.finish(attempts=1), f"reference failed: {ref.errors}"
                references[ref_key] = {r["step"]: r["loss"] for r in _metrics(ref.dir)[0]}
            trial = Trial(work / f"{fault}-{t}", sets, random.Random(rng.random()), steps)
            try:
                survived = drive(trial, args.kills) if fault == "kill_all_storm" else drive(trial)
            except NotImplementedError as e:
                row["errors"].append(f"not run: {e}")
                continue
            train, _ = _metrics(trial.dir)
            identical = (
                survived
                and [r["step"] for r in train] == list(range(1, steps + 1))
                and {r["step"]: r["loss"] for r in train} == references[ref_key]
            )
            row["trials"] += 1
            row["survived"] += int(survived)
            row["identical"] += int(identical)
            row["restarts"] += trial.restarts
            row["steps_retrained"] += trial.retrained
            if "kills_landed" in row:
                row["kills_landed"].append(trial.kills)
            row["errors"] += trial.errors
            print(
                f"{fault:26s} trial {t}: survived={survived} identical={identical} "
                f"restarts={trial.restarts} retrained={trial.retrained}"
                + (f" kills={trial.kills}" if "kills_landed" in row else "")
                + f" ({time.time() - t_start:.0f}s)",
                flush=True,
            )
        table[fault] = row
    if args.only and RESULTS.exists():  # a partial rerun updates its rows of the last full run
        table = {**json.loads(RESULTS.read_text())["faults"], **table}
    run = [r for r in table.values() if r["trials"]]
    result = {
        "recipe": "moe-tiny (tests/ramp_run.py TINY overrides), 2 gloo processes",
        "steps": STEPS,
        "checkpoint_interval": EVERY,
        "trials_per_fault": args.trials,
        "kills_per_storm": args.kills,
        "storm_steps": storm_steps(args.kills),
        "faults": table,
        "all_survived": all(r["survived"] == r["trials"] for r in run),
        "all_identical": bool(run) and all(r["identical"] == r["trials"] for r in run),
        "seconds": round(time.time() - t_start),
    }
    print(
        f"\n{'fault':26s} {'trials':>6s} {'survived':>8s} {'identical':>9s} {'restarts':>8s} "
        f"{'retrained':>9s}"
    )
    for fault, r in table.items():
        print(
            f"{fault:26s} {r['trials']:6d} {r['survived']:8d} {r['identical']:9d} {r['restarts']:8d} "
            f"{r['steps_retrained']:9d}" + (f"  ({r['errors'][0]})" if r["errors"] else "")
        )
    print(f"all_identical: {result['all_identical']}  ({result['seconds']} s)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
