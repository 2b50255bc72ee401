"""The embedded default corpus: this interpreter's standard-library ``.py`` files.

A fresh machine cannot download anything, but every machine with Python has its standard library
(CPython 3.11: 1,790 files, 31.5 MB -> 1,758 non-empty UTF-8 documents, 10.2 M tokens at vocab 4096).
The tokenizer and the indexed dataset are built once into ``cache_dir/embedded-<key>/``; the key
changes with the Python build, the vocabulary size and ``FORMAT_VERSION``, so a stale cache is never
read. Building goes to a temporary directory that is renamed into place, so a crash leaves no
half-written cache and concurrent builders cannot clash.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

from launcher.errors import require
from launcher.indexing import iter_documents, total_bytes, write_indexed_dataset
from launcher.tokenizer import train_tokenizer

FORMAT_VERSION = 1  # bump when tokenizer settings or the document order change
MODEL_TYPE = "bpe"
SAMPLE_BYTES = 8_000_000  # tokenizer training sample
ORDER_SEED = 1234
TOKENIZER_FILE = "tokenizer.model"
DATASET_NAME = "stdlib"
MANIFEST = "manifest.json"
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files in sorted order, third-party packages excluded."""
    root = stdlib_dir()
    files = sorted(
        p
        for p in root.rglob("*.py")
        if p.is_file() and not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts)
    )
    require(bool(files), f"no .py files under the standard library {root}; give data.paths instead")
    return files


def document_order(files: Sequence[Path], seed: int = ORDER_SEED) -> list[Path]:
    """A fixed permutation of ``files``.

    Megatron splits a dataset into train/valid/test by contiguous document ranges; in sorted order the
    held-out share would be the alphabetically last packages (xml*, zipfile, zoneinfo). Shuffling
    once, with a fixed seed, makes the validation split a random sample of the library.
    """
    order = list(files)
    random.Random(seed).shuffle(order)
    return order


def cache_key(vocab_size: int, files: Sequence[Path] | None = None) -> str:
    """Python build + vocabulary size + format version (+ the file list when it is not the default)."""
    parts = [sys.version, str(stdlib_dir()), str(vocab_size), MODEL_TYPE, str(FORMAT_VERSION)]
    if files is not None:
        parts += [f"{f}:{f.stat().st_size}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def embedded_dir(cache_dir: str | Path, vocab_size: int, files: Sequence[Path] | None = None) -> Path:
    return Path(cache_dir) / f"embedded-{cache_key(vocab_size, files)}"


def prepare_embedded(
    cache_dir: str | Path,
    vocab_size: int,
    *,
    files: Sequence[Path] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Return (tokenizer model path, dataset prefix) of the embedded corpus, building it on first use.

    ``files`` replaces the standard library (tests use a handful of files); it is part of the key.
    """
    final = embedded_dir(cache_dir, vocab_size, files)
    model, prefix = final / TOKENIZER_FILE, final / DATASET_NAME
    if (final / MANIFEST).is_file():
        return model, prefix
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        t0 = time.monotonic()
        ordered = document_order(stdlib_files() if files is None else files)
        nbytes = total_bytes(ordered)
        if progress:
            print(
                f"embedded corpus: {len(ordered):,} files, {nbytes / 1e6:.1f} MB -> {final} (once)",
                file=sys.stderr,
                flush=True,
            )
        tokenizer = train_tokenizer(
            iter_documents(ordered),
            tmp / TOKENIZER_FILE,
            vocab_size=vocab_size,
            model_type=MODEL_TYPE,
            sample_bytes=SAMPLE_BYTES,
            total_bytes=nbytes,
        )
        t_tok = time.monotonic() - t0
        stats = write_indexed_dataset(
            ordered, tokenizer, tmp / DATASET_NAME, workers=workers, progress=progress
        )
        manifest = {
            "python": sys.version,
            "stdlib": str(stdlib_dir()),
            "format_version": FORMAT_VERSION,
            "vocab_size": vocab_size,
            "model_type": MODEL_TYPE,
            "files": len(ordered),
            "tokenizer_seconds": round(t_tok, 2),
            "total_seconds": round(time.monotonic() - t0, 2),
            **{k: v for k, v in stats.as_dict().items() if k != "prefix"},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            tmp.rename(final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not a concurrent builder's finished copy
                raise
        if progress:
            stats.prefix = str(prefix)
            print(
                f"embedded corpus ready in {manifest['total_seconds']:.1f} s: {stats.line()}", file=sys.stderr
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, prefix


def read_manifest(cache_dir: str | Path, vocab_size: int) -> dict:
    """The counts recorded when the default embedded corpus was built."""
    return json.loads((embedded_dir(cache_dir, vocab_size) / MANIFEST).read_text())
