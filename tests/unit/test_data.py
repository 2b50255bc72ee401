"""Data layer: tokenizer round trip, indexed datasets, megatron datasets, micro-batches, embedded corpus."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import pickle
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizerBase

from launcher import corpus
from launcher.corpus import prepare_embedded, stdlib_dir, stdlib_files
from launcher.data import (
    BatchKey,
    DocumentIndex,
    Prefetcher,
    build_datasets,
    microbatches,
    parse_blend,
    sampled_digest,
    stage_fields,
)
from launcher.errors import RampError
from launcher.indexing import expand_inputs, iter_documents, write_indexed_dataset
from launcher.recipe import DataConfig
from launcher.tokenizer import EOD_ID, PAD_ID, load_tokenizer, train_tokenizer

VOCAB = 512
SEQ = 32
TRICKY = [
    "\t\tx = 1\r\n",
    "  two  spaces  and a trailing one ",
    "é e\u0301 ﬁ 😀 Ａ 中文",
    "</s><pad><unk> are plain text here\n\n\n",
    "\x0c\x00\x7f control characters",
    "",
    " ",
]


def _sample_files(n: int = 12) -> list[Path]:
    """A deterministic handful of mid-sized top-level stdlib modules (~200 KB)."""
    root = stdlib_dir()
    picked = [p for p in stdlib_files() if p.parent == root and 4_000 <= p.stat().st_size <= 30_000]
    assert len(picked) >= n
    return picked[:n]


@pytest.fixture(scope="module")
def files() -> list[Path]:
    return _sample_files()


@pytest.fixture(scope="module")
def tok(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "t.model"
    return train_tokenizer(iter_documents(files), out, vocab_size=VOCAB, threads=2)


@pytest.fixture(scope="module")
def dataset(files, tok, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("ds") / "sample"
    stats = write_indexed_dataset(files, tok, prefix, workers=2, progress=False)
    return prefix, stats


def _lengths(prefix) -> np.ndarray:
    # Copy while the IndexedDataset lives: its arrays view an mmap that its __del__ closes.
    ds = IndexedDataset(str(prefix))
    return np.array(ds.sequence_lengths)


def _cfg(tmp_path: Path, paths, tokenizer, split: str = "80,20,0") -> DataConfig:
    return DataConfig(paths=paths, tokenizer=str(tokenizer), split=split, cache_dir=str(tmp_path / "cache"))


# --- tokenizer ---------------------------------------------------------------------------------------


def test_round_trip_on_corpus_sample(files, tok):
    texts = [f.read_text(encoding="utf-8") for f in files]
    for text in texts + TRICKY:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Learned merges, not a byte-level fallback for everything: well under 1 token per byte.
    assert sum(len(tok.encode(t)) for t in texts) < 0.6 * sum(len(t.encode()) for t in texts)


def test_tokenizer_is_a_megatron_tokenizer(tok, tmp_path, files):
    assert isinstance(tok, MegatronTokenizerBase)
    assert (tok.vocab_size, tok.eod, tok.pad) == (VOCAB, EOD_ID, PAD_ID)
    assert tok.detokenize(tok.tokenize("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"
    assert tok.vocab["\n"] == tok.encode("\n")[0]
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("import os\n") == tok.encode("import os\n")
    # A different model at the same path must not share megatron's index cache key.
    other = train_tokenizer(iter_documents(files[:4]), tmp_path / "t.model", vocab_size=400)
    assert other.unique_identifiers["md5"] != tok.unique_identifiers["md5"]


def test_unigram_round_trip(files, tmp_path):
    uni = train_tokenizer(
        iter_documents(files[:6]), tmp_path / "u.model", vocab_size=400, model_type="unigram"
    )
    for text in [f.read_text(encoding="utf-8") for f in files[6:]] + TRICKY:
        assert uni.decode(uni.encode(text)) == text


def test_tokenizer_errors_are_one_line(files, tmp_path):
    with pytest.raises(RampError, match="too small"):
        train_tokenizer(iter_documents(files), tmp_path / "x.model", vocab_size=256)
    with pytest.raises(RampError, match="model_type"):
        train_tokenizer(iter_documents(files), tmp_path / "x.model", model_type="wordpiece")
    with pytest.raises(RampError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(RampError, match="not a sentencepiece model") as e:
        load_tokenizer(tmp_path / "junk.model")
    assert "\n" not in str(e.value)


# --- indexed dataset ---------------------------------------------------------------------------------


def test_indexed_dataset_counts_match(files, tok, dataset):
    prefix, stats = dataset
    texts = [f.read_text(encoding="utf-8") for f in files]
    expected = [len(tok.encode(t)) + 1 for t in texts]  # + one EOD per document
    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(texts) == stats.documents
    assert ds.document_indices.tolist() == list(range(len(texts) + 1))  # one sequence per document
    assert ds.sequence_lengths.tolist() == expected
    assert int(ds.sequence_lengths.sum()) == sum(expected) == stats.tokens
    assert ds.index.dtype == np.uint16
    for i, text in enumerate(texts):
        doc = ds[i]
        assert doc[-1] == tok.eod and tok.eod not in doc[:-1]
        assert tok.decode(doc[:-1].tolist()) == text


def test_output_does_not_depend_on_worker_count(files, tok, dataset, tmp_path):
    prefix, _ = dataset
    write_indexed_dataset(files, tok, tmp_path / "one", workers=1, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == Path(f"{prefix}{ext}").read_bytes()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_jsonl_one_document_per_line(files, tok, tmp_path):
    texts = [f.read_text(encoding="utf-8") for f in files[:5]]
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)]
    path.write_text("\n".join([*lines[:2], "", json.dumps({"body": ""}), *lines[2:]]) + "\n")
    stats = write_indexed_dataset([path], tok, tmp_path / "j", text_key="body", workers=2, progress=False)
    ds = IndexedDataset(str(tmp_path / "j"))
    assert (stats.documents, stats.skipped, len(ds)) == (5, 1, 5)
    assert [tok.decode(ds[i][:-1].tolist()) for i in range(5)] == texts
    assert list(iter_documents([path], "body")) == texts

    with pytest.raises(RampError, match="no 'text' field"):
        write_indexed_dataset([path], tok, tmp_path / "k", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n{oops\n")
    with pytest.raises(RampError, match=r"bad.jsonl: the line at byte \d+ is not valid JSON"):
        write_indexed_dataset([bad], tok, tmp_path / "k", text_key="body", progress=False)
    assert not (tmp_path / "k.bin").exists()


def test_expand_inputs(tmp_path):
    (tmp_path / "d" / "__pycache__").mkdir(parents=True)
    (tmp_path / "d" / "b.py").write_text("b")
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "d" / ".hidden").write_text("h")
    (tmp_path / "d" / "__pycache__" / "b.pyc").write_bytes(b"\x00")
    assert [p.name for p in expand_inputs([tmp_path / "d"])] == ["a.txt", "b.py"]
    assert [p.name for p in expand_inputs([tmp_path / "d"], [".py"])] == ["b.py"]
    with pytest.raises(RampError, match="not found"):
        expand_inputs([tmp_path / "nope.txt"])


# --- megatron datasets -------------------------------------------------------------------------------


def _tokens(ds, n: int) -> list[list[int]]:
    return [ds[i]["tokens"].tolist() for i in range(n)]


def test_build_datasets_deterministic(pg, tok, dataset, tmp_path):
    prefix, stats = dataset
    cfg = _cfg(tmp_path, [str(prefix)], tok.path)
    b = build_datasets(cfg, SEQ, seed=7, train_samples=300, valid_samples=24)
    assert isinstance(b.train, GPTDataset) and len(b.train) >= 300
    assert len(b.valid) == 24
    assert b.tokenizer.vocab_size == VOCAB
    s = b.train[0]
    assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert s["tokens"].shape == s["labels"].shape == (SEQ,)
    assert torch.equal(s["tokens"][1:], s["labels"][:-1])  # labels are the next tokens
    assert torch.equal(s["position_ids"], torch.arange(SEQ))
    assert bool((s["loss_mask"] == 1).all())
    # The train split holds ~80% of the tokens, cut into sequences without overlap.
    assert 0.6 * stats.tokens / SEQ < len(b.train) <= stats.tokens / SEQ

    again = build_datasets(cfg, SEQ, seed=7, train_samples=300, valid_samples=24)  # from the index cache
    assert _tokens(again.train, 300) == _tokens(b.train, 300)
    assert _tokens(again.valid, 24) == _tokens(b.valid, 24)
    # A longer run sees the same first samples and the same fixed validation set.
    longer = build_datasets(cfg, SEQ, seed=7, train_samples=400, valid_samples=24)
    assert _tokens(longer.train, 300) == _tokens(b.train, 300)
    assert _tokens(longer.valid, 24) == _tokens(b.valid, 24)
    other = build_datasets(cfg, SEQ, seed=8, train_samples=300, valid_samples=24)
    assert _tokens(other.train, 50) != _tokens(b.train, 50)
    # Validation sequences come from held-out documents, never from the train split.
    train_seqs = {tuple(t) for t in _tokens(b.train, len(b.train))}
    assert not train_seqs & {tuple(t) for t in _tokens(b.valid, 24)}
    assert build_datasets(cfg, SEQ, seed=7, train_samples=300, valid_samples=0).valid is None


def test_blend_with_weights(pg, files, tok, tmp_path):
    write_indexed_dataset(files[:6], tok, tmp_path / "a", progress=False)
    write_indexed_dataset(files[6:], tok, tmp_path / "b", progress=False)
    cfg = _cfg(tmp_path, [[3, str(tmp_path / "a")], [1, str(tmp_path / "b")]], tok.path)
    b = build_datasets(cfg, SEQ, seed=1, train_samples=400, valid_samples=8)
    assert isinstance(b.train, BlendedDataset)
    share = np.mean([int(b.train[i]["dataset_id"]) == 0 for i in range(400)])
    assert abs(share - 0.75) < 0.01
    mbs = microbatches(b.train, 0, 8, 4, 0, 1)
    assert set(mbs[0]) == {"tokens", "labels", "loss_mask", "position_ids"}
    plain = build_datasets(
        _cfg(tmp_path, [str(tmp_path / "a"), str(tmp_path / "b")], tok.path), SEQ, 1, 400, 8
    )
    assert len(plain.train) >= 400


def test_parse_blend():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend([[0.3, "a"], [0.7, "b"]]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(RampError, match="not a mix"):
        parse_blend(["a", [1, "b"]])
    with pytest.raises(RampError, match="must be > 0"):
        parse_blend([[0, "a"]])


def test_too_small_dataset_is_a_one_line_error(pg, files, tok, dataset, tmp_path):
    prefix, stats = dataset
    cfg = _cfg(tmp_path, [str(prefix)], tok.path)
    too_many = stats.tokens // SEQ + 10
    with pytest.raises(RampError, match=r"train split .* too small.* sequences, ~[\d,]+ tokens short") as e:
        build_datasets(cfg, SEQ, seed=1, train_samples=too_many, valid_samples=0)
    assert "\n" not in str(e.value) and str(prefix) in str(e.value)
    assert not (tmp_path / "cache" / "indices").exists()  # refused before any index was built
    with pytest.raises(RampError, match=r"valid split .* too small"):
        build_datasets(cfg, SEQ, seed=1, train_samples=10, valid_samples=stats.tokens // SEQ)
    with pytest.raises(RampError, match="gives the valid split weight 0 but 8 valid samples"):
        build_datasets(_cfg(tmp_path, [str(prefix)], tok.path, split="100,0,0"), SEQ, 1, 10, 8)
    # The check counts exactly: the largest train request that fits builds, one more does not.
    lengths = _lengths(prefix)
    n_train = round(0.8 * len(lengths))
    fits = (int(lengths[:n_train].sum()) - 1) // SEQ
    assert len(build_datasets(cfg, SEQ, 1, fits, 0).train) == fits
    with pytest.raises(RampError, match=r"\(1 sequences, ~32 tokens short\)"):
        build_datasets(cfg, SEQ, 1, fits + 1, 0)
    # 12 documents split 90,5,5 leave the valid split empty; megatron would spin forever on it.
    with pytest.raises(RampError, match=r"leaves the valid split of .* without documents"):
        build_datasets(_cfg(tmp_path, [str(prefix)], tok.path, split="90,5,5"), SEQ, 1, 10, 0)
    with pytest.raises(RampError, match="no dataset at"):
        build_datasets(_cfg(tmp_path, [str(tmp_path / "missing")], tok.path), SEQ, 1, 10, 0)


def _bytes_read() -> int:
    """This process's bytes read through read() so far (Linux /proc/self/io ``rchar``)."""
    return int(
        next(ln for ln in Path("/proc/self/io").read_text().splitlines() if ln.startswith("rchar:"))[7:]
    )


@pytest.fixture(scope="module")
def big_index(tmp_path_factory):
    """200,000 documents of 1-60 tokens, written by megatron's own builder (no tokenizer needed)."""
    prefix = str(tmp_path_factory.mktemp("big") / "big")
    lengths = np.random.default_rng(0).integers(1, 61, size=200_000)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for n in lengths:
        builder.add_item(torch.arange(int(n)) % 1000)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix, lengths


def test_document_tokens_are_read_lazily(big_index):
    prefix, lengths = big_index
    before = _bytes_read()
    index = DocumentIndex(prefix)
    got = [index.tokens(beg, end) for beg, end in ((0, 160_000), (160_000, 200_000), (7, 8), (5, 5))]
    read = _bytes_read() - before
    assert got == [int(lengths[:160_000].sum()), int(lengths[160_000:].sum()), int(lengths[7]), 0]
    assert index.count == 200_000
    # The header and three numbers per range (+ the /proc read itself), not the 2.4 MB of lengths/pointers.
    assert read < 1024, read


def test_truncated_index_is_refused_in_one_line(big_index, tmp_path):
    prefix, _ = big_index
    cut = tmp_path / "cut"
    data = Path(prefix + ".idx").read_bytes()
    (tmp_path / "cut.idx").write_bytes(data[: len(data) // 2])
    with pytest.raises(RampError, match=r"cut.idx is truncated \([\d,]+ bytes, its header needs [\d,]+\)"):
        DocumentIndex(str(cut))


def test_content_key_reads_a_fixed_sample_and_sees_a_flipped_byte_in_it(big_index, tmp_path):
    prefix, _ = big_index
    blocks, block = 16, 4096
    source = Path(prefix + ".bin")
    size = source.stat().st_size
    assert size > 100 * (blocks + 1) * block  # a sample of it, not the file
    before = _bytes_read()
    key = sampled_digest(source, blocks, block)
    assert _bytes_read() - before <= (blocks + 1) * block + 512
    data = bytearray(source.read_bytes())
    copy = tmp_path / "copy.bin"
    copy.write_bytes(bytes(data))
    assert sampled_digest(copy, blocks, block) == key
    inside = (size - block) * 5 // blocks + 100  # in the 6th sampled block
    data[inside] ^= 0x01
    copy.write_bytes(bytes(data))
    assert sampled_digest(copy, blocks, block) != key
    copy.write_bytes(bytes(data[:-1]))  # a different size changes the key wherever it differs
    assert sampled_digest(copy, blocks, block) != key


# --- micro-batches -----------------------------------------------------------------------------------


class _Numbered(torch.utils.data.Dataset):
    """Sample i is filled with the number i, so a batch shows which samples it holds."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        full = torch.full((SEQ,), i, dtype=torch.int64)
        return {
            "tokens": full,
            "labels": full + 1,
            "loss_mask": torch.ones(SEQ),
            "position_ids": torch.arange(SEQ),
        }


@pytest.mark.parametrize(("dp_size", "micro"), [(1, 4), (2, 2), (4, 1), (2, 4)])
def test_microbatches_partition_the_global_batch(dp_size, micro):
    ds, start, gb = _Numbered(), 37, 16
    seen: list[int] = []
    for r in range(dp_size):
        mbs = microbatches(ds, start, gb, micro, r, dp_size)
        assert len(mbs) == gb // (micro * dp_size)
        for j, mb in enumerate(mbs):
            assert mb["tokens"].shape == (micro, SEQ) and mb["tokens"].dtype == torch.int64
            assert mb["labels"].dtype == torch.int64 and mb["position_ids"].dtype == torch.int64
            assert mb["loss_mask"].dtype == torch.float32
            ids = mb["tokens"][:, 0].tolist()
            first = start + (j * dp_size + r) * micro
            assert ids == list(range(first, first + micro))
            seen += ids
    assert sorted(seen) == list(range(start, start + gb))  # exact cover, no overlap


def test_microbatches_errors():
    ds = _Numbered()
    with pytest.raises(ValueError, match="not a multiple"):
        microbatches(ds, 0, 10, 4, 0, 1)
    with pytest.raises(ValueError):
        microbatches(ds, 0, 8, 4, 2, 2)
    with pytest.raises(RampError, match="dataset holds 1,000"):
        microbatches(ds, 992, 16, 4, 0, 1)


def test_microbatches_read_the_real_dataset(pg, tok, dataset, tmp_path):
    prefix, _ = dataset
    b = build_datasets(_cfg(tmp_path, [str(prefix)], tok.path), SEQ, 3, 64, 0)
    mbs = microbatches(b.train, 8, 16, 2, 1, 2)
    assert torch.equal(mbs[1]["tokens"][0], b.train[8 + (1 * 2 + 1) * 2]["tokens"])


class _Recorded(_Numbered):
    """Numbered samples that note which sample each read asked for, and on which thread."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, str]] = []

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.reads.append((i, threading.current_thread().name))
        return super().__getitem__(i)


def _ids(batches: list[dict[str, torch.Tensor]]) -> list[list[int]]:
    return [mb["tokens"][:, 0].tolist() for mb in batches]


ALL = ("tokens", "labels", "loss_mask", "position_ids")


def test_stage_fields():
    assert stage_fields(True, True) == ALL
    assert stage_fields(True, False) == ("tokens", "position_ids")
    assert stage_fields(False, True) == ("labels", "loss_mask")
    assert stage_fields(False, False) == ()


def test_prefetch_hit_is_read_on_the_thread_and_equals_the_samples():
    ds, pf = _Recorded(), Prefetcher()
    key = BatchKey(start=40, global_batch=8, micro_batch=2, dp_rank=1, dp_size=2, fields=ALL)
    pf.prefetch(ds, key)
    got = pf.get(ds, key)
    # rank 1 of 2, micro-batch 2: samples 40 + (j*2 + 1)*2 + [0, 2) for j = 0, 1 (by hand)
    assert _ids(got) == [[42, 43], [46, 47]]
    assert sorted(i for i, _ in ds.reads) == [42, 43, 46, 47]
    assert {t for _, t in ds.reads} == {"ramp-data_0"}  # the background reader, not this thread
    assert (pf.hits, pf.misses, pf.dropped) == (1, 0, 0)
    pf.close()


@pytest.mark.parametrize(
    "change",
    [
        {"start": 48},  # a rewind or a skipped window moved the data position
        {"global_batch": 16},  # the batch schedule changed the batch at the step start
        {"micro_batch": 1},  # a phase with another micro-batch size
        {"dp_rank": 0, "dp_size": 4},  # a layout switch changed data parallelism
        {"fields": ("labels", "loss_mask")},  # ... or the pipeline stage of this rank
    ],
    ids=["position", "batch", "micro_batch", "dp", "stage"],
)
def test_stale_prefetch_is_dropped_and_the_asked_batch_read(change):
    ds, pf = _Recorded(), Prefetcher()
    guess = BatchKey(start=40, global_batch=8, micro_batch=2, dp_rank=1, dp_size=2, fields=ALL)
    asked = dataclasses.replace(guess, **change)
    pf.prefetch(ds, guess)
    got = pf.get(ds, asked)
    assert (pf.hits, pf.misses, pf.dropped) == (0, 1, 1)
    per_step = asked.micro_batch * asked.dp_size
    want = [
        list(range(f, f + asked.micro_batch))
        for j in range(asked.global_batch // per_step)
        for f in [asked.start + (j * asked.dp_size + asked.dp_rank) * asked.micro_batch]
    ]
    if "tokens" in asked.fields:
        assert _ids(got) == want
    else:
        assert [mb["labels"][:, 0].tolist() for mb in got] == [[i + 1 for i in ids] for ids in want]
    assert all(set(mb) == set(asked.fields) for mb in got)
    # the next guess is used again once it is right
    pf.prefetch(ds, asked)
    again = pf.get(ds, asked)
    assert pf.hits == 1 and len(again) == len(got)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(again, got) for k in asked.fields)
    pf.close()


def test_prefetch_for_another_dataset_is_not_used():
    a, b, pf = _Recorded(), _Recorded(), Prefetcher()
    key = BatchKey(0, 4, 2, 0, 1, ALL)
    pf.prefetch(a, key)
    pf.get(b, key)
    assert (pf.hits, pf.misses, pf.dropped) == (0, 1, 1) and b.reads
    pf.close()


def test_middle_stage_reads_nothing():
    ds, pf = _Recorded(), Prefetcher()
    key = BatchKey(0, 16, 2, 0, 2, ())
    pf.prefetch(ds, key)
    assert pf.get(ds, key) == [{}] * 4  # four micro-batches for the schedule, no sample read
    assert ds.reads == []
    pf.close()


def test_prefetch_errors_surface_only_for_the_batch_asked():
    ds, pf = _Numbered(), Prefetcher()
    past_end = BatchKey(992, 16, 4, 0, 1, ALL)
    pf.prefetch(ds, past_end)
    assert _ids(pf.get(ds, BatchKey(0, 4, 4, 0, 1, ALL))) == [[0, 1, 2, 3]]  # the bad guess is dropped
    pf.prefetch(ds, past_end)
    with pytest.raises(RampError, match="dataset holds 1,000"):
        pf.get(ds, past_end)
    pf.close()


# --- embedded corpus ---------------------------------------------------------------------------------


def test_stdlib_files_sorted_without_site_packages():
    found = stdlib_files()
    assert found == sorted(found) and len(found) > 500
    assert not any("site-packages" in p.parts or "dist-packages" in p.parts for p in found)
    assert stdlib_dir() / "os.py" in found


def test_prepare_embedded_caches_atomically(files, tmp_path, monkeypatch):
    small = files[:8]
    model, prefix = prepare_embedded(tmp_path, 400, files=small, workers=2, progress=False)
    assert model.is_file() and IndexedDataset.exists(str(prefix))
    manifest = json.loads((prefix.parent / "manifest.json").read_text())
    assert manifest["documents"] == len(IndexedDataset(str(prefix))) == len(small)
    assert manifest["tokens"] == int(_lengths(prefix).sum())
    assert [p.name for p in tmp_path.iterdir()] == [prefix.parent.name]  # no temporary left

    def boom(*args, **kwargs):
        raise RuntimeError("must not rebuild")

    monkeypatch.setattr(corpus, "train_tokenizer", boom)
    assert prepare_embedded(tmp_path, 400, files=small, progress=False) == (model, prefix)
    # A crash while building leaves neither a cache nor a temporary directory behind.
    with pytest.raises(RuntimeError, match="must not rebuild"):
        prepare_embedded(tmp_path, 401, files=small, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [prefix.parent.name]


@pytest.mark.slow
def test_embedded_corpus_full(tmp_path, pg):
    model, prefix = prepare_embedded(tmp_path, 4096)
    tok = load_tokenizer(model)
    ds = IndexedDataset(str(prefix))
    manifest = json.loads((prefix.parent / "manifest.json").read_text())
    docs = list(iter_documents(corpus.document_order(stdlib_files())))
    assert len(ds) == len(docs) == manifest["documents"]
    lengths = ds.sequence_lengths
    for i, text in enumerate(docs):
        ids = ds[i]
        assert len(ids) == lengths[i] and ids[-1] == tok.eod
        assert tok.decode(ids[:-1].tolist()) == text
    assert int(lengths.sum()) == manifest["tokens"] > 5_000_000
    b = build_datasets(
        DataConfig(cache_dir=str(tmp_path)), 256, 1234, train_samples=20_000, valid_samples=384
    )
    assert len(b.valid) == 384 and b.tokenizer.vocab_size == 4096


# --- two ranks ---------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, store: str, prefix: str, model: str, cache: str, out) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        cfg = DataConfig(paths=[prefix], tokenizer=model, split="80,20,0", cache_dir=cache)
        b = build_datasets(cfg, SEQ, 5, 64, 8)
        mbs = microbatches(b.train, 16, 16, 4, rank, world)
        result = {"mb": [m["tokens"][:, :4].tolist() for m in mbs], "valid": _tokens(b.valid, 8)}
        try:  # rank 0 fails to prepare the embedded corpus: every rank must raise, none may hang
            build_datasets(DataConfig(cache_dir=str(Path(cache) / "a-file")), SEQ, 5, 64, 8)
        except Exception as e:
            result["error"] = type(e).__name__
        out.put((rank, result))
        dist.destroy_process_group()
    except BaseException as e:
        out.put((rank, {"crash": repr(e)}))


@pytest.mark.dist
def test_two_ranks_build_the_same_data(tok, dataset, tmp_path):
    prefix, _ = dataset
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "a-file").write_text("a file where a cache directory should be")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    store = tempfile.mktemp(dir=tmp_path)
    args = (2, store, str(prefix), str(tok.path), str(tmp_path / "cache"), out)
    procs = [ctx.Process(target=_rank_main, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert all("crash" not in r for r in results.values()), results
    assert results[0]["valid"] == results[1]["valid"]
    firsts = sorted(row[0] for r in results.values() for mb in r["mb"] for row in mb)
    assert len(firsts) == 16
    assert results[0]["error"] == "FileExistsError" and results[1]["error"] == "RampError"
