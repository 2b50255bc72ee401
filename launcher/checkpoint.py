"""Distributed checkpoints: megatron-core dist_checkpointing, written atomically, resharded on load.

Layout on disk::

    CKPT_DIR/step_000100/      a complete torch_dist checkpoint (model, optimizer, RNG, trainer state)
    CKPT_DIR/latest            text file naming the newest complete step directory

A save writes ``step_N.tmp`` and renames it only after every rank has finished, then replaces ``latest``
atomically; so a crash at any point leaves ``latest`` naming a loadable checkpoint. Model and optimizer
state use the ``fully_reshardable`` format, so a checkpoint loads into any TP/PP/DP/EP layout.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from launcher import layout
from launcher.errors import RampError, require

SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def list_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def resolve(spec: str, root: Path) -> Path:
    """'latest', a step number, or a path -> a complete checkpoint directory (one-line error otherwise)."""
    if spec == "latest":
        marker = root / "latest"
        require(
            marker.exists(), f"checkpoint.load=latest but {marker} does not exist; train first or give a path"
        )
        path = root / marker.read_text().strip()
    elif spec.isdigit():
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
    _check_complete(path)
    return path


def _check_complete(path: Path) -> None:
    from megatron.core import dist_checkpointing

    ok = (path / "metadata.json").exists() and (path / "common.pt").exists()
    require(
        ok and dist_checkpointing.check_is_distributed_checkpoint(str(path)),
        f"checkpoint {path} is incomplete or corrupt (missing metadata.json/common.pt); "
        f"load an earlier step or delete it",
    )


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
    for key, chunk in _model_keys(chunks):
        sd[key] = _unwrap(chunk).sharded_state_dict(metadata=SHARDING_METADATA)
    if with_optimizer:
        model_sd = sd["model"] if len(chunks) == 1 else {k: v for k, v in sd.items() if k.startswith("model")}
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=SHARDING_METADATA
        )
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


def save(root: Path, step: int, chunks, optimizer, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
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
    dist_checkpointing.save(sd, str(tmp), validate_access_integrity=True)
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name + "\n")
        _fsync_dir(root)
        for old in list_steps(root)[:-keep_last]:
            shutil.rmtree(step_dir(root, old), ignore_errors=True)
    dist.barrier()
    return final


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


def load(path: Path, chunks, optimizer, with_optimizer: bool = True) -> dict[str, Any]:
    """Collective: load model (+ optimizer) into the current layout, resharding as needed."""
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
        optimizer.load_state_dict(loaded["optimizer"])
    if same_layout and "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return trainer_state
