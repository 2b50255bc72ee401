"""Measure what a built ramp trainer holds, next to what the memory model (launcher/laws/memory.py) predicts.

    python -m tools.memory_probe --recipe moe-tiny --set training.micro_batch_size=2 --json

Builds the recipe's trainer in this one process (CPU, or one GPU), runs one training step, and reports,
in bytes: the parameters, the DDP gradient buffers, the optimizer state (Adam moments and fp32 main
weights, storages not shared with the model), and the tensors autograd saves during the forward of one
micro-batch (counted once per storage, parameters excluded). On CUDA it also reports the peak allocated
memory of a step. ``tools/gpu_smoke.py`` and ``tests/unit/test_memory.py`` use :func:`measure`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def static_bytes(trainer) -> dict[str, float]:
    """Parameters (their elements), gradient buffers, and optimizer storages the model does not share."""
    model_storages = set()
    params = 0
    for c in trainer.chunks:
        for p in c.parameters():
            model_storages.add(_storage(p)[0])
            params += p.numel() * p.element_size()
    grads = 0
    for c in trainer.chunks:
        for buf in c.buffers + c.expert_parallel_buffers:
            grads += buf.grad_data.numel() * buf.grad_data.element_size()
            if buf.param_data is not None:
                model_storages.add(_storage(buf.param_data)[0])
    seen: dict[int, int] = {}
    for sub in _sub_optimizers(trainer.optimizer):
        inner = sub.optimizer
        tensors = [t for st in inner.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        tensors += [p for g in inner.param_groups for p in g["params"]]
        for t in tensors:
            ptr, nbytes = _storage(t)
            if ptr not in model_storages and t.numel() > 1:
                seen[ptr] = nbytes
    return {"params": params, "grads": grads, "optimizer": sum(seen.values())}


def saved_activation_bytes(trainer) -> float:
    """Bytes autograd keeps for backward over one micro-batch's forward (first chunk, loss included)."""
    from launcher import data

    param_storages = {_storage(p)[0] for c in trainer.chunks for p in c.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr, nbytes = _storage(t)
        if ptr not in param_storages:
            saved[ptr] = nbytes
        return t

    mbs = trainer.recipe.training.micro_batch_size
    (batch,) = trainer.to_device(data.microbatches(trainer.bundle.train, 0, mbs, mbs, 0, 1))  # every field
    chunk = trainer.chunks[0]
    chunk.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunk(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    del out
    return float(sum(saved.values()))


def measure(trainer, steps: int = 1) -> dict[str, Any]:
    """Static bytes after ``steps`` training steps, saved activations of one micro-batch, CUDA peak."""
    cuda = trainer.derived.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        trainer.train_step()
    out: dict[str, Any] = dict(static_bytes(trainer))
    if cuda:
        torch.cuda.synchronize()
        out["peak_allocated"] = torch.cuda.max_memory_allocated()
        out["cuda_peak_reserved"] = torch.cuda.max_memory_reserved()
    out["saved_activations"] = saved_activation_bytes(trainer)
    return out


def build(recipe_name: str, sets: list[str]):
    """The recipe's trainer in this single process (world size 1), with no logging side effects."""
    import patches
    from launcher import build, gpu, layout, optim, recipe

    r = recipe.load(recipe_name, list(sets))
    env = layout.Env(rank=0, world_size=1, local_rank=0, local_world_size=1)
    d = r.derive(1, cuda_available=torch.cuda.is_available())
    schedule, table = build.schedule_and_table(r, d)
    patches.apply_all(cpu=d.device == "cpu")
    layout.set_threads(r.training.threads, env)
    layout.init_world(d.device, env)
    trainer = build.build_trainer(r, d, schedule, table)
    # No LR-schedule callback runs in these tools (they call train_step): train at the recipe's peak LR,
    # so that the steps really update (the optimizer is built at LR 0 until the schedule's first step).
    optim.apply_schedule(trainer.optimizer, lr_factor=1.0, weight_decay=r.optimizer.weight_decay)
    plan = gpu.memory_plan(r, d, trainer.gpu)
    return r, d, trainer, plan


QUIET = [
    "logging.wandb.enabled=false",
    "logging.tensorboard=false",
    "logging.plots=false",
    "training.eval_interval=0",
    "checkpoint.save_at_exit=false",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ramp-memory-probe", description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="moe-tiny")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from launcher import gpu, layout
    from launcher.laws.memory import loss_saved_bytes

    gpu.set_cuda_env_here()  # a real run's CUDA environment (allocator settings), before CUDA starts
    r, d, trainer, plan = build(args.recipe, [*QUIET, *args.set])
    try:
        measured = measure(trainer)
    finally:
        layout.shutdown()
    stage = plan.stages[0]
    predicted_peak = stage.total - stage.reserve
    tokens = r.training.micro_batch_size * r.model.seq_length
    kernels = gpu.kernels(trainer.gpu)
    loss = loss_saved_bytes(r.model, trainer.vocab_size, gpu.layout_of(r, d), tokens, d.precision, kernels)
    predicted = {
        "params": stage.params,
        "grads": stage.grads,
        "optimizer": stage.optimizer,
        "saved_activations": stage.activations / stage.in_flight + loss,
        "peak_allocated": predicted_peak,
    }
    result = {
        "recipe": r.name,
        "device": d.device,
        "built": gpu.built_classes(trainer.chunks),
        "measured": measured,
        "predicted": predicted,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k in predicted:
            m = measured.get(k)
            shown = f"{m / 1e6:10.2f}" if m is not None else "         -"
            print(f"{k:>18}: measured {shown} MB  predicted {predicted[k] / 1e6:10.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
