"""The trainer's data: megatron-core GPTDataset / BlendedDataset built from the recipe's data section.

Samples are addressed by number. The training order is a seeded permutation fixed by (data, seed,
sequence length, split), and a global batch is a contiguous range of sample numbers, so the data
position a checkpoint carries is one integer, and a resume or a batch-size change neither skips nor
repeats samples. The validation set is the first ``valid_samples`` sequences of the validation split's
own seeded permutation: the same fixed set for every run of the same data and seed.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, get_bin_path, get_idx_path
from torch.utils.data import Dataset, Subset

from launcher.corpus import prepare_embedded
from launcher.errors import RampError, require
from launcher.recipe import DataConfig
from launcher.tokenizer import RampTokenizer, load_tokenizer

SPLITS = ("train", "valid", "test")
# Extra samples megatron builds per blended source (its default); counted in the size check so that a
# blend that passes the check never silently starts a second epoch of a source.
SURPLUS = 0.005
SAMPLE_DTYPES = {
    "tokens": torch.int64,
    "labels": torch.int64,
    "loss_mask": torch.float32,
    "position_ids": torch.int64,
}


@dataclass
class DataBundle:
    tokenizer: RampTokenizer
    train: Dataset  # GPTDataset or BlendedDataset; sample i is the i-th sequence of the run
    valid: Dataset | None  # exactly valid_samples fixed sequences, or None
    index_key: str = ""  # names the sources' content (sizes, header, sampled blocks): resume fingerprint


def parse_blend(paths: list[Any]) -> tuple[list[str], list[float] | None]:
    """``[prefix, ...]`` -> (prefixes, None); ``[[weight, prefix], ...]`` -> (prefixes, weights)."""
    require(bool(paths), "data.paths is empty: give dataset prefixes or 'embedded'")
    pairs = [isinstance(p, (list, tuple)) for p in paths]
    require(
        all(pairs) or not any(pairs),
        f"data.paths={paths!r}: give either all prefixes or all [weight, prefix] pairs, not a mix",
    )
    if not any(pairs):
        require(all(isinstance(p, str) for p in paths), f"data.paths={paths!r}: prefixes must be strings")
        return [str(p) for p in paths], None
    prefixes, weights = [], []
    for p in paths:
        require(
            len(p) == 2
            and isinstance(p[0], (int, float))
            and not isinstance(p[0], bool)
            and isinstance(p[1], str),
            f"data.paths entry {list(p)!r}: expected [weight, prefix], e.g. [0.7, data/web]",
        )
        require(p[0] > 0, f"data.paths entry {list(p)!r}: the weight must be > 0")
        weights.append(float(p[0]))
        prefixes.append(p[1])
    return prefixes, weights


def build_datasets(
    cfg: DataConfig, seq_length: int, seed: int, train_samples: int, valid_samples: int
) -> DataBundle:
    """Build the train set (``train_samples`` sequences) and the fixed validation set on every rank.

    Call on all ranks after torch.distributed is initialised (any world size, gloo or nccl). With the
    embedded corpus, rank 0 prepares (or finds) the cache while the others wait. A dataset too small
    for the request is a one-line RampError, raised on every rank before any index is built.
    """
    require(seq_length > 0, f"seq_length={seq_length}: must be > 0")
    require(train_samples > 0, f"train_samples={train_samples}: must be > 0")
    require(valid_samples >= 0, f"valid_samples={valid_samples}: must be >= 0")
    if not dist.is_initialized():
        raise RuntimeError(
            "build_datasets needs torch.distributed initialised (a 1-process gloo group will do)"
        )

    if cfg.is_embedded:
        model_path, prefix = _embedded_on_rank0_first(cfg)
        tokenizer_path, prefixes, weights, labels = model_path, [str(prefix)], None, ["the embedded corpus"]
    else:
        prefixes, weights = parse_blend(cfg.paths)
        tokenizer_path, labels = cfg.tokenizer, list(prefixes)
    require(tokenizer_path is not None, "data.tokenizer: set the sentencepiece model that made data.paths")
    tokenizer = load_tokenizer(tokenizer_path)
    prefixes = [os.path.abspath(p) for p in prefixes]
    for p, label in zip(prefixes, labels):
        require(
            IndexedDataset.exists(p),
            f"data.paths: no dataset at {label} ({p}.bin/.idx missing); build one with ramp-prepare-data",
        )
    if weights is not None and len(prefixes) == 1:
        weights = None  # one source: a plain GPTDataset, no blending index

    max_epochs = cfg.max_epochs
    check_capacity(
        prefixes, labels, weights, cfg.split, seq_length, [train_samples, valid_samples, 0], max_epochs
    )

    index_cache = _index_cache_dir(cfg, prefixes)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=cfg.split,
        path_to_cache=str(index_cache),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model applies causal attention itself
        mid_level_dataset_surplus=SURPLUS,
    )
    sizes = [train_samples, valid_samples, 0]
    # Every rank reads its own micro-batches, so every rank builds (rank 0 first, the rest from its cache).
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    require(
        train is not None and len(train) >= train_samples,
        f"data: built {len(train) if train is not None else 0} train samples, "
        f"fewer than the {train_samples} needed",
    )
    fixed_valid = None
    if valid_samples > 0:
        require(
            valid is not None and len(valid) >= valid_samples,
            f"data: built {len(valid) if valid is not None else 0} validation samples, "
            f"fewer than the {valid_samples} needed",
        )
        fixed_valid = Subset(valid, range(valid_samples))
    return DataBundle(tokenizer=tokenizer, train=train, valid=fixed_valid, index_key=index_cache.name)


def check_capacity(
    prefixes: list[str],
    labels: list[str],
    weights: list[float] | None,
    split: str,
    seq_length: int,
    sizes: list[int],
    max_epochs: int = 1,
) -> None:
    """Raise a one-line RampError when a split cannot supply its samples without repeating data.

    Mirrors megatron's arithmetic: contiguous document ranges per split, (tokens - 1) // seq_length
    sequences per epoch (one extra token for the shifted labels), and ceil(size * weight) plus the
    blend surplus per source. Megatron itself would quietly loop over the data instead.
    """
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    indices = [DocumentIndex(p) for p in prefixes]
    norm = None if weights is None else [w / sum(weights) for w in weights]

    def capacity(tokens: int, epochs: int) -> int:
        return max(0, (epochs * tokens - 1) // seq_length) if tokens > 0 else 0

    for i, (name, size) in enumerate(zip(SPLITS, sizes)):
        require(
            size <= 0 or matrix[i] is not None,
            f"data.split={split!r} gives the {name} split weight 0 "
            f"but {size:,} {name} samples are requested; "
            f"give the {name} split a share (e.g. 98,2,0)"
            + (" or set training.eval_samples=0" if i == 1 else ""),
        )
        if matrix[i] is None:
            continue
        stats = []
        for index, label in zip(indices, labels):
            beg, end = (round(b * index.count) for b in matrix[i])
            # megatron loops forever over a split with weight but no tokens, even for 0 samples
            require(
                end > beg,
                f"data.split={split!r} leaves the {name} split of {label} without documents "
                f"(it has {index.count:,}); give the {name} split a larger share, or weight 0 if unused",
            )
            stats.append((end - beg, index.tokens(beg, end)))
        if size <= 0:
            continue
        epochs = max_epochs if name == "train" else 1
        hint = (
            "train on fewer tokens or add data"
            if name == "train"
            else f"lower training.eval_samples or give the valid split more than data.split={split!r}"
        )
        if norm is None and len(prefixes) > 1:  # megatron blends one epoch of each source by its length
            have = sum(capacity(t, 1) for _, t in stats)
            docs, tokens = sum(d for d, _ in stats), sum(t for _, t in stats)
            _short(name, "the sources together", docs, tokens, have, size, seq_length, hint)
            continue
        for k, (docs, tokens) in enumerate(stats):
            need = size if norm is None else math.ceil(math.ceil(size * norm[k]) * (1 + SURPLUS))
            _short(name, labels[k], docs, tokens, capacity(tokens, epochs), need, seq_length, hint)


_IDX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


class DocumentIndex:
    """A megatron ``.idx`` read lazily: its header at construction, then only the entries asked for.

    The tokens of documents [beg, end) are the distance between their pointers into the ``.bin`` plus the
    last one's length: three numbers, whatever the corpus size (the whole lengths array is gigabytes at
    trillion-token scale, and every rank checks capacity at every start).
    """

    def __init__(self, prefix: str) -> None:
        self.path = get_idx_path(prefix)
        size = os.path.getsize(self.path)
        with open(self.path, "rb", buffering=0) as f:  # unbuffered: read only the bytes asked for
            header = f.read(_IDX_HEADER.size)
        ok = len(header) == _IDX_HEADER.size
        magic, version, code, self.count, documents = _IDX_HEADER.unpack(header) if ok else (b"", 0, 0, 0, 0)
        require(
            ok and magic == b"MMIDIDX\x00\x00" and version == 1,
            f"data: {self.path} is not a megatron index (bad header); rebuild it with ramp-prepare-data",
        )
        expected = _IDX_HEADER.size + 12 * self.count + 8 * documents
        require(
            size >= expected,
            f"data: {self.path} is truncated ({size:,} bytes, its header needs {expected:,}); rebuild it "
            "with ramp-prepare-data",
        )
        self.itemsize = DType.size(DType.dtype_from_code(code))
        self._lengths_at = _IDX_HEADER.size
        self._pointers_at = self._lengths_at + 4 * self.count

    def tokens(self, beg: int, end: int) -> int:
        if end <= beg:
            return 0
        with open(self.path, "rb", buffering=0) as f:
            first, last = (self._read(f, self._pointers_at + 8 * i, "<q") for i in (beg, end - 1))
            last_length = self._read(f, self._lengths_at + 4 * (end - 1), "<i")
        return (last - first) // self.itemsize + last_length

    @staticmethod
    def _read(f, offset: int, fmt: str) -> int:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _short(name: str, label: str, docs: int, tokens: int, have: int, need: int, seq: int, hint: str) -> None:
    if have >= need:
        return
    short = need - have
    raise RampError(
        f"data: the {name} split of {label} is too small: {tokens:,} tokens in {docs:,} documents make "
        f"{have:,} sequences of {seq} tokens, but {need:,} are needed ({short:,} sequences, ~{short * seq:,} "
        f"tokens short); {hint}"
    )


def _embedded_on_rank0_first(cfg: DataConfig) -> tuple[Path, Path]:
    """Rank 0 builds (or finds) the cache; the others wait and get its paths or its error."""
    cache, vocab = Path(cfg.cache_dir), cfg.embedded_vocab_size
    if dist.get_world_size() == 1:
        return prepare_embedded(cache, vocab)
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload = [prepare_embedded(cache, vocab)]
        except Exception as e:  # tell the waiting ranks, then fail here too
            failure = e
            payload = [f"{type(e).__name__}: {e}" if not isinstance(e, RampError) else str(e)]
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    if isinstance(payload[0], str):
        raise RampError(f"preparing the embedded corpus failed on rank 0: {payload[0]}")
    if dist.get_rank() == 0:
        return payload[0]
    # A shared cache_dir is a cache hit here; a node-local one is rebuilt identically on this node.
    return prepare_embedded(cache, vocab, progress=False)


def _index_cache_dir(cfg: DataConfig, prefixes: list[str]) -> Path:
    """Megatron keys its sample indices by path, not content: add the content so a rebuilt dataset
    at the same prefix never reuses stale indices."""
    h = hashlib.sha256()
    for p in prefixes:
        h.update(p.encode())
        for f in (get_idx_path(p), get_bin_path(p)):
            h.update(sampled_digest(Path(f)))
    return Path(cfg.cache_dir) / "indices" / h.hexdigest()[:16]


def sampled_digest(path: Path, blocks: int = 16, block: int = 4096) -> bytes:
    """Size, header and ``blocks`` evenly spaced blocks: a content key that costs the same at any scale
    (a rebuilt dataset changes its size or its index header's counts and offsets)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb", buffering=0) as f:
        for i in range(blocks + 1):
            f.seek(min(size, (size - block) * i // blocks) if size > block else 0)
            h.update(f.read(block))
    return h.digest()


# What each pipeline stage reads: the first embeds tokens at positions, the last scores labels under the
# loss mask, a middle stage only receives activations (megatron's schedules hand it None).
FIRST_STAGE_FIELDS = ("tokens", "position_ids")
LAST_STAGE_FIELDS = ("labels", "loss_mask")


def stage_fields(first: bool, last: bool) -> tuple[str, ...]:
    """The sample fields a rank of a first and/or last pipeline stage reads (none for a middle stage)."""
    return tuple(
        k for k in SAMPLE_DTYPES if (first and k in FIRST_STAGE_FIELDS) or (last and k in LAST_STAGE_FIELDS)
    )


def microbatches(
    dataset: Dataset,
    start_sample: int,
    global_batch: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    fields: tuple[str, ...] = tuple(SAMPLE_DTYPES),
    pin_memory: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch [start_sample, start_sample + global_batch).

    Micro-batch j of rank r holds samples start + (j * dp_size + r) * micro_batch + [0, micro_batch):
    the ranks' micro-batches tile the global batch exactly, and depend only on sample numbers. Only
    ``fields`` are kept; with none (a middle pipeline stage) no sample is read and every micro-batch is
    ``{}``. ``pin_memory`` (CUDA only) pages the tensors in, so a ``non_blocking`` copy overlaps.
    """
    per_step = micro_batch * dp_size
    if micro_batch <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size or start_sample < 0:
        raise ValueError(f"microbatches: bad arguments {micro_batch=} {dp_rank=} {dp_size=} {start_sample=}")
    if global_batch <= 0 or global_batch % per_step:
        raise ValueError(
            f"microbatches: global_batch={global_batch} is not a multiple of micro_batch*dp={per_step}"
        )
    end = start_sample + global_batch
    require(
        end <= len(dataset),
        f"data: samples up to {end:,} were requested but the dataset holds {len(dataset):,}; "
        "build it for the whole run (train_samples) before training",
    )
    out: list[dict[str, torch.Tensor]] = []
    for j in range(global_batch // per_step):
        if not fields:
            out.append({})
            continue
        first = start_sample + (j * dp_size + dp_rank) * micro_batch
        samples = [dataset[first + k] for k in range(micro_batch)]
        batch = {key: torch.stack([s[key] for s in samples]).to(SAMPLE_DTYPES[key]) for key in fields}
        out.append({k: v.pin_memory() for k, v in batch.items()} if pin_memory else batch)
    return out


@dataclass(frozen=True)
class BatchKey:
    """Everything that fixes a rank's micro-batches of one step: the data position, the global batch,
    the micro-batch size, the rank's place in data parallelism and the fields its stage reads. A
    prefetched batch is used only for an equal key (and the same dataset object)."""

    start: int
    global_batch: int
    micro_batch: int
    dp_rank: int
    dp_size: int
    fields: tuple[str, ...]


class Prefetcher:
    """Reads the next step's micro-batches on one background thread while this step trains.

    The trainer guesses the next step's :class:`BatchKey` at the start of a step (the next data position
    and the batch phase there); the step that comes asks with the key its callbacks actually fixed (a batch
    schedule, a layout switch or a rewind may change it). A guess that matches is used; any other is
    dropped and the batch is read on the spot, so what trains never depends on the guess. A thread, not
    DataLoader workers: reading a step is a few memory-mapped slices, and the thread sees the same
    dataset object without pickling it.
    """

    def __init__(self, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ramp-data")
        self._pending: tuple[Dataset, BatchKey, Future] | None = None
        self.hits = self.misses = self.dropped = 0

    def _read(self, dataset: Dataset, key: BatchKey) -> list[dict[str, torch.Tensor]]:
        return microbatches(
            dataset,
            key.start,
            key.global_batch,
            key.micro_batch,
            key.dp_rank,
            key.dp_size,
            key.fields,
            pin_memory=self.pin_memory,
        )

    def prefetch(self, dataset: Dataset, key: BatchKey) -> None:
        """Start reading ``key``'s batches (replacing any earlier guess)."""
        self._drop()
        self._pending = (dataset, key, self._pool.submit(self._read, dataset, key))

    def get(self, dataset: Dataset, key: BatchKey) -> list[dict[str, torch.Tensor]]:
        """``key``'s micro-batches: the prefetched ones if they are exactly these, else read now."""
        pending = self._pending
        if pending is not None and pending[0] is dataset and pending[1] == key:
            self._pending = None
            self.hits += 1
            return pending[2].result()  # a read error is raised here, as the direct read would
        self._drop()
        self.misses += 1
        return self._read(dataset, key)

    def _drop(self) -> None:
        if self._pending is not None:
            self._pending[2].cancel()  # a read under way finishes on the thread and is discarded
            self._pending = None
            self.dropped += 1

    def close(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)
