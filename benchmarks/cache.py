"""Run caches for benchmarks, keyed by code version: a cached run is reused only while the sources that fix
its numbers are unchanged, so a results file always comes from the committed code."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_version(paths: Iterable[str]) -> str:
    """Hash of the sources under ``paths`` (directories: their ``*.py``; files: as given)."""
    h = hashlib.sha1()
    for top in paths:
        path = ROOT / top
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def run_key(sets: list[str], version: str) -> str:
    """Cache key: the run's full override list and the code version (a change of either is a new run)."""
    return hashlib.sha1("\n".join([version, *sets]).encode()).hexdigest()[:12]
