"""The layout equivalence of tests/dist on GPUs: NCCL, and TransformerEngine's spec when it is installed.

Skipped without CUDA. Each layout needs as many GPUs as processes; on a one-GPU machine only the
single-process run and its resume check run.
"""

from __future__ import annotations

import pytest
import torch
from ramp_run import run_ramp, step_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
STEPS, RESUME_AT = 5, 2
# bf16 on GPU: compare with the bf16 reference at a bf16-sized tolerance.
LOSS_ATOL = 2e-2
CUDA = ["training.device=cuda", "training.precision=bf16"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    sets = [
        *CUDA,
        f"training.train_steps={STEPS}",
        f"checkpoint.interval={RESUME_AT}",
        "checkpoint.keep_last=5",
    ]
    return run_ramp(tmp_path_factory.mktemp("gpu-ref"), sets).check()


@pytest.mark.parametrize(
    ("nproc", "sets"),
    [
        (1, []),
        (2, []),
        (2, ["parallel.tp=2"]),
        (2, ["parallel.pp=2"]),
        (2, ["parallel.ep=2"]),
        (2, ["parallel.distributed_optimizer=true"]),
        (4, ["parallel.tp=2", "parallel.ep=2"]),
    ],
    ids=["single", "dp2", "tp2", "pp2", "ep2", "distopt", "tp2xep2"],
)
def test_gpu_layout_matches_single_gpu(nproc, sets, reference, tmp_path):
    if nproc > GPUS:
        pytest.skip(f"needs {nproc} GPUs, have {GPUS}")
    extra = [*CUDA, *sets, f"training.train_steps={STEPS}", "checkpoint.save_at_exit=false"]
    if sets and "distributed_optimizer" in sets[0]:
        extra.append("checkpoint.load_optimizer=false")
    run = run_ramp(
        tmp_path, [*extra, f"checkpoint.load={step_checkpoint(reference, RESUME_AT)}"], nproc=nproc
    )
    run.check()
    loss, ref = run.series("loss"), reference.series("loss")
    assert sorted(loss) == list(range(RESUME_AT + 1, STEPS + 1))
    if "checkpoint.load_optimizer=false" not in extra:
        for step in loss:
            assert loss[step] == pytest.approx(ref[step], abs=LOSS_ATOL)
