"""The optimal-LR law: recover known parabola and power-law parameters from noisy synthetic sweeps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from launcher.errors import RampError
from launcher.laws.lr_law import (
    PAPER_LAW,
    SweepPoint,
    count_params,
    fit_lr_curve,
    fit_power_law,
    fit_sweep,
    read_sweep,
)
from launcher.recipe import ModelConfig
from tools.fit_lr_law import main

TRUE = dict(c=38.4588, a=-0.2219, b=-0.3509)  # the paper's law as ground truth
NS = (1e7, 3e7, 1e8, 3e8, 1e9)
DS = (1e9, 4e9, 1.6e10)


def sweep(seed: int = 0, noise: float = 1e-3, C: float = 0.08) -> list[SweepPoint]:
    """7 log-spaced LRs around the true optimum of every (N, D); loss = parabola in ln lr + noise."""
    rng = np.random.default_rng(seed)
    pts = []
    for n in NS:
        for d in DS:
            x_star = math.log(TRUE["c"] * n ** TRUE["a"] * d ** TRUE["b"])
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


def test_power_law_recovers_c_a_b_end_to_end() -> None:
    # Max errors over 100 seeds: a 0.001, b 0.0016, ln c 0.043.
    curves, law = fit_sweep(sweep(seed=1))
    assert len(curves) == len(NS) * len(DS)
    assert law.a == pytest.approx(TRUE["a"], abs=0.01)
    assert law.b == pytest.approx(TRUE["b"], abs=0.01)
    assert math.log(law.c) == pytest.approx(math.log(TRUE["c"]), abs=0.1)
    assert law.r2 > 0.999 and law.rmse_log < 0.02 and len(law.residuals) == law.n == 15
    assert law.predict(5e8, 1e11) == pytest.approx(PAPER_LAW.predict(5e8, 1e11), rel=0.03)  # extrapolated D


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


def test_cli_fits_prints_and_predicts_for_a_recipe(tmp_path, capsys) -> None:
    path = tmp_path / "sweep.csv"
    rows = ["N,D,lr,loss"] + [f"{p.N},{p.D},{p.lr},{p.loss}" for p in sweep(seed=2)]
    path.write_text("\n".join(rows) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {hidden_size: 64, num_layers: 2, vocab_size: 512}\ntraining: {train_tokens: 1000000}\n"
    )
    out_json = tmp_path / "law.json"
    assert main([str(path), "--recipe", str(recipe), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "lr*(N, D) = " in text and "R^2=" in text and "prior:" in text and "predicted lr*" in text
    data = json.loads(out_json.read_text())
    assert data["law"]["a"] == pytest.approx(TRUE["a"], abs=0.01)
    rec = data["recipe"]
    assert rec["lr_fit"] == pytest.approx(
        data["law"]["c"] * rec["N"] ** data["law"]["a"] * rec["D"] ** data["law"]["b"]
    )
    assert rec["D"] == 1_003_520  # rounded up to whole steps of 16 x 256 tokens


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
    assert main([str(tmp_path / "missing.csv")]) == 2
