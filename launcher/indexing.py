"""Text or JSONL files -> a Megatron indexed dataset (.bin/.idx), one document per file or JSON line.

Each document is written as one sequence followed by the tokenizer's EOD id, through megatron-core's
IndexedDatasetBuilder, so GPTDataset sees document boundaries. Reading, JSON parsing and tokenization
run in a process pool over the available cores; results come back in input order, so the output is
byte-identical whatever the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

from launcher.errors import RampError, require
from launcher.tokenizer import RampTokenizer, available_cores

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
CHUNK_BYTES = 4 << 20  # JSONL files are cut into line-aligned byte ranges of about this size


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def expand_inputs(inputs: Sequence[str | Path], suffixes: Sequence[str] | None = None) -> list[Path]:
    """Files as given; directories expanded to their files (recursive, sorted), skipping hidden
    files and __pycache__, and keeping only ``suffixes`` (e.g. [".py", ".jsonl"]) when given."""
    wanted = None if not suffixes else {s.lower() if s.startswith(".") else f".{s.lower()}" for s in suffixes}
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and not any(part.startswith(".") or part == "__pycache__" for part in f.relative_to(p).parts)
                and (wanted is None or f.suffix.lower() in wanted)
            )
            what = f" with suffix {', '.join(sorted(wanted))}" if wanted else ""
            require(bool(found), f"input directory {p} has no files{what}")
            files.extend(found)
        else:
            require(p.is_file(), f"input {p} not found")
            files.append(p)
    require(bool(files), "no input files given")
    return files


def total_bytes(files: Sequence[Path]) -> int:
    return sum(f.stat().st_size for f in files)


# ---------------------------------------------------------------------------------------------------------
# Work units: a whole text file, or a line-aligned byte range of a JSONL file. Each unit is read,
# parsed and tokenized by one worker.


@dataclass(frozen=True)
class _Unit:
    path: str
    start: int = 0
    end: int = -1  # -1: a whole text file (one document)


def _units(files: Sequence[Path]) -> list[_Unit]:
    units: list[_Unit] = []
    for f in files:
        if not is_jsonl(f):
            units.append(_Unit(str(f)))
            continue
        size = f.stat().st_size
        with open(f, "rb") as fh:
            start = 0
            while start < size:
                end = size
                if start + CHUNK_BYTES < size:
                    fh.seek(start + CHUNK_BYTES)
                    fh.readline()  # move the cut to the end of the line it fell in
                    end = fh.tell()
                units.append(_Unit(str(f), start, end))
                start = end
    return units


def _read_unit(unit: _Unit, text_key: str) -> tuple[list[str], int, int]:
    """Return (documents, bytes read, documents skipped) for one unit."""
    if unit.end < 0:
        data = Path(unit.path).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return [], len(data), 1
        return ([text], len(data), 0) if text else ([], len(data), 1)
    with open(unit.path, "rb") as fh:
        fh.seek(unit.start)
        data = fh.read(unit.end - unit.start)
    docs: list[str] = []
    skipped = 0
    offset = unit.start
    for line in data.split(b"\n"):
        where = offset
        offset += len(line) + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise RampError(f"{unit.path}: the line at byte {where} is not valid JSON") from None
        require(
            isinstance(record, dict) and text_key in record,
            f"{unit.path}: the line at byte {where} has no {text_key!r} field "
            "(choose the field with --text-key)",
        )
        text = record[text_key]
        require(isinstance(text, str), f"{unit.path}: {text_key!r} at byte {where} is not a string")
        if text:
            docs.append(text)
        else:
            skipped += 1
    return docs, len(data), skipped


_SP: spm.SentencePieceProcessor | None = None
_EOD = -1
_TEXT_KEY = "text"


def _init_worker(model_proto: bytes, eod: int, text_key: str) -> None:
    global _SP, _EOD, _TEXT_KEY
    _SP = spm.SentencePieceProcessor()
    _SP.LoadFromSerializedProto(model_proto)
    _EOD, _TEXT_KEY = eod, text_key


def _encode_unit(unit: _Unit) -> tuple[list[np.ndarray], int, int]:
    assert _SP is not None, "worker not initialised"
    docs, nbytes, skipped = _read_unit(unit, _TEXT_KEY)
    out = [np.asarray([*ids, _EOD], dtype=np.int32) for ids in _SP.encode(docs)] if docs else []
    return out, nbytes, skipped


# ---------------------------------------------------------------------------------------------------------


@dataclass
class IndexStats:
    """What was written; kept in manifests and printed by the tools."""

    prefix: str
    documents: int
    tokens: int  # including one EOD per document
    bytes: int
    skipped: int  # empty or non-UTF-8 documents
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        rate = self.bytes / 1e6 / max(self.seconds, 1e-9)
        return (
            f"{self.documents:,} documents, {self.tokens:,} tokens, {self.bytes / 1e6:.1f} MB in "
            f"{self.seconds:.1f} s ({rate:.1f} MB/s), {self.skipped} skipped -> {self.prefix}.bin/.idx"
        )


class _Progress:
    """Documents, tokens and MB/s on stderr: a live line on a terminal, a log line every 10 s otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.every = 1.0 if self.tty else 10.0

    def update(self, docs: int, tokens: int, nbytes: int, total: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < self.every):
            return
        self.last = now
        rate = nbytes / 1e6 / max(now - self.t0, 1e-9)
        pct = f" ({100 * nbytes / total:.0f}%)" if total else ""
        msg = f"indexing: {docs:,} docs, {tokens:,} tokens, {nbytes / 1e6:.1f} MB{pct}, {rate:.1f} MB/s"
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + msg, end=end, file=sys.stderr, flush=True)


def write_indexed_dataset(
    files: Sequence[Path],
    tokenizer: RampTokenizer,
    output_prefix: str | Path,
    *,
    text_key: str = "text",
    workers: int | None = None,
    progress: bool = True,
) -> IndexStats:
    """Tokenize ``files`` in the given order and write ``output_prefix``.bin/.idx atomically.

    A text file is one document; a ``.jsonl``/``.ndjson``/``.json`` file has one document per line
    (the ``text_key`` field). Empty and non-UTF-8 documents are skipped and counted.
    """
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    units = _units([Path(f) for f in files])
    workers = max(1, min(workers or available_cores(), len(units)))
    total = total_bytes([Path(f) for f in files])
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp_bin, tmp_idx = f"{prefix}.bin.tmp-{os.getpid()}", f"{prefix}.idx.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    docs = tokens = nbytes = skipped = 0
    bar = _Progress(progress)
    init_args = (tokenizer.model_proto, tokenizer.eod, text_key)
    try:
        for arrays, n, s in _map_units(units, workers, init_args):
            for arr in arrays:
                builder.add_item(torch.from_numpy(arr))
                builder.end_document()
                tokens += arr.size
            docs += len(arrays)
            nbytes += n
            skipped += s
            bar.update(docs, tokens, nbytes, total)
        require(docs > 0, f"no documents in {len(files)} input file(s): all empty or not UTF-8")
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, get_bin_path(prefix))
        os.replace(tmp_idx, get_idx_path(prefix))
    finally:
        builder.data_file.close()
        for t in (tmp_bin, tmp_idx):
            if os.path.exists(t):
                os.remove(t)
    bar.update(docs, tokens, nbytes, total, final=True)
    return IndexStats(prefix, docs, tokens, nbytes, skipped, round(time.monotonic() - bar.t0, 3))


def _map_units(
    units: list[_Unit], workers: int, init_args: tuple[bytes, int, str]
) -> Iterator[tuple[list[np.ndarray], int, int]]:
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(_encode_unit, units)
        return
    # fork: workers need only sentencepiece and numpy, and re-importing the caller's __main__
    # (spawn/forkserver) would cost seconds of torch/megatron imports per worker.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        yield from pool.imap(_encode_unit, units, chunksize=4)


def iter_documents(files: Sequence[Path], text_key: str = "text") -> Iterator[str]:
    """The documents of ``files`` in order, read in this process (for tokenizer sampling)."""
    for unit in _units(files):
        docs, _, _ = _read_unit(unit, text_key)
        yield from docs
