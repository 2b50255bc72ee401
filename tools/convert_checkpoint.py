"""Convert ramp checkpoints to Hugging Face transformers model directories and back.

    ramp-convert to-hf runs/moe-1b out/moe-1b-hf                        # the run's newest checkpoint
    ramp-convert to-hf runs/moe-1b/checkpoints/step_0001000 out/hf      # one step
    ramp-convert from-hf out/moe-1b-hf ckpt/moe-1b --recipe moe-1b-a0.2b
    ramp-train --recipe moe-1b-a0.2b --set checkpoint.load=ckpt/moe-1b --set checkpoint.load_optimizer=false

to-hf reads the torch_dist checkpoint one stored chunk at a time (any TP/PP/EP layout: megatron stores
layout-independent global tensors) and writes safetensors shards of at most --max-shard-size, so memory
stays near one shard plus the largest tensor. from-hf writes a model-only torch_dist checkpoint, one
tensor (one expert) at a time, that ramp loads under any layout. The transformers architecture is the one
that computes the recipe's model exactly (launcher/hf.py); other recipes are refused with the reason.
muP's forward multipliers are folded into the exported weights (any width); from-hf divides out those of
the recipe it is given (the muP recipe: the muP checkpoint back; ``--set mup.enabled=false``: a
standard-parameterisation checkpoint with the same logits).
Output is written to a temporary sibling directory and renamed at the end, so a failure leaves OUT as it
was.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from launcher import hf
from launcher.errors import RampError, require
from launcher.recipe import Recipe

SAFETENSORS_INDEX = "model.safetensors.index.json"


def log(msg: str) -> None:
    print(f"ramp-convert: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# torch_dist (PyTorch distributed checkpoint) streaming


class TorchDistReader:
    """Global tensors, or boxes of them, out of a torch_dist checkpoint without loading the rest.

    Each read asks PyTorch DCP's FileSystemReader for the stored chunks that overlap the box, so memory is
    the box plus the largest overlapping chunk (one rank's shard of one tensor).
    """

    def __init__(self, path: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.path = path
        self.reader = FileSystemReader(str(path))
        try:
            self.metadata = self.reader.read_metadata()
        except (OSError, EOFError, RuntimeError) as e:
            raise RampError(f"checkpoint {path}: cannot read its .metadata ({type(e).__name__})") from None
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def tensors(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }

    def check_files(self, keys: set[str]) -> None:
        """Every file holding a chunk of ``keys`` is there and long enough (a missing shard fails here)."""
        need: dict[str, int] = {}
        for index, info in self.metadata.storage_data.items():
            if index.fqn in keys:
                need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(need.items()):
            f = self.path / name
            require(
                f.is_file(),
                f"checkpoint {self.path} is missing the shard file {name} ({len(need)} files hold the "
                "model); copy the complete checkpoint directory",
            )
            require(
                f.stat().st_size >= end,
                f"checkpoint {self.path}: shard file {name} is truncated ({f.stat().st_size} bytes, "
                f"the metadata needs {end}); copy it again",
            )

    def read(self, key: str, offsets: tuple[int, ...] | None = None, sizes: tuple[int, ...] | None = None):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.metadata.state_dict_metadata[key]
        offsets = offsets or (0,) * len(md.size)
        sizes = sizes or tuple(md.size)
        out = torch.empty(sizes, dtype=md.properties.dtype)
        box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [box])
        covered = sum(int(torch.Size(it.lengths).numel()) for it in items)
        require(covered == out.numel(), f"checkpoint {self.path}: tensor {key} has chunks missing")
        try:
            self.reader.read_data(LoadPlan(items), _ReadInto(out)).wait()
        except (OSError, EOFError, RuntimeError) as e:
            raise RampError(
                f"checkpoint {self.path}: reading {key} failed ({type(e).__name__}: {e})"
            ) from None
        return out


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        t = t.narrow(dim, o, n)
    return t


def _planner_bases():
    from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner

    return LoadPlanner, SavePlanner


class _ReadInto(_planner_bases()[0]):
    """The minimal DCP LoadPlanner: every read item lands in a slice of one destination tensor."""

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest = dest

    def set_up_planner(self, *args: Any, **kwargs: Any) -> None:
        pass

    def create_local_plan(self):  # pragma: no cover - not used: the plan is built by the reader's caller
        raise NotImplementedError

    def create_global_plan(self, global_plan):  # pragma: no cover
        return global_plan

    def finish_plan(self, central_plan):  # pragma: no cover
        return central_plan

    def load_bytes(self, read_item, value) -> None:  # pragma: no cover
        raise NotImplementedError

    def resolve_tensor(self, read_item) -> torch.Tensor:
        return _narrow(self.dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class _LazySave(_planner_bases()[1]):
    """A DCP SavePlanner whose tensors are produced when the writer asks for them, one at a time."""

    def __init__(self, items: list, produce: Callable[[Any], torch.Tensor | io.BytesIO]) -> None:
        self.items, self.produce = items, produce

    def set_up_planner(self, *args: Any, **kwargs: Any) -> None:
        pass

    def create_local_plan(self):
        from torch.distributed.checkpoint.planner import SavePlan

        return SavePlan(self.items)

    def create_global_plan(self, all_plans):
        from torch.distributed.checkpoint.default_planner import create_default_global_save_plan

        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan):
        return new_plan

    def resolve_data(self, write_item):
        return self.produce(write_item)


# ---------------------------------------------------------------------------------------------------------
# Output directories


def check_out(out: Path, overwrite: bool) -> None:
    require(
        overwrite or not out.exists(), f"{out} already exists; choose a new directory or pass --overwrite"
    )


@contextmanager
def staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``out``, renamed to ``out`` only when the block succeeds."""
    out = out.resolve()
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(s[-1:], 1)
    s = s[:-1] if mult > 1 else s
    try:
        value = int(float(s) * mult)
    except ValueError:
        raise RampError(f"--max-shard-size {text!r}: give a size such as 2GB or 500MB") from None
    require(value > 0, f"--max-shard-size {text!r}: must be positive")
    return value


class ShardWriter:
    """safetensors shards of at most ``max_bytes`` (one tensor may exceed it alone) and their index."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir, self.max_bytes = directory, max_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.parts: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.buf and self.buf_bytes + n > self.max_bytes:
            self.flush()
        self.buf[name] = t
        self.buf_bytes += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buf:
            return
        part = f"part-{len(self.parts)}.safetensors"
        save_file(self.buf, str(self.dir / part), metadata={"format": "pt"})
        os.chmod(self.dir / part, 0o666 & ~_umask())  # safetensors writes 0600; match the other files
        self.parts.append((part, list(self.buf)))
        self.buf, self.buf_bytes = {}, 0

    def finish(self) -> int:
        self.flush()
        n = len(self.parts)
        weight_map = {}
        for i, (part, names) in enumerate(self.parts):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / part, self.dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        hf.write_json(self.dir / SAFETENSORS_INDEX, index)
        return n


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Progress:
    """A line every ~5% of the tensors (and the bytes so far), to stderr."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done, self.bytes = what, total, 0, 0
        self.t0, self.next = time.monotonic(), 0.0

    def step(self, nbytes: int, name: str) -> None:
        self.done += 1
        self.bytes += nbytes
        frac = self.done / self.total
        if frac >= self.next or self.done == self.total:
            log(
                f"{self.what}: {frac:4.0%} ({self.done}/{self.total} tensors, {self.bytes / 2**20:,.1f} MiB, "
                f"{time.monotonic() - self.t0:.1f} s) {name}"
            )
            self.next = frac + 0.05


# ---------------------------------------------------------------------------------------------------------
# to-hf


def resolve_source(src: Path) -> Path:
    """RUN_DIR (its newest checkpoint), a checkpoints directory, or one step directory."""
    from launcher import checkpoint

    require(src.exists(), f"{src} does not exist; give a run directory or a checkpoint step directory")
    require(
        not ((src / "config.json").is_file() and not (src / "metadata.json").exists()),
        f"{src} is a transformers model directory; to-hf reads ramp checkpoints (use from-hf for this one)",
    )
    if (src / "checkpoints").is_dir() and not (src / "metadata.json").exists():
        return checkpoint.resolve("latest", src / "checkpoints")
    return checkpoint.resolve(str(src), src)


def recipe_of(path: Path) -> Recipe:
    from launcher import checkpoint, recipe

    state = checkpoint.read_trainer_state(path)
    require("recipe" in state, f"checkpoint {path} carries no recipe (not written by ramp's trainer)")
    return recipe.load(state["recipe"])


def run_dir_of(src: Path, checkpoint: Path) -> Path | None:
    """The run directory (the one holding ``config.yaml``) that ``src`` names or that holds ``checkpoint``."""
    for d in (src, *checkpoint.resolve().parents[:2]):
        if (d / "config.yaml").is_file():
            return d
    return None


def find_tokenizer(r: Recipe, given: Path | None, run_dir: Path | None = None) -> Path:
    """The sentencepiece model the run trained with: --tokenizer, else the copy the run directory keeps
    beside its config.yaml, else the recipe's data.tokenizer (or the embedded corpus's)."""
    from launcher.corpus import TOKENIZER_FILE, embedded_dir

    if given is not None:
        require(given.is_file(), f"--tokenizer {given} not found")
        return given
    if run_dir is not None and (run_dir / TOKENIZER_FILE).is_file():
        return run_dir / TOKENIZER_FILE
    if r.data.is_embedded:
        path = embedded_dir(r.data.cache_dir, r.data.embedded_vocab_size) / TOKENIZER_FILE
    else:
        path = Path(r.data.tokenizer)
    require(
        path.is_file(),
        f"the run's tokenizer {path} is not here and its run directory holds no {TOKENIZER_FILE} copy "
        "(runs before the copy recorded data paths relative to where they trained); pass --tokenizer "
        "PATH.model",
    )
    return path


def to_hf(
    src: Path,
    out: Path,
    tokenizer: Path | None = None,
    max_shard_bytes: int = 2 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write a transformers model directory for the checkpoint ``src``; returns the directory."""
    check_out(out, overwrite)
    path = resolve_source(src)
    r = recipe_of(path)
    arch = hf.architecture(r)
    reader = TorchDistReader(path)
    stored = reader.tensors()
    emb = "embedding.word_embeddings.weight"
    require(emb in stored, f"checkpoint {path} has no {emb}: not a ramp GPT checkpoint")
    vocab, dtype = int(stored[emb].size[0]), stored[emb].properties.dtype
    plan = _source_plan(hf.pieces(r, vocab), stored, path)
    reader.check_files({key for _, key in plan})
    tok_path = find_tokenizer(r, tokenizer, run_dir_of(src, path))
    log(f"{path} ({r.name}, {arch}, {_describe(r)}) -> {out}")
    with staged(out, overwrite) as tmp:
        ids = hf.sentencepiece_to_hf(tok_path, tmp, r.model.seq_length, vocab)
        cfg = hf.hf_config(r, vocab, dtype, ids)
        cfg.save_pretrained(str(tmp))
        hf.transformers_module().GenerationConfig(**ids).save_pretrained(str(tmp))
        shards = ShardWriter(tmp, max_shard_bytes)
        progress = Progress("to-hf", len(plan))
        for piece, key in plan:
            if piece.expert is None:
                t = reader.read(key)
            else:
                t = reader.read(key, (piece.expert, *[0] * len(piece.shape)), (1, *piece.shape))[0]
            for name, x in zip(piece.hf, hf.split(piece, t, r)):
                shards.add(name, x)
            progress.step(
                t.numel() * t.element_size(), key if piece.expert is None else f"{key}[{piece.expert}]"
            )
        n = shards.finish()
        n_hf = sum(len(p.hf) for p, _ in plan)
        log(f"wrote {len(plan)} ramp tensors as {n_hf} transformers tensors in {n} shard(s)")
    return out


def _source_plan(pieces: list[hf.Piece], stored: dict[str, Any], path: Path) -> list[tuple[hf.Piece, str]]:
    """Each piece with the key the checkpoint holds it under; every model tensor must be used (no drops)."""
    plan, used = [], set()
    for p in pieces:
        key = next((k for k in p.keys if k in stored), None)
        require(key is not None, f"checkpoint {path} has no {p.key}: it does not hold the recipe's model")
        have = tuple(stored[key].size)
        require(
            have == p.global_shape(),
            f"checkpoint tensor {key} has shape {list(have)}, the recipe's model needs "
            f"{list(p.global_shape())}",
        )
        plan.append((p, key))
        used.add(key)
    model_keys = {k for k in stored if not k.startswith("optimizer.")}
    extra = sorted(model_keys - used)
    require(
        not extra,
        f"checkpoint {path} holds {len(extra)} model tensor(s) the conversion has no place for "
        f"(first: {extra[0] if extra else ''}); refusing to drop them",
    )
    return plan


def _describe(r: Recipe) -> str:
    m = r.model
    return f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_experts} experts top-{m.moe_router_topk}"


# ---------------------------------------------------------------------------------------------------------
# from-hf


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class HFWeights:
    """The tensors of a transformers safetensors checkpoint (sharded with an index, or one file), lazily.

    Headers are read once; each tensor is read by opening its file for that read only, so the process
    never keeps whole shards mapped (their pages would count as resident memory).
    """

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        index = directory / SAFETENSORS_INDEX
        single = directory / "model.safetensors"
        if index.is_file():
            files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        elif single.is_file():
            files = [single]
        else:
            raise RampError(
                f"{directory} has no safetensors weights (model.safetensors or {SAFETENSORS_INDEX})"
            )
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in files:
            require(f.is_file(), f"{directory} is missing the shard {f.name} named by its index")
            try:
                with safe_open(str(f), "pt") as h:
                    names = h.keys()  # a safe_open handle is not iterable
                    for k in names:
                        sl = h.get_slice(k)
                        self.where[k], self.meta[k] = f, (tuple(sl.get_shape()), sl.get_dtype())
            except Exception as e:
                raise RampError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        self._safe_open = safe_open

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        code = self.meta[name][1]
        require(code in _DTYPES, f"{self.where[name]}: {name} has dtype {code}; ramp reads F32, BF16, F16")
        return _DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        try:
            with self._safe_open(str(self.where[name]), "pt") as h:
                return h.get_tensor(name).clone()  # own memory: the file's mapping closes here
        except Exception as e:
            raise RampError(
                f"reading {name} from {self.where[name]} failed ({type(e).__name__}: {e})"
            ) from None


def from_hf(hf_dir: Path, out: Path, r: Recipe, overwrite: bool = False) -> Path:
    """Write a model-only ramp checkpoint (torch_dist) from a transformers directory; returns ``out``."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    from launcher.model import padded_vocab_size

    check_out(out, overwrite)
    arch = hf.architecture(r)
    require(
        (hf_dir / "config.json").is_file(), f"{hf_dir} is not a transformers model directory (no config.json)"
    )
    try:
        cfg = hf.transformers_module().AutoConfig.from_pretrained(str(hf_dir))
    except (ValueError, KeyError, OSError) as e:
        raise RampError(
            f"{hf_dir}/config.json: transformers cannot read it ({str(e).splitlines()[0]})"
        ) from None
    hf.check_hf_config(cfg, r)
    vocab = int(cfg.vocab_size)
    m = r.model
    ramp_vocab = padded_vocab_size(m.vocab_size or vocab, m.make_vocab_size_divisible_by, r.parallel.tp)
    require(
        ramp_vocab == vocab,
        f"transformers vocab_size={vocab} but the recipe's model has {ramp_vocab} rows "
        f"(model.vocab_size={m.vocab_size}, padded to a multiple of model.make_vocab_size_divisible_by="
        f"{m.make_vocab_size_divisible_by}); set model.vocab_size={vocab} and a divisor of it as "
        "model.make_vocab_size_divisible_by",
    )
    weights = HFWeights(hf_dir)
    pieces = hf.pieces(r, vocab)
    _check_hf_tensors(pieces, weights, hf_dir, tied=m.tie_embeddings)
    items, by_chunk = _write_items(pieces, weights, r)
    progress = Progress("from-hf", len(pieces))

    def produce(item):
        if item.index.fqn not in by_chunk:  # an _extra_state object: megatron saves [None] for non-TE layers
            buf = io.BytesIO()
            torch.save([None], buf)  # megatron stores a ShardedObject as the list of its shards' data
            buf.seek(0)
            return buf
        piece = by_chunk[item.index.fqn][tuple(item.index.offset)]
        t = hf.merge(piece, [weights.get(n) for n in piece.hf], r)
        progress.step(t.numel() * t.element_size(), piece.hf[0])
        return t.unsqueeze(0) if piece.expert is not None else t

    log(f"{hf_dir} ({arch}) -> {out} for recipe {r.name} ({_describe(r)})")
    with staged(out, overwrite) as tmp:
        writer = FileSystemWriter(str(tmp), single_file_per_rank=True, thread_count=1)
        dcp_save({}, storage_writer=writer, planner=_LazySave(items, produce), no_dist=True)
        torch.save({"ramp": _model_only_state(r, hf_dir, arch)}, tmp / "common.pt")
        hf.write_json(
            tmp / "metadata.json",
            {
                "sharded_backend": "torch_dist",
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            },
        )
    log(f"wrote {len(pieces)} tensors; load with checkpoint.load={out} checkpoint.load_optimizer=false")
    return out


def _check_hf_tensors(pieces: list[hf.Piece], weights: HFWeights, hf_dir: Path, tied: bool) -> None:
    """Every tensor ramp needs is there with the right shape, and every tensor there is used."""
    needed = [(n, p) for p in pieces for n in p.hf]
    missing = [n for n, _ in needed if n not in weights.where]
    require(
        not missing,
        f"{hf_dir} lacks {len(missing)} tensor(s) of the recipe's model (first: {missing[:1]})",
    )
    for p in pieces:
        for name, want in zip(p.hf, p.hf_shapes()):
            have = weights.shape(name)
            require(
                have == want,
                f"{hf_dir}: {name} has shape {list(have)}, the recipe's model needs {list(want)}",
            )
    names = {n for n, _ in needed}
    ignorable = set()
    if tied and "lm_head.weight" in weights.where:  # some tied checkpoints still store the head: same tensor
        require(
            torch.equal(weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")),
            f"{hf_dir}: lm_head.weight differs from model.embed_tokens.weight but the recipe ties them "
            "(model.tie_embeddings=true)",
        )
        ignorable.add("lm_head.weight")
    extra = sorted(
        k
        for k in weights.where
        if k not in names and k not in ignorable and not k.endswith("rotary_emb.inv_freq")
    )
    require(
        not extra,
        f"{hf_dir} holds {len(extra)} tensor(s) ramp's model has no place for (first: {extra[:1]}); "
        "refusing to drop them",
    )


def _write_items(pieces: list[hf.Piece], weights: HFWeights, r: Recipe):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    items: list = []
    by_chunk: dict[str, dict[tuple[int, ...], hf.Piece]] = {}
    for p in pieces:
        dtype = weights.dtype(p.hf[0])
        if p.expert is None:
            offsets, sizes, kind = (0,) * len(p.shape), p.shape, WriteItemType.TENSOR
        else:
            offsets, sizes, kind = (p.expert, *[0] * len(p.shape)), (1, *p.shape), WriteItemType.SHARD
        index = MetadataIndex(p.key, torch.Size(offsets))
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items.append(
            WriteItem(
                index=index,
                type=kind,
                tensor_data=TensorWriteData(
                    chunk=chunk, properties=TensorProperties(dtype=dtype), size=torch.Size(p.global_shape())
                ),
            )
        )
        by_chunk.setdefault(p.key, {})[tuple(offsets)] = p
    items += [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in hf.extra_state_keys(r)]
    return items, by_chunk


def _model_only_state(r: Recipe, hf_dir: Path, arch: str) -> dict[str, Any]:
    """The plain 'ramp' state: a fresh trainer position, no layout (so no RNG state is expected)."""
    from dataclasses import asdict

    from launcher.trainer import TrainState

    return {
        "state": asdict(TrainState(global_batch_size=r.training.global_batch_size)),
        "callbacks": {},
        "layout": None,
        "recipe": r.to_dict(),
        "model_only": True,
        "source": {"transformers_dir": str(hf_dir.resolve()), "architecture": arch},
    }


# ---------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ramp-convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-hf", help="ramp checkpoint -> transformers model directory")
    a.add_argument(
        "source", type=Path, help="RUN_DIR (newest checkpoint), RUN_DIR/checkpoints or a step_N dir"
    )
    a.add_argument("out", type=Path, help="transformers model directory to create")
    a.add_argument(
        "--tokenizer",
        type=Path,
        help="sentencepiece .model; default: the run directory's copy, else the run's data.tokenizer",
    )
    a.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    a.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    b = sub.add_parser("from-hf", help="transformers model directory -> model-only ramp checkpoint")
    b.add_argument("hf_dir", type=Path, help="transformers model directory (config.json + safetensors)")
    b.add_argument("out", type=Path, help="checkpoint directory to create (for checkpoint.load=OUT)")
    b.add_argument("--recipe", required=True, help="the recipe that will train from it (name or YAML)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    b.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # megatron-core warns on import about TE/Apex, irrelevant to conversion; keep the output readable.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    try:
        if args.command == "to-hf":
            out = to_hf(
                args.source, args.out, args.tokenizer, parse_size(args.max_shard_size), args.overwrite
            )
        else:
            from launcher import recipe

            r = recipe.load(args.recipe, args.set)
            out = from_hf(args.hf_dir, args.out, r, args.overwrite)
    except RampError as e:
        print(f"ramp: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
