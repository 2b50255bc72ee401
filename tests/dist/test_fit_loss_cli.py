"""ramp-fit-loss on a real run made here: fit, compare, predict another decay, refuse a bad run directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ramp_run import ROOT, ramp_env, run_ramp

pytestmark = pytest.mark.dist

# One process, 24 steps of 8 x 64 tokens; WSD with the decay over the last 40%; validation every 2 steps.
RUN = [
    "schedule.style=wsd",
    "schedule.warmup_tokens=1024",
    "schedule.decay.start_frac=0.6",
    "training.train_steps=24",
    "training.global_batch_size=8",
    "training.eval_interval=2",
    "training.eval_samples=16",
]


def fit_loss(*args, cwd):
    cmd = [sys.executable, "-m", "tools.fit_loss_curve", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=ramp_env(), capture_output=True, text=True, timeout=600)


def test_fit_compare_predict_on_a_real_run(tmp_path):
    run = run_ramp(tmp_path / "run", RUN).check()
    assert len(run.evals) == 13  # step 0 and every 2 steps
    out = tmp_path / "fit"
    p = fit_loss(run.run_dir, "--law", "both", "--out", out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    fit = json.loads((out / "fit.json").read_text())
    assert [f["law"] for f in fit["fits"]] == ["momentum", "multi-power"]
    assert (out / "fit.png").stat().st_size > 0
    # Every value the run logged at the fitted points: the fit says how far it is from each.
    p = fit_loss("--fit", out / "fit.json", "--compare", run.run_dir, "--out", tmp_path / "cmp", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    final = run.evals[-1]["val_loss"]
    assert f"{final:.4f} measured" in p.stdout
    # A later decay start for the same run: a prediction of the same length (24 steps).
    p = fit_loss(
        "--fit", out / "fit.json", "--predict", "--recipe", run.run_dir / "config.yaml",
        "--set", "schedule.decay.start_frac=0.8", "--out", tmp_path / "pred", cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "24 steps, final loss" in p.stdout


def test_a_directory_without_metrics_is_refused_in_one_line(tmp_path):
    p = fit_loss(tmp_path / "nothing", cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("ramp: error:") and len(p.stderr.strip().splitlines()) == 1
