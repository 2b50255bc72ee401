"""The first thing to run on a GPU machine: versions, TransformerEngine, built modules, memory vs the model.

    python -m tools.gpu_smoke            # all GPU recipes, one GPU each, ~5 minutes on one H100
    python -m tools.gpu_smoke --recipe moe-7b-a1b --steps 3
    python -m tools.gpu_smoke --set gpu.transformer_engine=local --set recompute.granularity=none  # no TE

Prints torch/CUDA/TE versions and megatron's ``HAVE_TE``, then for a one-GPU slice of each GPU recipe
(the per-GPU shape of its layout: EP1 with the recipe's local experts, so top-k over them routes as many
tokens per GPU as the full layout's balanced EP; one pipeline stage's layers; the distributed optimizer
on one rank): the classes built, peak memory against laws/memory.py's prediction, step time and MFU, and
the synchronising calls of one step under ``torch.cuda.set_sync_debug_mode("warn")``, counted by the
Python line that made them and the line of ramp's code that led there. Each slice runs in
its own process (an OOM loses one row, not the run). Writes benchmarks/results/gpu_smoke.json. Without
CUDA it stops at once with one line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "gpu_smoke.json"
GPU_RECIPES = ("moe-1b-a0.2b", "moe-7b-a1b", "moe-30b-a3b")
# Dense bf16 peak (no sparsity) by device name, the first name contained in torch's device name (the PCIe
# and NVL boards before the SXM ones they share a name with); MFU is left out on other devices.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS if k in device_name), None)


FIT = 0.85  # the slice's micro-batch is the largest the memory model puts under this share of the GPU


def versions() -> dict:
    from launcher import gpu

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0),
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
        "transformer_engine": gpu.te_version(),
        "HAVE_TE": gpu.have_te(),
        "apex_wgrad_kernel": gpu.have_apex_wgrad_kernel(),
    }
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except (ImportError, AttributeError):  # pragma: no cover
        info["megatron_core"] = None
    return info


def slice_sets(
    name: str, micro_batch: int | None = None, steps: int = 4, extra: tuple[str, ...] = ()
) -> list[str]:
    """Overrides that cut a recipe to what one GPU of its layout holds (after the user's ``extra``)."""
    from launcher import recipe

    r = recipe.load(name, list(extra))
    m, p = r.model, r.parallel
    layers = m.num_layers // p.pp
    local_experts = m.num_experts // p.ep
    mb = micro_batch or r.training.micro_batch_size
    return [
        *extra,
        "parallel.tp=1",
        "parallel.pp=1",
        "parallel.vpp=null",
        "parallel.ep=1",
        "parallel.distributed_optimizer=true",
        f"model.num_layers={layers}",
        f"model.first_k_dense={min(m.first_k_dense, layers - 1)}",
        f"model.num_experts={local_experts}",
        f"model.moe_router_topk={min(m.moe_router_topk, local_experts)}",
        f"training.micro_batch_size={mb}",
        f"training.global_batch_size={2 * mb}",
        "training.train_tokens=null",
        f"training.train_steps={steps + 2}",
        "training.eval_samples=0",
        "schedule.warmup_frac=0.0",
        "training.device=cuda",
        "training.precision=bf16",
        "data.paths=[embedded]",
        "data.tokenizer=null",
        "cluster=null",
    ]


def fitting_micro_batch(name: str, gpu_memory_gb: float, extra: tuple[str, ...] = ()) -> int:
    """The recipe's micro-batch, halved until the memory model puts the slice under FIT of this GPU."""
    from launcher import gpu, recipe

    mb = recipe.load(name, list(extra)).training.micro_batch_size
    while True:
        r = recipe.load(name, slice_sets(name, mb, extra=extra))
        d = r.derive(1, cuda_available=True)
        plan = gpu.memory_plan(r, d, gpu.resolve(r, "cuda", probe=False))
        if plan.peak_gb + 3.0 <= FIT * gpu_memory_gb or mb == 1:
            return mb
        mb //= 2


def model_flops_per_step(r, tokens: int) -> float:
    """6 x active matmul parameters (embedding lookup excluded) x tokens, plus causal attention."""
    from launcher.laws.lr_law import count_params

    c = count_params(r.model)
    m = r.model
    matmul = c.active - c.embedding + (c.embedding if m.tie_embeddings else 0)  # the output layer multiplies
    attention = 6 * m.num_layers * m.seq_length * m.num_attention_heads * m.head_dim  # QK^T and PV, causal
    return (6 * matmul + attention) * tokens


RAMP_PACKAGES = ("launcher/", "tools/", "patches/")


def _where(filename: str, lineno: int) -> str:
    """A source line, named relative to site-packages (an installed library) or to this checkout."""
    if "site-packages/" in filename:
        return f"{filename.rsplit('site-packages/', 1)[-1]}:{lineno}"
    path = Path(filename)
    if path.is_relative_to(ROOT):
        return f"{path.relative_to(ROOT)}:{lineno}"
    return f"{filename}:{lineno}"


def sync_sites(step, match: str = "synchronizing") -> Counter:
    """Run ``step()`` under ``torch.cuda.set_sync_debug_mode("warn")``; count its synchronising calls by
    ``"line <- ramp's line"``: the Python line that made the call (torch's warning names it) and the
    innermost line of ramp's own code on the stack above it (so a megatron call that ramp makes is
    charged to ramp's line; ``?`` where none is found). ``match``: the warnings counted."""
    import traceback

    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if match not in str(message):
            return
        frames = [(f.filename, f.lineno) for f in traceback.extract_stack()]
        own = [i for i, f in enumerate(frames) if f == (filename, lineno)]  # the warning's frame, innermost
        callers = (_where(*f) for f in reversed(frames[: own[-1] + 1])) if own else iter(())
        ramp = next((w for w in callers if w.startswith(RAMP_PACKAGES)), "?")
        sites[f"{_where(filename, lineno)} <- {ramp}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def run_slice(name: str, steps: int, micro_batch: int, extra: tuple[str, ...] = ()) -> dict:
    """In this process: build the slice, time ``steps`` steps, measure memory, one step in sync-debug mode."""
    from launcher import gpu, layout
    from tools import memory_probe

    sets = [*memory_probe.QUIET, *slice_sets(name, micro_batch, steps, extra)]
    r, _, trainer, plan = memory_probe.build(name, sets)
    try:
        built = gpu.built_classes(trainer.chunks)
        trainer.train_step()  # warm-up: kernels, allocator, NCCL
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        losses = [trainer.train_step()["loss"] for _ in range(steps)]
        torch.cuda.synchronize()
        step_time = (time.perf_counter() - t0) / steps
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        sites = sync_sites(trainer.train_step)
    finally:
        layout.shutdown()
    stage = plan.stages[0]
    predicted = stage.total - stage.reserve
    tokens = r.training.global_batch_size * r.model.seq_length
    flops = model_flops_per_step(r, tokens)
    peak_flops = peak_bf16_flops(torch.cuda.get_device_name(0))
    return {
        "recipe": name,
        "slice": sets[len(memory_probe.QUIET) :],
        "built": built,
        "settings": {k: v for k, v in trainer.gpu.settings.items()},
        "notes": list(trainer.gpu.notes),
        "peak_allocated_gb": round(peak / 1e9, 2),
        "peak_reserved_gb": round(reserved / 1e9, 2),
        "predicted_gb": round(predicted / 1e9, 2),
        "predicted_stage_gb": stage.as_gb(),
        "measured_over_predicted": round(peak / predicted, 3),
        "step_time_s": round(step_time, 4),
        "tokens_per_s": round(tokens / step_time),
        "mfu": round(flops / step_time / peak_flops, 4) if peak_flops else None,
        "losses": [round(float(x), 4) for x in losses],
        "sync_calls_in_one_step": sum(sites.values()),
        "sync_calls_in_ramp": sum(n for w, n in sites.items() if w.startswith(RAMP_PACKAGES)),
        "sync_call_sites": dict(sites.most_common(25)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_smoke", description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", action="append", help="a GPU recipe (default: all of them)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per slice")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override for every slice"
    )
    ap.add_argument("--slice", help=argparse.SUPPRESS)  # internal: run one slice, print its JSON
    ap.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per slice")
    args = ap.parse_args(argv)
    from launcher import gpu

    extra = tuple(args.set)
    gpu.set_cuda_env_here()  # a real run's CUDA environment, set before CUDA starts (slices inherit it)
    if not torch.cuda.is_available():
        print(
            "gpu_smoke: error: no CUDA device visible (torch.cuda.is_available() is False)", file=sys.stderr
        )
        return 2
    if args.slice:
        print(json.dumps(run_slice(args.slice, args.steps, args.micro_batch, extra)), flush=True)
        return 0
    info = versions()
    for k, v in info.items():
        print(f"{k:>20}: {v}", flush=True)
    rows = []
    for name in args.recipe or GPU_RECIPES:
        mb = fitting_micro_batch(name, info["gpu_memory_gb"], extra)
        cmd = [sys.executable, "-m", "tools.gpu_smoke", "--slice", name, "--steps", str(args.steps)]
        cmd += ["--micro-batch", str(mb), *(f"--set={s}" for s in extra)]
        print(f"-- {name}: one-GPU slice at micro-batch {mb}", flush=True)
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
            ok = p.returncode == 0
            row = json.loads(p.stdout.strip().splitlines()[-1]) if ok else None
        except subprocess.TimeoutExpired:
            ok, row, p = False, None, None
        if row is None:
            tail = (p.stderr[-1500:] if p is not None else f"timed out after {args.timeout}s").strip()
            row = {"recipe": name, "error": tail.splitlines()[-1] if tail else "failed", "log_tail": tail}
            print(f"   failed: {row['error']}", flush=True)
        else:
            print(
                f"   built {row['built']}\n   peak {row['peak_allocated_gb']} GB vs predicted "
                f"{row['predicted_gb']} GB (x{row['measured_over_predicted']}), step {row['step_time_s']} s, "
                f"MFU {row['mfu']}, {row['sync_calls_in_one_step']} synchronising calls in one step "
                f"({row['sync_calls_in_ramp']} in ramp's code)",
                flush=True,
            )
        rows.append(row)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({"versions": info, "sets": list(extra), "slices": rows}, indent=1) + "\n")
    print(f"wrote {RESULT.relative_to(ROOT)}", flush=True)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
