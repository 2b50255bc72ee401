"""CBS read-off, noise, branch length and curve fit (launcher/laws/cbs.py) on synthetic tables whose answers
are worked out by hand in the comments, and curves generated from known parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from launcher.errors import RampError
from launcher.laws.cbs import (
    BranchResult,
    ProbeConfig,
    branch_loss,
    branch_tokens,
    ema,
    fit_cbs_curve,
    fork_points,
    read_off,
)

KS = (1, 2, 4, 8, 16)


def table(losses, noise=None):
    return [BranchResult(k, loss, noise) for k, loss in zip(KS, losses)]


def test_monotone_table():
    # eps 1% relative. k=2: 3.00 <= 3.00*1.01 = 3.03; k=4: 3.01 <= 3.03 (vs k=1 and k=2) and <= 3.0300
    # (vs 3.00); k=8: 3.05 > 3.03 -> fails. CBS = 4 x 8 = 32 sequences, upper end 8 x 8 = 64.
    r = read_off(table([3.00, 3.00, 3.01, 3.05, 3.20]), base_batch=8)
    assert (r.k_star, r.k_fail, r.cbs, r.cbs_upper) == (4, 8, 32, 64)
    assert r.edge == "none" and r.confidence == "ok" and r.note == "ok"
    assert r.passed == {1: True, 2: True, 4: True, 8: False}


def test_all_within_epsilon_is_a_lower_bound():
    # the largest, 3.02, is under 3.00*1.01 = 3.03 and under 1.01 x each of 3.00, 3.005, 3.01
    r = read_off(table([3.00, 3.00, 3.005, 3.01, 3.02]), base_batch=8)
    assert (r.k_star, r.k_fail, r.cbs, r.cbs_upper) == (16, None, 128, None)
    assert r.edge == "high" and r.confidence == "low" and "at least 16 x 8" in r.note


def test_non_monotone_noise_stops_at_first_failure():
    # k=4: 3.04 > 3.03 fails. k=8 (3.02) passes against k=1 (3.03) and k=2 (3.01*1.01 = 3.0401): noted,
    # not taken; the paper's literal rule would return 8 here.
    r = read_off(table([3.00, 3.01, 3.04, 3.02, 3.10]), base_batch=8)
    assert (r.k_star, r.k_fail, r.cbs) == (2, 4, 16)
    assert r.confidence == "low" and "passes again" in r.note and "k=8" in r.note


def test_edge_of_range_low():
    r = read_off(table([3.00, 3.10, 3.20, 3.30, 3.40]), base_batch=8)
    assert (r.k_star, r.k_fail, r.cbs, r.cbs_upper) == (1, 2, 8, 16)
    assert r.edge == "low" and r.confidence == "low" and "smaller batch" in r.note


def test_absolute_epsilon():
    # absolute 0.01: k=2 3.009 <= 3.01; k=4 3.012 > 3.01 fails. Relative 1% would pass it (<= 3.03).
    rows = [BranchResult(1, 3.0), BranchResult(2, 3.009), BranchResult(4, 3.012)]
    assert read_off(rows, 8, epsilon=0.01, mode="absolute").k_star == 2
    assert read_off(rows, 8, epsilon=0.01, mode="relative").k_star == 4


def test_unfinished_branch_is_reported_not_dropped():
    rows = [
        BranchResult(1, 3.0),
        BranchResult(2, 3.0),
        BranchResult(4, None, error="exit 1"),
        BranchResult(8, 3.0),
    ]
    r = read_off(rows, 8)
    assert (r.k_star, r.k_fail, r.edge) == (2, 4, "error")
    assert "k=4 did not finish (exit 1)" in r.note
    with pytest.raises(RampError, match="reference branch k=1 did not finish"):
        read_off([BranchResult(1, None, error="killed"), BranchResult(2, 3.0)], 8)


def test_close_call_lowers_confidence():
    # k=2 fails by 3.035 - 3.03 = 0.005 loss units; noise sd 0.01 gives 2 x sqrt(2) x 0.01 = 0.028 > 0.005
    r = read_off([BranchResult(1, 3.0, 0.01), BranchResult(2, 3.035, 0.01)], 8)
    assert r.k_star == 1 and r.confidence == "low" and "within 2 noise sds" in r.note
    # the same with sd 0.001: 0.0028 < 0.005, a clear failure (still the low edge)
    r = read_off([BranchResult(1, 3.0, 0.001), BranchResult(2, 3.035, 0.001)], 8)
    assert "noise sds" not in r.note


def test_ema_and_noise():
    assert ema([4.0, 2.0, 2.0]) == 2.5  # 4 -> 0.5*2 + 0.5*4 = 3 -> 0.5*2 + 0.5*3 = 2.5
    # evals at 0..4 tokens; the tail (t >= 2) is 1 - 0.1 t plus residuals (+d, -2d, +d), orthogonal to the
    # line: residual sd sqrt((d^2 + 4d^2 + d^2) / (3 - 2)) = d sqrt(6)
    d = 0.001
    evals = [(0, 5.0), (1, 4.0), (2, 0.8 + d), (3, 0.7 - 2 * d), (4, 0.6 + d)]
    loss, sd = branch_loss("val", [], evals)
    assert loss == 0.6 + d
    assert sd == pytest.approx(d * math.sqrt(6), rel=1e-9)
    train = [(t, 0.6) for t in range(10)]
    loss, sd = branch_loss("ema", train, [])
    assert loss == pytest.approx(0.6) and sd == pytest.approx(0.0, abs=1e-12)
    assert branch_loss("val", train, [(1, 3.0)])[1] is None  # one eval: no noise estimate


def test_branch_length_from_noise_floor():
    # calibration: sd 0.25% at 262,144 tokens, eps 1%, z 2: (2 sqrt(2) 0.0025 / 0.01)^2 = 0.5 -> 131,072
    assert branch_tokens(0.0025, 262_144, 0.01) == 131_072  # exactly: a token more is a step more
    assert branch_tokens(0.0025, 262_144, 0.01, min_tokens=200_000) == 200_000
    # sd 1% against eps 1%: the noise must shrink by 2 sqrt(2): (2.828)^2 = 8x longer
    assert branch_tokens(0.01, 100_000, 0.01) == 800_000
    with pytest.raises(RampError, match="does not fall with length"):
        branch_tokens(0.01, 100_000, 0.01, exponent=0)


T = np.array([5e4, 1e5, 2e5, 4e5, 8e5, 1.6e6, 3.2e6])


def test_fit_recovers_saturating_curve():
    y = 64 * (1 - np.exp(-T / 3e5))
    fit = fit_cbs_curve(T, y)
    assert fit.form == "saturating"
    assert fit.params["c"] == pytest.approx(64, rel=1e-5)
    assert fit.params["tau"] == pytest.approx(3e5, rel=1e-5)
    assert fit.loo_rms_log["saturating"] < 1e-5 < fit.loo_rms_log["power_plateau"]


def test_fit_recovers_power_law_with_plateau():
    x = (T / 2e5) ** 1.5
    y = 32 * x / (1 + x)
    fit = fit_cbs_curve(T, y)
    assert fit.form == "power_plateau"
    assert fit.params == pytest.approx({"c": 32, "tau": 2e5, "p": 1.5}, rel=1e-5)
    assert float(fit(4e5)) == pytest.approx(32 * 2**1.5 / (1 + 2**1.5), rel=1e-5)


def test_fit_with_noise_and_too_few_points():
    rng = np.random.default_rng(0)
    y = 64 * (1 - np.exp(-T / 3e5)) * np.exp(rng.normal(0, 0.05, len(T)))  # 5% multiplicative noise
    fit = fit_cbs_curve(T, y, forms=["saturating"])
    assert fit.params["c"] == pytest.approx(64, rel=0.15)
    assert fit.params["tau"] == pytest.approx(3e5, rel=0.3)
    with pytest.raises(RampError, match="at least 4"):
        fit_cbs_curve([0, 1e5, 2e5, 3e5], [1, 2, 3, 4])  # token 0 is left out: 3 points


def test_fork_points_by_hand():
    assert fork_points(ProbeConfig(every_tokens=100), 350) == [100, 200, 300]
    # geometric: 10, 20, 40, 80, 160 (320 is past until_tokens=200); with every 100: 100 too
    assert fork_points(ProbeConfig(first_tokens=10, every_tokens=100, until_tokens=200), 1000) == [
        10,
        20,
        40,
        80,
        100,
        160,
    ]
    assert fork_points(ProbeConfig(first_tokens=10, growth=3.0), 100) == [10, 30, 90]
    assert fork_points(ProbeConfig(), 1000) == [] and not ProbeConfig().online
    with pytest.raises(RampError, match="growth"):
        ProbeConfig(first_tokens=10, growth=1.0)


def test_branch_budget_is_whole_steps_of_every_branch():
    from launcher.probes import budget_tokens

    # steps of 16, 48, 64 sequences x 64 tokens: 1,024, 3,072, 4,096 tokens; their lcm 12,288
    assert budget_tokens(ProbeConfig(multipliers=[1, 3, 4], budget_tokens=4096), 16, 64) == 12_288
    assert budget_tokens(ProbeConfig(multipliers=[1, 2, 4], budget_tokens=4097), 16, 64) == 8192
