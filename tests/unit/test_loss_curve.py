"""Loss-curve laws: S1/S2 against hand values, fits recovering known parameters from noisy synthetic curves,
E(S) / B_min / B_opt recovery, and the B_opt(D) power law."""

from __future__ import annotations

import numpy as np
import pytest

from launcher.errors import RampError
from launcher.laws.e_of_s import (
    BatchRun,
    EofS,
    TargetResult,
    analyse,
    fit_bopt_curve,
    fit_e_of_s,
    tokens_to_reach,
    unsupported,
)
from launcher.laws.loss_curve import (
    Curve,
    LossLaw,
    StepSchedule,
    compare,
    fit_loss_law,
    lam_from_steps,
    lr_drops,
    multi_power_drop,
    s1_s2,
    schedule_from_points,
    virtual_steps,
)

# -- S1 and S2 by hand ---------------------------------------------------------------------------------------


def test_constant_lr_has_no_annealing_area():
    s1, s2 = s1_s2(np.full(7, 0.5), lam=0.9)
    assert s1.tolist() == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert s2.tolist() == [0.0] * 7


def test_single_drop_by_hand_and_saturation():
    # LR 1, 1, 0.8, 0.8, ... : one drop of d = 0.2 at step 3; lam = 0.5
    # m = 0, 0, 0.2, 0.1, 0.05 ; S2 = 0, 0, 0.2, 0.3, 0.35
    eta = np.array([1.0, 1.0, 0.8, 0.8, 0.8])
    s1, s2 = s1_s2(eta, lam=0.5)
    assert s1 == pytest.approx([1.0, 2.0, 2.8, 3.6, 4.4])
    assert s2 == pytest.approx([0.0, 0.0, 0.2, 0.3, 0.35])
    # long after the drop S2 -> d / (1 - lam) = 0.2 / 0.01 = 20 for lam = 0.99
    long = np.concatenate([[1.0] * 3, [0.8] * 3000])
    assert s1_s2(long, lam=0.99)[1][-1] == pytest.approx(20.0, rel=1e-9)


def test_two_drops_and_lambda_zero():
    # 1, 0.5, 0.25: drops 0.5, 0.25. lam = 0.5: m = 0, 0.5, 0.5, S2 = 0, 0.5, 1.0
    eta = np.array([1.0, 0.5, 0.25])
    assert s1_s2(eta, 0.5)[1] == pytest.approx([0.0, 0.5, 1.0])
    # lam = 0: m_i = d_i, S2 = the total drop so far, eta_1 - eta_s: 0, 0.5, 0.75
    assert s1_s2(eta, 0.0)[1] == pytest.approx([0.0, 0.5, 0.75])


def test_warmup_is_not_a_negative_drop():
    # warmup 0.25, 0.5, 1, then 1, then 0.5: only the fall at step 5 counts
    eta = np.array([0.25, 0.5, 1.0, 1.0, 0.5])
    assert lr_drops(eta).tolist() == [0, 0, 0, 0, 0.5]
    s1, s2 = s1_s2(eta, 0.9)
    assert s1[-1] == pytest.approx(3.25)
    assert s2.tolist() == pytest.approx([0, 0, 0, 0, 0.5])


def test_virtual_steps_for_a_batch_doubling():
    # batch 8 -> 16 under the sqrt LR rule: eta 1 -> sqrt(2). Per token it is the batch-8 run: no drop,
    # each 16-step counts k = 2 virtual steps at eta_eff = sqrt(2) / sqrt(2) = 1.
    sched = StepSchedule(np.array([1.0, 1.0, 2**0.5, 2**0.5]), np.array([8, 8, 16, 16]), seq_length=4)
    k, eta = virtual_steps(sched, ref_lr=1.0, ref_batch=8)
    assert k.tolist() == [1, 1, 2, 2]
    assert eta == pytest.approx([1, 1, 1, 1])
    s1, s2 = s1_s2(eta, 0.9, k)
    assert s1 == pytest.approx([1, 2, 4, 6])
    assert s2 == pytest.approx([0, 0, 0, 0])
    assert sched.tokens.tolist() == [32, 64, 128, 192]


def test_points_past_the_first_fraction_are_counted_in_tokens():
    # batch 8 for 4 steps, then 32 for 4 steps, seq 1: tokens after each step 8 16 24 32 64 96 128 160.
    # The first 20% of the run's 160 tokens (32) ends after step 4; the first 20% of its 8 steps after step 1.
    sched = StepSchedule(np.full(8, 1e-3), np.array([8, 8, 8, 8, 32, 32, 32, 32]), seq_length=1)
    curve = Curve("warmup", sched, np.arange(1, 9), np.linspace(5.0, 4.0, 8))
    assert curve.after(0.2).tolist() == [False] * 4 + [True] * 4
    assert curve.after(0.0).all()
    # the fit skips by the same rule: past the first 60% of the tokens (96) only steps 7 and 8 remain (by
    # steps, 5 to 8 would)
    with pytest.raises(RampError, match="fewer than 3 loss points"):
        fit_loss_law([curve], skip_frac=0.6)


def test_virtual_steps_drop_equals_per_step_sequence():
    # a step of k = 2 virtual steps after a drop: the same S2 as two reference steps at the lower LR
    lam = 0.7
    _, s2_ref = s1_s2(np.array([1.0, 0.5, 0.5, 0.5]), lam)
    _, s2_k = s1_s2(np.array([1.0, 0.5, 0.5]), lam, k=np.array([1.0, 2.0, 1.0]))
    # hand: m = 0, 0.5, 0.35, 0.245; S2 = 0, 0.5, 0.85, 1.095
    assert s2_ref == pytest.approx([0, 0.5, 0.85, 1.095])
    assert s2_k == pytest.approx([0, 0.85, 1.095])


def test_lambda_rule():
    assert lam_from_steps(1200) == pytest.approx(1 - 1 / 120)
    assert lam_from_steps(10_000) == pytest.approx(0.999)
    assert lam_from_steps(10) == pytest.approx(0.9)  # clipped
    assert lam_from_steps(10**6) == pytest.approx(0.999)


def test_multi_power_drop_by_hand():
    # eta 1, 1, 0.5, 0.5 ; one drop d = 0.5 at step 3 (0-based 2), eta_k = 0.5
    # at step 4: S_k = 0.5 + 0.5 = 1; x = C * 0.5**-gamma * 1 = 2 * 2 * 1 = 4 (C = 2, gamma = 1)
    # G = 1 - (1 + 4)**-1 = 0.8 ; LD / B = 0.5 * 0.8 = 0.4 ; at step 3: S_k = 0.5, x = 2, G = 2/3
    eta = np.array([1.0, 1.0, 0.5, 0.5])
    out = multi_power_drop(eta, np.ones(4), np.array([1, 2, 3]), C=2.0, beta=1.0, gamma=1.0)
    assert out == pytest.approx([0.0, 0.5 * 2 / 3, 0.4])


def test_points_schedule():
    s = schedule_from_points([(0, 1.0), (40, 1.0), (80, 0.0)], batch=2, seq_length=4)
    # 8 tokens per step: 10 steps; LR at tokens 8..80 linear from 40 to 80
    assert s.steps == 10
    assert s.lr[:5].tolist() == [1.0] * 5
    assert s.lr[5:] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])


# -- fits on synthetic curves --------------------------------------------------------------------------------


def _wsd(T: int, decay_start: float, shape: str = "linear", warm: int = 20, floor: float = 0.0) -> np.ndarray:
    """A per-step LR factor written out by hand (independent of laws/schedule.py)."""
    lr = np.ones(T)
    lr[:warm] = np.arange(1, warm + 1) / warm
    d0 = int(decay_start * T)
    r = (np.arange(d0, T) - d0 + 1) / (T - d0)
    c = (
        1 - r
        if shape == "linear"
        else (1 - np.sqrt(r) if shape == "1-sqrt" else 0.5 * (1 + np.cos(np.pi * r)))
    )
    lr[d0:] = floor + (1 - floor) * c
    return lr


def _curves(law: LossLaw, lrs: dict[str, np.ndarray], noise: float, seed: int = 0) -> dict[str, Curve]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, f in lrs.items():
        sched = StepSchedule(2e-3 * f, np.full(f.size, 8), 256)
        steps = np.arange(20, f.size + 1, 20)
        clean = law.predict_steps(sched, steps)
        out[name] = Curve(name, sched, steps, clean * (1 + noise * rng.standard_normal(steps.size)))
    return out


T = 1000
SCHEDULES = {
    "constant": np.concatenate([np.arange(1, 21) / 20, np.ones(T - 20)]),
    "wsd": _wsd(T, 0.8),
    "cosine": _wsd(T, 0.02, "cosine"),
    "wsd-sqrt": _wsd(T, 0.7, "1-sqrt", floor=0.1),
}


def test_momentum_fit_recovers_parameters():
    lam = lam_from_steps(T)
    true = LossLaw("momentum", {"L0": 2.0, "A": 1.5, "alpha": 0.4, "C": 0.004}, 2e-3, 8, lam=lam)
    curves = _curves(true, SCHEDULES, noise=0.001)
    fit = fit_loss_law([curves["constant"], curves["wsd"]], "momentum", lam="rule")
    assert fit.lam == pytest.approx(lam)
    for k, v in true.params.items():
        assert fit.params[k] == pytest.approx(v, rel=0.15), k
    for held in ("cosine", "wsd-sqrt"):
        c = compare(fit, curves[held])
        assert c.mape < 0.003, held
        assert abs(c.final_error) < 0.005, held


def test_momentum_fit_lambda_on_fitting_curves():
    true = LossLaw("momentum", {"L0": 2.0, "A": 1.5, "alpha": 0.4, "C": 0.004}, 2e-3, 8, lam=1 - 1 / 40)
    curves = _curves(true, SCHEDULES, noise=0.0005, seed=1)
    fit = fit_loss_law([curves["constant"], curves["wsd"]], "momentum", lam="fit")
    assert fit.lam == pytest.approx(1 - 1 / 40)  # on the grid of spans
    assert "fitted" in fit.lam_rule


def test_multi_power_fit_recovers_parameters_and_predicts():
    true = LossLaw(
        "multi-power",
        {"L0": 2.0, "A": 1.5, "alpha": 0.4, "B": 0.6, "C": 0.05, "beta": 0.6, "gamma": 0.4},
        2e-3,
        8,
    )
    curves = _curves(true, SCHEDULES, noise=0.001, seed=2)
    fit = fit_loss_law([curves["constant"], curves["wsd"], curves["cosine"]], "multi-power")
    for k in ("L0", "A", "alpha"):
        assert fit.params[k] == pytest.approx(true.params[k], rel=0.1), k
    c = compare(fit, curves["wsd-sqrt"])
    assert c.mape < 0.002
    assert abs(c.final_error) < 0.003
    # a round trip through the saved form predicts the same
    again = LossLaw.from_dict(fit.to_dict())
    assert again.predict(curves["wsd-sqrt"]) == pytest.approx(fit.predict(curves["wsd-sqrt"]))


def test_fit_refuses_bad_input():
    c = _curves(
        LossLaw("momentum", {"L0": 2, "A": 1, "alpha": 0.5, "C": 0.0}, 1e-3, 8, lam=0.9), SCHEDULES, 0
    )
    with pytest.raises(RampError, match="law="):
        fit_loss_law([c["constant"]], "power")
    with pytest.raises(RampError, match="lambda"):
        fit_loss_law([c["constant"]], "momentum", lam=1.5)


# -- E(S), B_min, B_opt --------------------------------------------------------------------------------------


TRUE_ES = EofS(S_min=100, S_1=300, S_opt=1000, S_2=3000, C=0.125, E_min=1e6)


def test_e_of_s_joins_by_hand():
    # A_1 = 2 C (S_2 - S_opt) = 2 * 0.125 * 2000 = 500 ; B_opt = 1e6 / 1000 = 1000
    assert TRUE_ES.b_min == pytest.approx(500)
    assert TRUE_ES.b_opt == pytest.approx(1000)
    # E at S_opt is E_min; at S_2 the quadratic gives 0.125 * 2000**2 + 1e6 = 1.5e6 and the line too
    assert TRUE_ES.E(1000) == pytest.approx(1e6)
    assert TRUE_ES.E(3000) == pytest.approx(1.5e6)
    assert TRUE_ES.E(3000 + 1e-6) == pytest.approx(1.5e6)
    # B_-1 = 2 C (S_opt - S_1)(S_1 - S_min)^2 = 2 * 0.125 * 700 * 40000 = 7e6
    assert TRUE_ES.B_m1 == pytest.approx(7e6)
    assert TRUE_ES.E(300 - 1e-6) == pytest.approx(TRUE_ES.E(300 + 1e-6))
    # B_0 = C (S_1 - S_opt)^2 + E_min - B_-1 / (S_1 - S_min) = 0.125 * 490000 + 1e6 - 7e6 / 200 = 1026250
    assert pytest.approx(1026250) == TRUE_ES.B_0


def test_e_of_s_with_s1_at_s_min_in_floating_point_is_finite():
    """The fit's log parameterisation can put S_1 on S_min (exp of a very negative gap): the inverse stage
    is then empty and B_0 the quadratic's value there, C (S_1 - S_opt)^2 + E_min, not a division by 0."""
    es = EofS(S_min=1e3, S_1=1e3 + 1e-14, S_opt=2e3, S_2=4e3, C=0.5, E_min=1e6)
    assert es.S_min == es.S_1
    assert pytest.approx(0.5 * 1e6 + 1e6) == es.B_0
    assert np.isfinite(es.E([1e3 + 1, 2e3, 5e3])).all()


def test_e_of_s_fit_recovers_b_min_and_b_opt():
    S = np.geomspace(130, 20000, 9)
    E = TRUE_ES.E(S) * (1 + 0.003 * np.random.default_rng(0).standard_normal(S.size))
    fit = fit_e_of_s(S, E)
    assert fit.b_opt == pytest.approx(1000, rel=0.05)
    assert fit.b_min == pytest.approx(500, rel=0.05)
    assert fit.E_min == pytest.approx(1e6, rel=0.02)


def test_tokens_to_reach_raw_and_smoothed():
    # L = 2 + 4 (D / 1e3)^-0.5: L = 3 at D = 16e3, 2.5 at 64e3
    D = np.linspace(1e3, 1e5, 200)
    run = BatchRun("r", 8, 4, D, 2 + 4 * (D / 1e3) ** -0.5)
    e = tokens_to_reach(run, [3.0, 2.5, 2.1], min_frac=0.0)
    assert e[0] == pytest.approx(16e3, rel=1e-3)
    assert e[1] == pytest.approx(64e3, rel=1e-3)
    assert np.isnan(e[2])  # would need 1.6e6 tokens, past the run
    raw = tokens_to_reach(run, [3.0, 2.5], min_frac=0.0, smooth=False)
    assert raw == pytest.approx([16e3, 64e3], rel=1e-2)


def test_analyse_needs_six_runs():
    runs = [BatchRun(f"b{b}", b, 4, np.linspace(1, 10, 5), np.linspace(3, 2, 5)) for b in (1, 2, 4, 8, 16)]
    with pytest.raises(RampError, match="at least 6"):
        analyse(runs, [2.5])


def test_bopt_power_law():
    D = np.array([1e6, 4e6, 1.6e7])
    fit = fit_bopt_curve(D, 3.0 * D**0.5)
    assert fit.coef == pytest.approx(3.0)
    assert fit.exponent == pytest.approx(0.5)
    assert fit.recipe_keys() == ["batch_schedule.bopt_coef=3", "batch_schedule.bopt_exponent=0.5"]


def test_a_fit_whose_minimum_is_not_among_the_points_is_refused():
    S, E = [130.0, 300.0, 1000.0, 3000.0, 9000.0, 20000.0], [2e6, 1.3e6, 1e6, 1.5e6, 4.5e6, 1e7]
    assert unsupported(TRUE_ES, S, E) == ""
    # S_opt past the most steps measured; E_min 1e6 against 2.5e6 measured at the least
    assert "S_opt 1000 outside the measured steps [1.3e+04, 2e+04]" in unsupported(
        TRUE_ES, [13e3, 2e4], [3e6, 4e6]
    )
    assert "E_min 1e+06 far below" in unsupported(TRUE_ES, [300.0, 1000.0, 3000.0], [2.5e6, 3e6, 4e6])


def test_b_min_is_reported_only_where_the_linear_stage_has_points():
    inside = TargetResult(3.0, ("a",), (130.0, 1000.0, 5000.0), (2e6, 1e6, 2.5e6), TRUE_ES)  # S_2 = 3000
    beyond = TargetResult(3.0, ("a",), (130.0, 1000.0, 2500.0), (2e6, 1e6, 1.3e6), TRUE_ES)
    assert inside.b_min == pytest.approx(500) and inside.b_opt == pytest.approx(1000)
    assert beyond.b_min is None and beyond.b_opt == pytest.approx(1000)
