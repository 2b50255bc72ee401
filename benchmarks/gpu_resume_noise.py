"""How far apart two GPU runs of the same seed and data land, next to how far a resume lands: what the
tolerances of tests/gpu/test_gpu_layouts.py rest on.

    PYTHONPATH=. python benchmarks/gpu_resume_noise.py [KEY=VALUE ...]   # e.g. gpu.transformer_engine=local

On one GPU, with the GPU tests' model (tests/ramp_run.py ``TINY``, bf16), for plain Adam and for the
distributed optimizer: a reference trains 5 steps and checkpoints at step 2; for Adam a second run repeats
the reference (run-to-run noise); a third resumes from the reference's step 2 and trains steps 3-5. Prints
and writes every step's loss and grad norm to ``benchmarks/results/gpu_resume_noise.json``
(``runs``: optimizer -> run -> {loss, grad_norm} by step; ``loss_diff_max``/``grad_norm_rdiff_max``: the
largest difference from the reference, per optimizer and run). Needs CUDA; about 2.5 minutes on one H200.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from ramp_run import run_ramp, step_checkpoint  # noqa: E402

from benchmarks.cache import MOE_TINY_CODE, code_version  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "gpu_resume_noise.json"


def differences(runs: dict[str, dict[str, dict[int, float]]]) -> dict[str, dict[str, float]]:
    """Each run's largest loss difference and relative grad-norm difference from ``ref``, over its steps."""
    ref = runs["ref"]
    out = {}
    for name, run in runs.items():
        if name == "ref":
            continue
        steps = sorted(run["loss"])
        out[name] = {
            "loss_diff_max": max(abs(run["loss"][s] - ref["loss"][s]) for s in steps),
            "grad_norm_rdiff_max": max(abs(run["grad_norm"][s] / ref["grad_norm"][s] - 1) for s in steps),
        }
    return out


def main(argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_resume_noise: error: no CUDA device visible", file=sys.stderr)
        return 2
    base = ["training.device=cuda", "training.precision=bf16", *argv]
    keep = ["training.train_steps=5", "checkpoint.interval=2", "checkpoint.keep_last=5"]
    no_save = ["training.train_steps=5", "checkpoint.save_at_exit=false"]
    result: dict = {"code_version": code_version(MOE_TINY_CODE), "sets": base, "runs": {}, "diffs": {}}
    with tempfile.TemporaryDirectory() as work:
        out = Path(work)
        for distopt in (False, True):
            opt = f"parallel.distributed_optimizer={str(distopt).lower()}"
            name = "distopt" if distopt else "adam"
            ref = run_ramp(out / f"{name}-ref", [*base, opt, *keep]).check()
            runs = {"ref": ref}
            if not distopt:
                runs["ref_again"] = run_ramp(out / f"{name}-again", [*base, opt, *no_save]).check()
            resume = f"checkpoint.load={step_checkpoint(ref, 2)}"
            runs["resumed"] = run_ramp(out / f"{name}-resumed", [*base, opt, resume, *no_save]).check()
            series = {
                k: {"loss": r.series("loss"), "grad_norm": r.series("grad_norm")} for k, r in runs.items()
            }
            result["runs"][name] = series
            result["diffs"][name] = differences(series)
            print(name, json.dumps(result["diffs"][name]), flush=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
