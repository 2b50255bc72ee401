"""ramp-probe on a tiny run: branches never touch the parent run, and the same probe gives the same losses."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from ramp_run import ROOT, ramp_env, run_ramp

pytestmark = pytest.mark.dist

PARENT = [
    "training.train_steps=6",
    "checkpoint.interval=3",
    "checkpoint.keep_last=5",
    "training.eval_samples=16",
]


def tree_digest(root):
    """sha256 of every file under ``root`` by relative path: byte identity of a whole run directory."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def probe(run_dir, out):
    cmd = [
        sys.executable,
        "-m",
        "tools.cbs_probe",
        "--run",
        str(run_dir),
        "--checkpoint",
        "3",
        "--out",
        str(out),
    ]
    # TINY: batch 16 x seq 64; k = 1, 2 over 4096 tokens: 4 and 2 steps, the same 64 sequences
    cmd += ["--multipliers", "1,2", "--budget-tokens", "4096", "--evals", "2", "--all"]
    p = subprocess.run(cmd, cwd=ROOT, env=ramp_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads(ln) for ln in (out / "probes.jsonl").read_text().splitlines()]


def test_probe_isolated_and_deterministic(tmp_path):
    parent = run_ramp(tmp_path / "parent", PARENT).check()
    before = tree_digest(parent.run_dir)
    assert "checkpoints/step_0000003/common.pt" in before or any("step_0000003" in k for k in before)

    first = probe(parent.run_dir, tmp_path / "probe_a")
    assert tree_digest(parent.run_dir) == before  # the parent's checkpoints and metrics, byte for byte
    second = probe(parent.run_dir, tmp_path / "probe_b")

    (a,), (b,) = first, second
    assert a["tokens"] == 3 * 16 * 64 and a["base_batch"] == 16 and a["budget_tokens"] == 4096
    assert [x["k"] for x in a["branches"]] == [1, 2]
    assert [x["batch"] for x in a["branches"]] == [16, 32]
    assert [x["steps"] for x in a["branches"]] == [4, 2]
    # moe-tiny peak 2e-3, constant schedule (TINY): the k=2 branch at 2e-3 x sqrt(2)
    assert a["branches"][1]["lr"] == pytest.approx(2e-3 * 2**0.5, rel=1e-12)
    for x, y in zip(a["branches"], b["branches"]):
        assert x["error"] is None and x["loss"] is not None
        assert x["loss"] == y["loss"]  # the same probe twice: the same losses, exactly
    assert a["cbs"] == b["cbs"] and a["cbs"] in (16, 32)
    # each branch trained in its own directory under the probe output, from the fork's data position
    for x in a["branches"]:
        rows = [
            json.loads(ln)
            for ln in (tmp_path / "probe_a" / x["run_dir"].split("probe_a/")[1] / "metrics.jsonl")
            .read_text()
            .splitlines()
        ]
        train = [r for r in rows if "val_loss" not in r]
        assert train[0]["step"] == 4 and train[-1]["tokens"] == 3 * 1024 + 4096
        # the LR the branch trained at (its optimizer's, as logged), not the one it was given: loading the
        # parent's optimizer state must not bring back the parent's peak
        want = {1: 2e-3, 2: 2e-3 * 2**0.5}[x["k"]]
        assert [r["lr"] for r in train] == [pytest.approx(want, rel=1e-12)] * len(train)
    # the first k=1 branch step starts from the checkpoint's weights on the same data as the parent's step 4
    k1 = tmp_path / "probe_a" / "fork_000000003072" / "k1" / "metrics.jsonl"
    loss4 = next(json.loads(ln) for ln in k1.read_text().splitlines() if '"val_loss"' not in ln)["loss"]
    assert loss4 == parent.series("loss")[4]
    assert (tmp_path / "probe_a" / "cbs_vs_tokens.png").stat().st_size > 0
