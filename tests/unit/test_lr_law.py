"""The optimal-LR law: recover known parameters of L(D), of the LR parabola and of lr*(N, D) from noisy
synthetic sweeps, and ramp-fit-lr-law on a run cache in the LR-transfer sweep's file format.

Expected values are the generating parameters, hand counts, or numbers worked out by hand (shown in the
comments); no expected value is computed with the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.lr_transfer import RUN_SETS as SWEEP_SETS
from launcher.errors import RampError
from launcher.laws.lr_law import (
    PAPER_LAW,
    SweepPoint,
    SweepRun,
    count_params,
    extrapolate_run,
    fit_loss_curve,
    fit_lr_curve,
    fit_power_law,
    fit_sweep,
    fit_sweep_runs,
    near_minimum,
    read_sweep,
)
from launcher.recipe import ModelConfig, load
from tools.fit_lr_law import describe_recipe, main

TRUE = dict(c=38.4588, a=-0.2219, b=-0.3509)  # the paper's law as ground truth
NS = (1e7, 3e7, 1e8, 3e8, 1e9)
DS = (1e9, 4e9, 1.6e10)

# A loss surface whose runs follow L(D) = L0 + A D^-gamma exactly and whose optimum in x = ln lr is
# exactly ln lr*(N, D) = ln c + a ln N + b ln D:
#   L(x, D) = E(N) + H (z + D^-gamma / z),  z = exp(MU (x - ln(c N^a))),  MU = -gamma / (2 b).
# dL/dx = H MU (z - D^-gamma / z) = 0 at z^2 = D^-gamma, i.e. x = ln(c N^a) - gamma/(2 MU) ln D
# = ln(c N^a) + b ln D. Per run (fixed x): L0 = E + H z (rises with the LR), A = H / z (falls with it).
GAMMA = 0.3
MU = -GAMMA / (2 * TRUE["b"])
H = 5.0


def true_lr_star(n: float, d: float) -> float:
    return TRUE["c"] * n ** TRUE["a"] * d ** TRUE["b"]


def decayed_loss(n: float, lr: float, d: float) -> float:
    z = math.exp(MU * (math.log(lr) - math.log(TRUE["c"] * n ** TRUE["a"])))
    return 2.0 + 10.0 * n**-0.1 + H * (z + d**-GAMMA / z)


def decay_gain(n: float, lr: float) -> float:
    """The decay helps more at high LR (half the LR-driven floor), so the stable-phase optimum is lower."""
    return 0.5 * H * math.exp(MU * (math.log(lr) - math.log(TRUE["c"] * n ** TRUE["a"])))


def test_the_synthetic_surface_has_its_minimum_on_the_true_law() -> None:
    # Check of the generator itself, on a fine LR grid (no code under test).
    for n, d in ((1e5, 2e6), (1e8, 4e9)):
        lrs = np.exp(np.linspace(math.log(true_lr_star(n, d)) - 1, math.log(true_lr_star(n, d)) + 1, 2001))
        best = lrs[int(np.argmin([decayed_loss(n, lr, d) for lr in lrs]))]
        assert best == pytest.approx(true_lr_star(n, d), rel=2e-3)


def sweep(seed: int = 0, noise: float = 1e-3, C: float = 0.08) -> list[SweepPoint]:
    """7 log-spaced LRs around the true optimum of every (N, D); loss = parabola in ln lr + noise."""
    rng = np.random.default_rng(seed)
    pts = []
    for n in NS:
        for d in DS:
            x_star = math.log(true_lr_star(n, d))
            l_min = 2.0 + 10.0 * n**-0.1
            for u in np.linspace(-1.5, 1.5, 7):
                pts.append(SweepPoint(n, d, math.exp(x_star + u), l_min + C * u * u + rng.normal(0, noise)))
    return pts


def test_parabola_recovers_l_min_c_and_x_star() -> None:
    # Tolerances hold with margin over 200 seeds (max errors 0.006, 0.001, 0.0014 at noise 1e-3).
    x_star = math.log(3e-4)
    lrs = np.exp(x_star + np.linspace(-1.5, 1.5, 9))
    for seed in range(5):
        loss = 2.5 + 0.08 * (np.log(lrs) - x_star) ** 2 + np.random.default_rng(seed).normal(0, 1e-3, 9)
        f = fit_lr_curve(lrs, loss)
        assert f.x_star == pytest.approx(x_star, abs=0.02)  # lr* within 2%
        assert f.lr_star == pytest.approx(3e-4, rel=0.02)
        curvature = f.C
        assert curvature == pytest.approx(0.08, abs=0.005)
        assert f.L_min == pytest.approx(2.5, abs=0.005)
        assert f.bracketed and f.r2 > 0.99 and f.n == 9
        assert f.predict(f.lr_star * math.e) == pytest.approx(
            f.L_min + curvature
        )  # 1 in ln lr off the vertex


def test_loss_curve_recovers_l0_a_gamma() -> None:
    d = np.geomspace(2e4, 4e5, 12)
    exact = fit_loss_curve(d, 2.1 + 35.0 * d**-0.3)
    assert (exact.L0, exact.A, exact.gamma) == pytest.approx((2.1, 35.0, 0.3), rel=1e-4)
    assert exact.r2 == pytest.approx(1.0) and exact.n == 12 and exact.note == ""
    # 4x beyond the data: 2.1 + 35 * 1.6e6^-0.3 = 2.1 + 35 * exp(-0.3 * 14.2855) = 2.1 + 35 * 0.013765
    # = 2.5818
    assert exact.predict(1.6e6) == pytest.approx(2.5818, abs=1e-4)
    for seed in range(5):
        y = 2.1 + 35.0 * d**-0.3 + np.random.default_rng(seed).normal(0, 0.005, d.size)
        f = fit_loss_curve(d, y)
        assert f.gamma == pytest.approx(0.3, abs=0.05) and f.r2 > 0.99
        assert 0.0015 < f.rmse < 0.009  # the injected noise (0.005, 3 parameters fitted)
        assert f.predict(1.6e6) == pytest.approx(2.5818, abs=0.03)  # max error over 20 seeds 0.019
        y[4] += 0.3  # one bad evaluation: the robust fit down-weights it and says so
        g = fit_loss_curve(d, y)
        assert g.predict(1.6e6) == pytest.approx(2.5818, abs=0.03), seed  # max over 20 seeds 0.021
        assert "1 point(s)" in g.note
    # Plain least squares (scipy's curve_fit, an independent fit) is bent by that point by far more.
    from scipy.optimize import curve_fit

    (l0, a, gamma), _ = curve_fit(lambda x, l0, a, g: l0 + a * x**-g, d, y, p0=(2.0, 30.0, 0.3), maxfev=20000)
    assert abs(l0 + a * 1.6e6**-gamma - 2.5818) > 0.05


def test_loss_curve_refuses_too_few_points_and_flags_bounds() -> None:
    with pytest.raises(RampError, match="at least 3 token counts"):
        fit_loss_curve([1e6, 2e6, 3e6], [3.0, float("nan"), 2.9])
    three = fit_loss_curve([1e6, 2e6, 4e6], [3.0, 2.9, 2.85])
    assert "exact fit" in three.note
    flat = fit_loss_curve([1e6, 2e6, 4e6, 8e6], [3.0, 3.01, 3.0, 3.01])  # no fall with D
    assert "does not fall" in flat.note or "at its bound" in flat.note


def test_run_extrapolation_subtracts_the_decay_gain() -> None:
    # Stable phase 2 + 40 D^-0.25 at 10 points up to 80% of a 1e8-token run; the decayed end is 0.1 lower.
    d = np.geomspace(5e6, 8e7, 10)
    stable = 2.0 + 40.0 * d**-0.25
    final = 2.0 + 40.0 * 1e8**-0.25 - 0.1  # 2 + 40/100 - 0.1 = 2.3
    run = SweepRun(N=1e6, lr=1e-3, tokens=1e8, final_loss=final, stable=tuple(zip(d, stable)))
    rf = extrapolate_run(run, targets=(1e8, 1.6e9))
    assert rf.fit is not None and rf.fit.decay_gain == pytest.approx(0.1, abs=1e-4)
    assert rf.losses[1e8] == pytest.approx(2.3, abs=1e-6)
    # 2 + 40 * 1.6e9^-0.25 - 0.1 = 2 + 40/200 - 0.1 = 2.1
    assert rf.losses[1.6e9] == pytest.approx(2.1, abs=1e-3)
    # Stable points before min_frac of the run are left out: 5e6 x 16^(k/9) < 2e7 for k < 4.5, the first 5.
    assert extrapolate_run(run, (1e8,), min_frac=0.2).fit.n == 5
    # No curve: the final loss at the run's own tokens only; diverged: NaN at every target.
    bare = extrapolate_run(SweepRun(1e6, 1e-3, 1e8, 2.3), targets=(1e8, 4e8))
    assert bare.fit is None and bare.losses == {1e8: 2.3} and "final loss only" in bare.note
    gone = extrapolate_run(SweepRun(1e6, 1e-3, 1e8, float("nan"), tuple(zip(d, stable))), (1e8, 4e8))
    assert gone.fit is None and all(math.isnan(v) for v in gone.losses.values())


def synthetic_runs(ns, tokens: float, seed: int, noise: float = 1e-3, points: int = 12) -> list[SweepRun]:
    """One sweep per N: 7 LRs around the optimum at 2x the run length, each run measured along the way."""
    rng = np.random.default_rng(seed)
    runs = []
    for n in ns:
        centre = math.log(true_lr_star(n, 2 * tokens))
        for u in np.linspace(-1.5, 1.5, 7):
            lr = math.exp(centre + u)
            ds = np.geomspace(0.1 * tokens, 0.8 * tokens, points)
            stable = [decayed_loss(n, lr, x) + decay_gain(n, lr) + rng.normal(0, noise) for x in ds]
            final = decayed_loss(n, lr, tokens) + rng.normal(0, noise)
            runs.append(SweepRun(n, lr, tokens, final, tuple(zip(ds.tolist(), stable))))
    return runs


def test_one_sweep_per_n_recovers_the_law_by_extrapolation() -> None:
    tokens = 2e9
    targets = [0.5 * tokens, tokens, 2 * tokens, 4 * tokens]
    for seed in range(2):
        fit = fit_sweep_runs(synthetic_runs(NS[:4], tokens, seed), targets, neighbours=2)
        assert len(fit.curves) == 16 and not fit.skipped  # 4 N x 4 D, every one bracketed
        assert all(c.bracketed for c in fit.curves)
        for c in fit.curves:  # every per-(N, D) optimum within 13% (max over 6 seeds 9%, a and b 0.008)
            assert c.lr_star == pytest.approx(true_lr_star(c.N, c.D), rel=0.13)
        assert fit.law.a == pytest.approx(TRUE["a"], abs=0.03)
        assert fit.law.b == pytest.approx(TRUE["b"], abs=0.05)
        # Inside the sweep, N = 1e8, D = 4e9: 38.4588 * 10^(-8 * 0.2219) * 10^(-9.6021 * 0.3509)
        # = 38.4588 * 0.016780 * 4.2722e-4 = 2.757e-4
        assert fit.law.predict(1e8, 4e9) == pytest.approx(2.757e-4, rel=0.05)
        assert fit.law.r2 > 0.98
        assert fit.holdout is not None and fit.holdout.N == 3e8 and len(fit.holdout.residuals) == 4
        assert fit.holdout.max_abs < 0.2  # the largest N predicted within 20% (max over 6 seeds 0.12)
        assert all(rf.fit is not None and rf.fit.r2 > 0.99 for rf in fit.runs)
    # Reading the stable-phase losses as if they were final losses misses the optimum: the decay gain
    # grows with the LR, so the stable-phase optimum sits ln(1.5)/(2 MU) = 0.47 lower in ln lr.
    runs = synthetic_runs(NS[:4], tokens, 0)
    # Each run cut at its last stable-phase point, taken as its end: no decay gain to subtract.
    no_decay = [SweepRun(r.N, r.lr, r.stable[-1][0], r.stable[-1][1], r.stable[:-1]) for r in runs]
    wrong = fit_sweep_runs(no_decay, targets, neighbours=2)
    assert wrong.law.predict(1e8, 4e9) < 0.8 * 2.757e-4  # exp(-0.47) = 0.63 of the truth


def test_power_law_recovers_c_a_b_from_final_losses() -> None:
    # Max errors over 100 seeds: a 0.001, b 0.0016, ln c 0.043.
    fit = fit_sweep(sweep(seed=1))
    law = fit.law
    assert len(fit.curves) == len(NS) * len(DS)
    assert law.a == pytest.approx(TRUE["a"], abs=0.01)
    assert law.b == pytest.approx(TRUE["b"], abs=0.01)
    assert math.log(law.c) == pytest.approx(math.log(TRUE["c"]), abs=0.1)
    assert law.r2 > 0.999 and law.rmse_log < 0.02 and len(law.residuals) == law.n == 15
    # Extrapolated in D: 38.4588 * 5e8^-0.2219 * 1e11^-0.3509 = 6.234e-5 (by hand)
    assert law.predict(5e8, 1e11) == pytest.approx(6.234e-5, rel=0.03)
    assert fit.holdout is not None and fit.holdout.N == 1e9 and fit.holdout.max_abs < 0.03


def test_power_law_with_multiplicative_noise_on_the_optima() -> None:
    rng = np.random.default_rng(3)
    n, d = np.meshgrid(NS, DS)
    n, d = n.ravel(), d.ravel()
    lr = TRUE["c"] * n ** TRUE["a"] * d ** TRUE["b"] * np.exp(rng.normal(0, 0.05, n.size))
    law = fit_power_law(n, d, lr)
    assert law.a == pytest.approx(TRUE["a"], abs=0.03)
    assert law.b == pytest.approx(TRUE["b"], abs=0.05)
    assert 0.02 < law.rmse_log < 0.08  # the injected 5% scatter shows up in the residuals
    held = fit_power_law(n[d == DS[0]], d[d == DS[0]], lr[d == DS[0]], fix_b=TRUE["b"])
    assert held.fixed == ("b",) and held.a == pytest.approx(TRUE["a"], abs=0.05)


def test_near_minimum_keeps_the_best_lr_and_its_neighbours() -> None:
    lrs = [1, 2, 4, 8, 16, 32, 64, 2, 4]  # two seeds at 2 and 4
    loss = [5.0, 4.0, 3.5, 3.6, 3.9, 4.5, float("nan"), 4.2, 3.7]
    # mean per LR: 1:5.0 2:4.1 4:3.6 8:3.6 16:3.9 32:4.5; best 4 (first of the tie) -> LRs 1..16
    assert near_minimum(lrs, loss, 2) == [0, 1, 2, 3, 4, 7, 8]
    assert near_minimum(lrs, loss, 1) == [1, 2, 3, 7, 8]
    # best at the edge: three LRs there
    assert near_minimum([1, 2, 4, 8], [1.0, 2.0, 3.0, 4.0], 1) == [0, 1, 2]


def test_diverged_runs_are_dropped_and_bad_sweeps_refused() -> None:
    lrs = np.array([1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    loss = 3.0 + 0.1 * (np.log(lrs) - math.log(1e-3)) ** 2
    loss[-1] = float("nan")
    assert fit_lr_curve(lrs, loss).n == 4
    with pytest.raises(RampError, match="not convex"):
        fit_lr_curve(lrs[:4], 3.0 - 0.1 * (np.log(lrs[:4]) - math.log(1e-3)) ** 2)
    with pytest.raises(RampError, match="at least 3 distinct LRs"):
        fit_lr_curve([1e-3, 2e-3], [3.0, 3.1])
    with pytest.raises(RampError, match="same N"):
        fit_power_law([1e8, 1e8, 1e8], [1e9, 2e9, 4e9], [1e-3, 8e-4, 6e-4])
    with pytest.raises(RampError, match="collinear"):
        fit_power_law([1e7, 1e8, 1e9], [1e9, 1e10, 1e11], [1e-3, 5e-4, 2e-4])
    # A (N, D) without an optimum is skipped with its reason; the rest still fit.
    pts = sweep(seed=0) + [SweepPoint(5e9, 1e9, lr, 3.0) for lr in (1e-4, 2e-4)]
    fit = fit_sweep(pts)
    assert len(fit.curves) == 15 and len(fit.skipped) == 1 and "N=5e+09" in fit.skipped[0]


def test_paper_prior_reproduces_the_digest_sanity_values() -> None:
    # /work/shared/research/papers.md section 3.2 (c), N as a parameter count and D as tokens.
    for n, d, lr in (
        (1e8, 2e10, 1.57e-4),
        (1e9, 1e11, 5.35e-5),
        (1.3e9, 5e11, 2.87e-5),
        (1.2e10, 5e11, 1.75e-5),
    ):
        assert PAPER_LAW.predict(n, d) == pytest.approx(lr, rel=0.01)
    assert "unconfirmed" in PAPER_LAW.note or "unconfirmed" in PAPER_LAW.n_kind


def test_count_params_matches_a_hand_count() -> None:
    m = ModelConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=256,
        num_experts=8,
        moe_ffn_hidden_size=32,
        moe_router_topk=2,
        moe_shared_expert_hidden_size=48,
        first_k_dense=1,
        tie_embeddings=False,
    )
    c = count_params(m, vocab_size=1000)  # padded to 1024
    attn = 64 * (4 + 2 * 2) * 16 + 4 * 16 * 64
    assert c.embedding == c.output == 1024 * 64
    assert c.attention == 4 * attn
    assert c.dense_mlp == 3 * 64 * 256  # SwiGLU: fc1 is 2x wide
    assert c.router == 3 * 8 * 64
    assert c.experts_total == 3 * 8 * 3 * 64 * 32 and c.experts_active == 3 * 2 * 3 * 64 * 32
    assert c.shared_experts == 3 * 3 * 64 * 48
    assert c.n("active") == c.non_embedding_active < c.n("total") == c.non_embedding_total
    assert c.n("active", embeddings=True) == c.active == c.non_embedding_active + 2 * 1024 * 64


def test_read_sweep_csv_and_json(tmp_path) -> None:
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("Params,Tokens,LR,Final_Loss\n1e8,2e9,0.001,3.1\n")
    assert read_sweep(csv_path) == [SweepPoint(1e8, 2e9, 1e-3, 3.1)]
    js = tmp_path / "s.json"
    js.write_text(json.dumps({"points": [{"N": 1e8, "D": 2e9, "lr": 1e-3, "loss": 3.1}]}))
    assert read_sweep(js) == read_sweep(csv_path)
    (tmp_path / "bad.csv").write_text("N,D,lr\n1,2,3\n")
    with pytest.raises(RampError, match="has no loss"):
        read_sweep(tmp_path / "bad.csv")


# The LR-transfer sweep's run files (benchmarks/results/lr_transfer_runs/*.json) as the benchmark writes
# them: its common overrides, then the depth.
RUN_SETS = [*SWEEP_SETS, "model.num_layers=2"]
STEPS = 1000
TOKENS = STEPS * 16 * 128  # 2,048,000


def family_n(width: int) -> int:
    """Active non-embedding parameters of the sweep's family, by hand: 2 MoE layers, each with attention
    4 w^2 (q, k, v, o; 4 heads, MHA), 2 active experts of 3 w^2 (SwiGLU, expert hidden = w), router 4 w."""
    return 2 * (4 * width * width + 2 * 3 * width * width + 4 * width)


def run_file(par: str, width: int, lr: float, seed: int, rng, curve: bool = True) -> dict:
    """One run file; losses from the synthetic surface at the run's hidden-matrix LR (muP: lr x 64/w)."""
    hidden = lr * (64 / width if par == "mup" else 1.0)
    n = family_n(width)
    sets = [
        *RUN_SETS,
        f"model.hidden_size={width}",
        "model.num_attention_heads=4",
        f"model.ffn_hidden_size={2 * width}",
        f"model.moe_ffn_hidden_size={width}",
        f"mup.enabled={'true' if par == 'mup' else 'false'}",
        *(
            ["mup.base_hidden_size=64", "mup.base_moe_ffn_hidden_size=64", "mup.base_head_dim=16"]
            * (par == "mup")
        ),
        f"optimizer.lr={lr!r}",
        f"training.train_steps={STEPS}",
        f"training.seed={seed}",
    ]
    # Every 50 steps from step 100 to 800, where moe-tiny's decay (the last 20%) starts: stable phase.
    evals = [t * 16 * 128 for t in range(100, 801, 50)]
    final = decayed_loss(n, hidden, TOKENS) + rng.normal(0, 1e-3)
    out = {
        "val_loss": final,
        "train_loss_last": final + 0.05,
        "steps_done": STEPS,
        "tokens": TOKENS,
        "seconds": 1.0,
        "note": "",
        "parametrisation": par,
        "width": width,
        "lr": lr,
        "overrides": sets,
        "seed": seed,
    }
    if curve:
        stable = [decayed_loss(n, hidden, t) + decay_gain(n, hidden) + rng.normal(0, 1e-3) for t in evals]
        # An evaluation inside the decay (step 900) is not a stable-phase loss: the tool leaves it out.
        mid_decay = [900 * 16 * 128, final + 0.01]
        out["val_curve"] = [[t, v] for t, v in zip(evals, stable)] + [mid_decay, [TOKENS, final]]
    return out


def write_sweep(directory, curve: bool = True) -> None:
    """Standard at widths 64, 128, 256 and muP at 128, 256 (its base width 64 is the standard run), 7 LRs
    around the optimum at 2x the run length, hidden-matrix LR as the true law's variable."""
    rng = np.random.default_rng(7)
    directory.mkdir()
    for par, widths in (("standard", (64, 128, 256)), ("mup", (128, 256))):
        for w in widths:
            centre = true_lr_star(family_n(w), 2 * TOKENS) / (64 / w if par == "mup" else 1.0)
            for k, u in enumerate(np.linspace(-1.5, 1.5, 7)):
                lr = float(f"{centre * math.exp(u):.4g}")
                run = run_file(par, w, lr, seed=1234, rng=rng, curve=curve)
                (directory / f"{par}-w{w}-lr{lr:g}-{k}.json").write_text(json.dumps(run, indent=2))


def test_cli_fits_the_transfer_sweeps_run_cache(tmp_path, capsys) -> None:
    runs = tmp_path / "lr_transfer_runs"
    write_sweep(runs)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {hidden_size: 64, num_layers: 2, vocab_size: 512}\ntraining: {train_tokens: 1000000}\n"
    )
    out_json = tmp_path / "law.json"
    assert main([str(runs), "--recipe", str(recipe), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "muP at its base width 64: the 7 standard runs there" in text
    assert "1 val_curve point(s) inside the decay left out" in text
    assert "hold-out: refitted without N=1.313e+06" in text and "prior:" in text
    data = json.loads(out_json.read_text())
    for par in ("standard", "mup"):
        fit = data["fits"][par]
        assert {c["N"] for c in fit["curves"]} == {82432, 328704, 1312768}  # family_n(64, 128, 256)
        assert len(fit["runs"]) == 21 and all(r["fit"]["r2"] > 0.99 for r in fit["runs"])
        # The law is in the hidden-matrix LR for both: same exponents. Read in muP's optimizer.lr (the
        # embedding's, x w/64 = x sqrt(N) roughly) the N exponent would be about 0.5 higher.
        assert fit["law"]["a"] == pytest.approx(TRUE["a"], abs=0.05), par
        assert fit["law"]["b"] == pytest.approx(TRUE["b"], abs=0.06), par
        assert max(abs(r) for r in fit["holdout"]["ln_residuals"]) < 0.15
    # The test recipe: N = 2 * (4 * 64^2 + 2 * 3 * 64 * 256 + 8 * 64) = 230,400 active non-embedding
    # (defaults: 4 heads, 8 experts of 256, top-2), D = 245 steps x 16 x 256 = 1,003,520 tokens.
    # The true law there: 38.4588 * 230400^-0.2219 * 1003520^-0.3509 = 0.01946 (by hand).
    rec = data["recipes"][0]
    assert rec["N"] == 230_400 and rec["D"] == 1_003_520 and rec["hidden_lr"] == 2e-3
    assert rec["lr_fit"]["standard"] == pytest.approx(0.01946, rel=0.15)
    assert rec["lr_prior"] == pytest.approx(0.01946, rel=1e-3)


def test_cli_without_val_curve_uses_final_losses_only(tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    write_sweep(runs, curve=False)
    # One budget only: the D exponent cannot be fitted, and the error says how to proceed.
    assert main([str(runs), "--no-prior"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--fix-b" in err and "no run has a val_curve" in err
    out_json = tmp_path / "law.json"
    assert main([str(runs), "--fix-b", str(TRUE["b"]), "--no-prior", "--json", str(out_json)]) == 0
    assert "final loss only" in capsys.readouterr().out
    fit = json.loads(out_json.read_text())["fits"]["standard"]
    assert {c["D"] for c in fit["curves"]} == {TOKENS}
    assert fit["law"]["a"] == pytest.approx(TRUE["a"], abs=0.05)


def test_hidden_matrix_lr_under_mup_is_the_base_lr_over_the_width_ratio() -> None:
    sets = ["model.hidden_size=256", "mup.enabled=true", "mup.base_hidden_size=64", "optimizer.lr=0.01"]
    rec = describe_recipe(load("moe-tiny", sets), "active", False)
    assert rec["optimizer_lr"] == 0.01 and rec["hidden_lr"] == pytest.approx(0.01 * 64 / 256)
    std = describe_recipe(load("moe-tiny", ["optimizer.lr=0.01"]), "active", False)
    assert std["hidden_lr"] == 0.01


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
    assert main([str(tmp_path / "missing.csv")]) == 2
    assert "not found" in capsys.readouterr().err
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "a.json").write_text(json.dumps({"parametrisation": "mup", "width": 64, "lr": 1e-3}))
    assert main([str(runs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a.json" in err and "val_loss, tokens, overrides" in err
    # The same run twice (same parametrisation, N, lr, seed and tokens): refused, both files named.
    write_sweep(tmp_path / "twice")
    first = sorted((tmp_path / "twice").glob("*.json"))[0]
    (tmp_path / "twice" / "copy.json").write_text(first.read_text())
    assert main([str(tmp_path / "twice"), "--no-prior"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "copy.json" in err and first.name in err and "--glob" in err
