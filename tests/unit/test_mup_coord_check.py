"""The muP coordinate check: module sizes stay flat across width under muP and grow under standard.

Runs ``tools/mup_coord_check.py`` (widths 64, 128, 256; 4 steps; ~10 s on an idle 2-core machine, ~1 min
under heavy load) in a subprocess, since the CPU patches change torch globally, and reads the log-log
slopes of RMS against width at the last step. ``BOUND`` separates flat from growing: under muP
|slope| < BOUND, under standard parameterisation slope > BOUND
(theory: 0 vs about 1 for the update effect rms(dW x) of hidden matrices and for the logits once updates
dominate; measured about 0.0 vs 0.8-2.0 here, see the tool's output).
"""

from __future__ import annotations

import json
import subprocess
import sys

from ramp_run import ROOT, ramp_env

BOUND = 0.4
# (quantity, module) pairs that must be flat under muP and grow under standard parameterisation:
# the output logits and the hidden-matrix updates.
CONTRASTED = [("act", "output"), ("update", "output"), ("update", "attention"), ("update", "experts")]
# Flat under both: the embedding (its size does not depend on width in either parameterisation).
FLAT_UNDER_MUP = [*CONTRASTED, ("act", "embedding"), ("update", "embedding"), ("act", "attention")]


def test_coord_check_flat_under_mup_and_growing_under_standard(tmp_path):
    cmd = [sys.executable, "-m", "tools.mup_coord_check", "--widths", "64", "128", "256", "--steps", "4"]
    p = subprocess.run(
        [*cmd, "--out", str(tmp_path)], cwd=ROOT, env=ramp_env(), capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, f"coord check failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    res = json.loads((tmp_path / "coord_check.json").read_text())
    assert (tmp_path / "coord_check.png").stat().st_size > 10_000
    assert res["widths"] == [64, 128, 256] and res["steps"] == 4
    slopes = res["slopes"]
    for qty, module in FLAT_UNDER_MUP:
        s = slopes["mup"][qty][module]
        assert abs(s) < BOUND, f"muP {qty} of {module}: slope {s:.3f} across width, want |slope| < {BOUND}"
    for qty, module in CONTRASTED:
        s = slopes["standard"][qty][module]
        assert s > BOUND, f"standard {qty} of {module}: slope {s:.3f} across width, want > {BOUND}"
    # At the base width the two parameterisations are the same model, step for step.
    base = res["results"]["standard"]["64"]["loss"]
    assert res["results"]["mup"]["64"]["loss"] == base
