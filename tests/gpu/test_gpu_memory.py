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
against 72.5 MB predicted (-5%), peak allocated 265.6 MB against 165.5 MB: 67.6 MB of it was cuBLAS's
workspaces (one bf16 matmul's forward and backward alone allocate 33.7 and 67.6 MB: 32 MiB per handle,
and autograd's backward thread has its own), the rest (198 MB, +20%) within the 30%. The test as written
now was not run on that GPU; with TE the classes and savings differ and stay unmeasured.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from ramp_run import LOCAL_CLASSES, ROOT, TE_CLASSES, cuda_sets

#: torch's cuBLAS workspaces on Hopper (32 MiB per handle: the forward's and autograd's backward thread's),
#: in the caching allocator's peak but not in the model's tensors (measured, see above).
CUBLAS_WORKSPACES = 2 * 32 * 2**20

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
    assert m["peak_allocated"] - CUBLAS_WORKSPACES == pytest.approx(p["peak_allocated"], rel=0.30)
