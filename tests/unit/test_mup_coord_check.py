"""The muP coordinate check: module sizes stay flat across width under muP and grow under standard.

Runs ``tools/mup_coord_check.py`` (widths 64, 128, 256; 8 steps; ~40 s on an idle 2-core machine, a few
minutes under heavy load) in a subprocess, since the CPU patches change torch globally, and reads the
log-log slopes across width of each module's RMS (mean over the second half of the steps). ``BOUND``
separates flat from growing: under muP |slope| < BOUND, under standard parameterisation slope > BOUND
(theory: 0 vs about 1 for the update effect rms(dW x) of every matrix and for the logits once updates
dominate; measured |slope| <= 0.15 vs 0.8-2.2 here, see the tool's output). Every matrix type is checked:
embedding, attention QKV and output projection, expert fc1 and fc2, router, output head.
"""

from __future__ import annotations

import json
import subprocess
import sys

from ramp_run import ROOT, ramp_env

BOUND = 0.4
MATRICES = ("attention_qkv", "attention_out", "experts_fc1", "experts_fc2", "router", "output")
# (quantity, module) pairs that must be flat under muP and grow under standard parameterisation:
# the output logits and the update effect of every width-dependent matrix.
CONTRASTED = [("act", "output"), *(("update", m) for m in MATRICES)]
# Flat under muP: also the embedding (its size does not depend on width in either parameterisation) and
# every hidden matrix's output.
FLAT_UNDER_MUP = [
    *CONTRASTED,
    ("act", "embedding"),
    ("update", "embedding"),
    *(("act", m) for m in ("attention_qkv", "attention_out", "experts_fc1", "experts_fc2")),
]
# The router's logits under muP: output-like init (std sigma/width) makes them start ~ width^-1/2, and
# updates of flat size are added on top, so the slope lies between the init's -0.5 and 0.
ROUTER_ACT_RANGE = (-0.5 - 0.15, BOUND)


def test_coord_check_flat_under_mup_and_growing_under_standard(tmp_path):
    cmd = [sys.executable, "-m", "tools.mup_coord_check", "--widths", "64", "128", "256", "--steps", "8"]
    p = subprocess.run(
        [*cmd, "--out", str(tmp_path)], cwd=ROOT, env=ramp_env(), capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, f"coord check failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    res = json.loads((tmp_path / "coord_check.json").read_text())
    assert (tmp_path / "coord_check.png").stat().st_size > 10_000
    assert res["widths"] == [64, 128, 256] and res["steps"] == 8
    slopes = res["slopes"]
    for qty, module in FLAT_UNDER_MUP:
        s = slopes["mup"][qty][module]
        assert abs(s) < BOUND, f"muP {qty} of {module}: slope {s:.3f} across width, want |slope| < {BOUND}"
    for qty, module in CONTRASTED:
        s = slopes["standard"][qty][module]
        assert s > BOUND, f"standard {qty} of {module}: slope {s:.3f} across width, want > {BOUND}"
    lo, hi = ROUTER_ACT_RANGE
    s = slopes["mup"]["act"]["router"]
    assert lo < s < hi, f"muP router logits: slope {s:.3f} across width, want in ({lo}, {hi})"
    # At the base width the two parameterisations are the same model, step for step.
    base = res["results"]["standard"]["64"]["loss"]
    assert res["results"]["mup"]["64"]["loss"] == base
