"""On a GPU: TransformerEngine's modules are what gets built, and the memory model holds for moe-tiny.

Skipped without CUDA. Runs tools/memory_probe.py (one GPU, bf16, TE spec; megatron's local spec and its
classes where TE does not load) in a fresh process.
Tolerances: weights, gradient buffers and Adam state are exact up to buffer padding (1%); the tensors
autograd saves are modelled module by module (TE's kernels save what laws/memory.py lists, small router
and index tensors aside): 15%; the step's peak allocation adds transient buffers the model counts as one
more layer (dispatch buffers, the loss's bf16 logits): 30%, after taking off the cuBLAS workspaces, which
the memory model leaves to cluster.runtime_reserve_gb but torch's caching allocator counts.

Measured on one H200 (torch 2.11, megatron-core 0.16.1, local spec: TE not installed; 2026-11-29): the
classes, parameters, gradient buffers and Adam state as predicted (exact), saved activations 68.7 MB
against 72.5 MB predicted (-5%), peak allocated 265.6 MB against 165.5 MB (+60%): 67.1 MB of it was
cuBLAS's workspaces (in a separate process one small bf16 matmul's forward and backward peaked at 33.7 and
67.6 MB, 32 MiB per handle plus the matmul's tensors; autograd's backward thread has its own handle), the
rest (198.5 MB, +20%: the model under-predicts this tiny step's transients) within the 30%. The test as
written now was not run on that GPU; with TE the classes and savings differ and stay unmeasured.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from ramp_run import LOCAL_CLASSES, ROOT, TE_CLASSES, cuda_sets


def cublas_workspaces() -> int:
    """The cuBLAS workspaces of a training step, in the caching allocator's peak but not in the model's
    tensors: one per handle, the forward's and autograd's backward thread's. Each is what
    CUBLAS_WORKSPACE_CONFIG (":KiB:count" pairs) asks for, else torch's default: 32 MiB on Hopper (measured,
    above); ":4096:2:16:8" elsewhere (torch's pre-Hopper default, not measured here)."""
    import os

    default = ":4096:8" if torch.cuda.get_device_capability() == (9, 0) else ":4096:2:16:8"
    nums = [int(x) for x in (os.environ.get("CUBLAS_WORKSPACE_CONFIG") or default).split(":") if x]
    return 2 * 1024 * sum(kib * count for kib, count in zip(nums[::2], nums[1::2]))


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_te_modules_built_and_memory_model_holds():
    from launcher import gpu

    sets = [*cuda_sets(), "training.micro_batch_size=4", "training.global_batch_size=8"]
    argv = ["--json", *(f"--set={s}" for s in sets)]
    out = subprocess.run(
        [sys.executable, "-m", "tools.memory_probe", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    expected = TE_CLASSES if gpu.have_te() else LOCAL_CLASSES
    assert {k: res["built"][k] for k in expected} == expected
    m, p = res["measured"], res["predicted"]
    for key in ("params", "grads", "optimizer"):
        assert m[key] == pytest.approx(p[key], rel=0.01), key
    assert m["saved_activations"] == pytest.approx(p["saved_activations"], rel=0.15)
    assert m["peak_allocated"] - cublas_workspaces() == pytest.approx(p["peak_allocated"], rel=0.30)
