"""Distributed checkpoints: megatron-core dist_checkpointing, written atomically, resharded on load.

Layout on disk::

    CKPT_DIR/step_000100/      a complete torch_dist checkpoint (model, optimizer, RNG, trainer state)
    CKPT_DIR/latest            text file naming the newest complete step directory

    CKPT_DIR/step_000100/ramp_manifest.json   written last: save time, every file's size (+ sha256)

A save writes ``step_N.tmp``, lists (and optionally hashes) its files into the manifest, and renames it
only after every rank has finished, then replaces ``latest`` atomically; so a crash at any point leaves
``latest`` naming a loadable checkpoint. A re-save of a step that exists swaps the two directories in one
``renameat2(RENAME_EXCHANGE)``, never deleting what ``latest`` names first. An asynchronous save
(``checkpoint.async_save``, megatron's background writer) does all of this only after every rank's
writer has finished, so ``latest`` never names a directory still being written. Retention keeps the
``keep_last`` most recently *saved* checkpoints (a rewound run's new step_5 outlives an old step_9) and
never the one ``latest`` names; old ones are renamed ``*.deleting`` and removed off the training path.
Model and optimizer state use the ``fully_reshardable`` format, so a checkpoint loads into any
TP/PP/DP/EP layout.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from launcher import layout
from launcher.errors import RampError, require


def sharding_metadata() -> dict[str, Any]:
    """A new dict per call: megatron-core caches the data-parallel group *into* the dict it is given
    (``ensure_metadata_has_dp_cp_group``), so a shared one would carry the old layout's group into the next
    (after a relayout, replica ids computed from a dead group made the load's access check fail)."""
    return {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "ramp_manifest.json"
_HASH_BLOCK = 1 << 22


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def list_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def by_recency(root: Path) -> list[Path]:
    """Step directories, most recently saved first (manifest save time; directory mtime without one)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(dirs, key=_saved_at, reverse=True)


def _saved_at(path: Path) -> int:
    try:
        return int(json.loads((path / MANIFEST).read_text())["saved_at_ns"])
    except (OSError, ValueError, KeyError):
        return path.stat().st_mtime_ns


def latest_name(root: Path) -> str | None:
    marker = root / "latest"
    return marker.read_text().strip() if marker.exists() else None


def resolve(spec: str, root: Path, verify_checksums: bool = False) -> Path | None:
    """'auto', 'latest', a step number, or a path -> a complete checkpoint directory (one-line error
    otherwise). ``auto``: ``latest`` if there is one, the newest complete checkpoint if ``latest`` is
    damaged, None (start fresh) if the directory holds no checkpoint."""
    if spec in ("latest", "auto"):
        name = latest_name(root)
        if name is None:
            if spec == "auto" and not list_steps(root):
                return None
            require(
                spec == "auto",
                f"checkpoint.load=latest but {root / 'latest'} does not exist; train first, give a path, or "
                "use checkpoint.load=auto (resume if a checkpoint exists, else start fresh)",
            )
            name = "(none)"
        path = root / name
        problem = damage(path, verify_checksums)
        if problem is None:
            return path
        previous = next(
            (p for p in by_recency(root) if p != path and damage(p, verify_checksums) is None), None
        )
        if spec == "auto" and previous is not None:
            print(f"ramp: warning: {path.name}: {problem}; resuming from {previous.name}", file=sys.stderr)
            return previous
        offer = (
            f"the previous complete checkpoint is {previous}: set checkpoint.load=auto to resume from it"
            if previous is not None
            else "no earlier complete checkpoint exists: start fresh (checkpoint.load unset)"
        )
        raise RampError(f"checkpoint {path}: {problem}; {offer}")
    if spec.isdigit():
        path = step_dir(root, int(spec))
        require(
            path.is_dir(),
            f"checkpoint.load={spec}: no step {spec} in {root} (available: {list_steps(root) or 'none'})",
        )
    else:
        path = Path(spec)
        if path.is_dir() and not (path / "metadata.json").exists() and (path / "latest").exists():
            path = path / (path / "latest").read_text().strip()
    require(path.is_dir(), f"checkpoint {path} does not exist")
    problem = damage(path, verify_checksums)
    require(problem is None, f"checkpoint {path}: {problem}; load an earlier step or delete it")
    return path


def damage(path: Path, verify_checksums: bool = False) -> str | None:
    """Why ``path`` is not a loadable checkpoint, or None. Sizes are always compared with the manifest
    (a stat per file); checksums only when asked (they read every byte)."""
    from megatron.core import dist_checkpointing

    if not path.is_dir():
        return "does not exist"
    ok = (path / "metadata.json").exists() and (path / "common.pt").exists()
    if not (ok and dist_checkpointing.check_is_distributed_checkpoint(str(path))):
        return "incomplete or corrupt (missing metadata.json/common.pt)"
    manifest = path / MANIFEST
    if not manifest.exists():
        return None  # written before manifests (or by ramp-convert): nothing more to compare
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"unreadable {MANIFEST}"
    for name, entry in sorted(files.items()):
        f = path / name
        if not f.exists():
            return f"file {name} is missing"
        if f.stat().st_size != entry["size"]:
            return f"file {name} has {f.stat().st_size} bytes, the manifest says {entry['size']}"
        if verify_checksums and "sha256" in entry and _sha256(f) != entry["sha256"]:
            return f"file {name} fails its sha256 checksum (corrupt)"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _file_entries(directory: Path, checksums: bool) -> dict[str, dict[str, Any]]:
    """Every rank describes its share of the files (round robin); rank 0 gets the union."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {}
    for name in names[rank::world]:
        entry: dict[str, Any] = {"size": (directory / name).stat().st_size}
        if checksums:
            entry["sha256"] = _sha256(directory / name)
        mine[name] = entry
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return {k: v for part in gathered for k, v in part.items()}


def clean_stale(root: Path) -> list[str]:
    """Remove ``*.tmp`` (saves a crash interrupted) and ``*.deleting`` (retention a crash interrupted).
    Call with the run lock held, before the first save."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.suffix in (".tmp", ".deleting")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def sharded_state_dict(
    chunks, optimizer, trainer_state: dict[str, Any], is_loading: bool, with_optimizer: bool = True
) -> dict[str, Any]:
    """Model chunks (model / model0, model1 ... with VPP), optimizer, RNG and the trainer's plain state."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sd: dict[str, Any] = {}
    metadata = sharding_metadata()
    for key, chunk in _model_keys(chunks):
        sd[key] = _unwrap(chunk).sharded_state_dict(metadata=metadata)
    if with_optimizer:
        model_sd = sd["model"] if len(chunks) == 1 else {k: v for k, v in sd.items() if k.startswith("model")}
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    sd["rng_state"] = ShardedObject(
        f"rng_state_pp{pp}_tp{tp}_ep{ep}",
        _rng_state(),
        (pp, tp, ep),
        (
            ps.get_pipeline_model_parallel_rank(),
            ps.get_tensor_model_parallel_rank(),
            ps.get_expert_model_parallel_rank(),
        ),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True)
        if ep == 1
        else ps.get_expert_data_parallel_rank(),
    )
    sd["ramp"] = trainer_state
    return sd


def _model_keys(chunks) -> list[tuple[str, Any]]:
    """'model' for one chunk; 'model0', 'model1', ... with virtual pipeline stages (never merged: the layer
    numbers inside are offsets of the stage, so the chunks' keys would collide)."""
    if len(chunks) == 1:
        return [("model", chunks[0])]
    return [(f"model{i}", c) for i, c in enumerate(chunks)]


def _unwrap(chunk):
    """The GPTModel inside megatron's DDP wrapper: its state dict keys carry no 'module.' prefix."""
    return getattr(chunk, "module", chunk)


class AsyncSaves:
    """Saves in flight (megatron's ``AsyncCallsQueue``: a forked writer process per save). A save is
    complete only when :meth:`finish` has run its finalisation on every rank: megatron's metadata, then
    ramp's manifest, rename and ``latest``. Collective: every rank calls :meth:`finish` at the same
    steps (``blocking=False`` completes only a save that every rank has finished writing)."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)

    @property
    def pending(self) -> int:
        return self.queue.get_num_unfinalized_calls()

    def schedule(self, request) -> None:
        self.queue.schedule_async_request(request)

    def finish(self, blocking: bool) -> None:
        if self.pending:
            self.queue.maybe_finalize_async_calls(blocking=blocking)


def save(
    root: Path,
    step: int,
    chunks,
    optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
    checksums: bool = False,
    saves: AsyncSaves | None = None,
    on_saved: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. With ``saves`` the tensors
    are written in the background and the directory exists (and ``latest`` names it) only once
    ``saves.finish`` has completed the save; ``on_saved(final)`` runs then, on every rank."""
    from megatron.core import dist_checkpointing

    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    sd = sharded_state_dict(chunks, optimizer, trainer_state, is_loading=False)

    def complete() -> None:
        dist.barrier()  # every rank's files and rank 0's metadata are written
        _publish(root, final, tmp, step, keep_last, checksums)
        if on_saved is not None:
            on_saved(final)

    if saves is None:
        dist_checkpointing.save(sd, str(tmp), validate_access_integrity=True)
        complete()
    else:
        request = dist_checkpointing.save(
            sd, str(tmp), validate_access_integrity=True, async_sharded_save=True
        )
        request.add_finalize_fn(complete)
        saves.schedule(request)
    return final


def _publish(root: Path, final: Path, tmp: Path, step: int, keep_last: int, checksums: bool) -> None:
    """Collective, once ``tmp`` holds a complete checkpoint: manifest, rename to ``final``, ``latest``,
    retention."""
    files = _file_entries(tmp, checksums)
    if dist.get_rank() == 0:
        manifest = {"step": step, "saved_at_ns": time.time_ns(), "files": files}
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            try:
                exchange(tmp, final)  # tmp now holds the old step_N; `latest` named a complete one throughout
            except OSError as e:  # a filesystem without RENAME_EXCHANGE: keep the complete one we have
                print(f"ramp: warning: kept the existing {final.name} ({e})", file=sys.stderr)
            _retire(tmp)
        else:
            os.replace(tmp, final)
        _write_atomic(root / "latest", final.name + "\n")
        _fsync_dir(root)
        for old in by_recency(root)[keep_last:]:
            if old != final:
                _retire(old)
    dist.barrier()


def _retire(path: Path) -> None:
    """Rename (instant, atomic) and delete in a background thread: no rank waits on rank 0's rmtree.
    Not a daemon: a normal exit finishes the deletion; a crash leaves ``*.deleting`` for the next start."""
    doomed = path.with_name(path.name.removesuffix(".tmp") + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    threading.Thread(
        target=shutil.rmtree, args=(doomed,), kwargs={"ignore_errors": True}, daemon=False
    ).start()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE): there is no moment when
    either name is missing."""
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The plain (non-sharded) part: step, consumed samples, callbacks, recipe, layout."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    if "ramp" not in common:
        raise RampError(f"checkpoint {path} was not written by ramp (no trainer state)")
    return common["ramp"]


#: Param-group hyper-parameters that come from the recipe (peak and minimum LR with the group's multiplier,
#: Adam's eps and betas, the weight-decay multiplier): a load keeps the values the optimizer was built with.
#: torch's ``load_state_dict`` restores the saved groups whole, so without this a branch given another LR
#: (a CBS probe at k x B with LR x sqrt(k)), or a resume with a changed recipe LR, trains at the saved one.
RECIPE_GROUP_KEYS = ("max_lr", "min_lr", "eps", "betas", "wd_mult")


def load(path: Path, chunks, optimizer, with_optimizer: bool = True) -> dict[str, Any]:
    """Collective: load model (+ optimizer) into the current layout, resharding as needed. The optimizer
    gets the checkpoint's moments and step counts, and keeps its own :data:`RECIPE_GROUP_KEYS`."""
    from megatron.core import dist_checkpointing

    trainer_state = read_trainer_state(path)
    require(
        not (with_optimizer and trainer_state.get("model_only")),
        f"checkpoint {path} holds model weights only (ramp-convert from-hf); "
        "set checkpoint.load_optimizer=false",
    )
    same_layout = trainer_state.get("layout") == layout.sizes()
    sd = sharded_state_dict(chunks, optimizer, trainer_state, is_loading=True, with_optimizer=with_optimizer)
    if not same_layout:
        sd.pop("rng_state")  # RNG streams belong to ranks; a new layout starts them from the seed
    loaded = dist_checkpointing.load(sd, str(path))
    for key, chunk in _model_keys(chunks):
        _unwrap(chunk).load_state_dict(loaded[key])
    if with_optimizer:
        built = [{k: g[k] for k in RECIPE_GROUP_KEYS if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(loaded["optimizer"])
        groups = optimizer.param_groups  # new dicts: torch rebuilds the groups from the saved ones
        require(
            len(groups) == len(built), f"checkpoint {path}: {len(groups)} param groups, {len(built)} built"
        )
        for group, settings in zip(groups, built):
            group.update(settings)
    elif optimizer is not None:
        # A bf16 optimizer keeps fp32 main copies of the weights, built from the initialisation; without
        # this the first step would write init + update back over the loaded weights (megatron's
        # reload_model_params is for exactly this case; a no-op for fp32 weights).
        optimizer.reload_model_params()
    if same_layout and "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return trainer_state
