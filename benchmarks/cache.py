"""Run caches for benchmarks, keyed by code version: a cached run is reused only while the sources that fix
its numbers are unchanged, so a results file always comes from the committed code."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

K = TypeVar("K")
T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
#: What fixes the numbers of a moe-tiny training run: the training program, its patches and the recipe.
MOE_TINY_CODE = ("launcher", "patches", "recipes/moe-tiny.yaml")
#: Analysis modules under ``launcher/`` that the training program never imports (the benchmarks fit their
#: laws to cached runs): a change to them re-analyses, it does not retrain. tests/unit/test_bench_cache.py
#: checks that no other module of ``launcher/`` imports them.
ANALYSIS_ONLY = ("launcher/laws/loss_curve.py", "launcher/laws/e_of_s.py")


def code_version(paths: Iterable[str], exclude: Iterable[str] = ANALYSIS_ONLY) -> str:
    """Hash of the sources under ``paths`` (directories: their ``*.py``; files: as given), less
    ``exclude``."""
    skip = {ROOT / e for e in exclude}
    h = hashlib.sha1()
    for top in paths:
        path = ROOT / top
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in (f for f in files if f not in skip):
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def run_key(sets: list[str], version: str) -> str:
    """Cache key: the run's full override list and the code version (a change of either is a new run)."""
    return hashlib.sha1("\n".join([version, *sets]).encode()).hexdigest()[:12]


def cached_run(name: str, sets: list[str], version: str, cache: Path, work: Path, nproc: int = 1) -> dict:
    """Train ``sets`` (full override list, on moe-tiny) unless this code already did; per-step ``lr`` and
    ``global_batch`` (the run must log every step), the train loss and the validation curve."""
    import json
    import sys
    import time

    sys.path.insert(0, str(ROOT / "tests"))
    from ramp_run import run_ramp

    key = run_key(sets, version)
    path = cache / f"{name}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    run = run_ramp(work / name, sets, base=[], timeout=6 * 3600, nproc=nproc).check()
    train = sorted(run.train, key=lambda r: r["step"])
    assert [r["step"] for r in train] == list(range(1, len(train) + 1)), f"{name}: log every step"
    result = {
        "run": name,
        "sets": sets,
        "code_version": version,
        "wall_s": time.perf_counter() - t0,
        "seq_length": train[0]["tokens"] // train[0]["global_batch"],
        "lr": [r["lr"] for r in train],
        "global_batch": [r["global_batch"] for r in train],
        "loss": [r["loss"] for r in train],
        "val": [[r["step"], r["val_loss"]] for r in run.evals if r["step"] > 0],
    }
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def in_parallel(
    jobs: dict[K, Callable[[], T]], workers: int, report: Callable[[K, T], None] | None = None
) -> dict[K, T]:
    """Every ``key -> fn()`` of ``jobs``, ``workers`` at a time (threads: each trains child processes),
    ``report(key, result)`` as each finishes; a failed job or Ctrl-C cancels the queued ones."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    results: dict[K, T] = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(fn): key for key, fn in jobs.items()}
        for fut in as_completed(futures):
            key = futures[fut]
            try:
                results[key] = fut.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            if report is not None:
                report(key, results[key])
    return results


def cached_runs(
    jobs: dict[str, list[str]],
    version: str,
    cache: Path,
    work: Path,
    workers: int,
    report: Callable[[str, dict], None],
) -> dict[str, dict]:
    """:func:`cached_run` for every ``name -> sets`` of ``jobs``, ``workers`` at a time (each a child
    process), ``report(name, result)`` as each finishes; a failed run or Ctrl-C cancels the queued ones."""
    from functools import partial

    runs = {n: partial(cached_run, n, sets, version, cache, work) for n, sets in jobs.items()}
    return in_parallel(runs, workers, report)
