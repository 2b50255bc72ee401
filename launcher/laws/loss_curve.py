"""Loss-curve laws with LR annealing, extended to batch schedules: fit on a few runs, predict any schedule.

Two laws, both written on the per-step LR sequence ``eta_1 .. eta_T`` a run actually applied:

**Momentum law** (arXiv 2408.11029, Tissue et al.; papers.md section 4)::

    L(s) = L0 + A * S1(s)**-alpha - C * S2(s)
    S1(s) = sum_{i<=s} eta_i                                   (forward area)
    m_i   = lam * m_{i-1} + d_i,   m_0 = 0                     (annealing momentum)
    S2(s) = sum_{i<=s} m_i                                     (annealing area)

with ``d_i = eta_{i-1} - eta_i`` the LR drop at step i. A single drop of d saturates S2's slope:
``m -> d * lam**j`` and ``S2 -> d / (1 - lam)``; a constant LR gives S2 = 0.

**Multi-power law** (arXiv 2503.12811, Luo et al., ICLR 2025)::

    L(t)  = L0 + A * S1(t)**-alpha - LD(t)
    LD(t) = B * sum_{k<=t} d_k * G(eta_k**-gamma * S_k(t)),   S_k(t) = sum_{k<=tau<=t} eta_tau
    G(x)  = 1 - (C * x + 1)**-beta

Every LR drop ``d_k`` lowers the loss through a saturating power function of the LR area run since the
drop, scaled by the LR after it. The paper writes ``S1 + S_W`` with S1 counted from the end of warmup and
S_W the warmup's area; here S1 counts every step, warmup included, which is the same sum. This form was
read in the paper's reference code; ``eta_k`` is floored at ``ETA_FLOOR`` x peak so a decay to exactly 0
gives ``G = 1`` instead of 0 * inf.

**Conventions, fixed for fitting and prediction alike**

- LRs are divided by ``ref_lr`` (the peak LR of the first fitting curve), so S1 counts steps at the peak
  LR and the parameters do not depend on the LR's units.
- Warmup: S1 counts it; drops are counted only from the first step at which the LR falls (the leading
  non-decreasing stretch, warmup and the constant phase after it, has ``d = 0``). Warmup's rise is
  not an "annealing" of negative size. Later rises (a re-warm, a batch-rule LR increase) count as
  negative drops.
- Fits use ``r = ln(L_pred) - ln(L_obs)`` with a Huber loss of scale 1e-3 (the convention of the
  2408.11029 and 2503.12811 reference fits), ``scipy.optimize.least_squares`` with bounds, started from the
  best points of a grid over the nonlinear parameters with the linear ones solved exactly at each.
- Hyper-parameters: the multi-power law has none outside its fitted seven. The momentum law's ``lam`` is
  either fixed from the run length by :func:`lam_from_steps` (default: the momentum's e-folding time is
  ``LAM_SPAN_FRAC`` = 10% of the fitting runs' steps, clipped to [0.9, 0.999]) or fitted on the fitting
  curves (``lam="fit"``: a profile over a grid). Neither looks at the curves being predicted.
  calibration.md found the paper's 0.999 degenerate on 1,200-step runs and 0.99 right there; the 10% rule
  gives 0.9917 at 1,200 steps and 0.999 at 10,000. That value was picked on calibration.md's held-out
  curves, so it is a prior from other runs, stated here before any benchmark of this code.

**Batch schedules.** Neither paper covers a changing batch. We use the LR-batch equivalence behind
seesaw (arXiv 2510.14717) and Adam's square-root rule: below the critical batch, a step at batch ``B``
and LR ``eta`` does what ``k = B / B0`` steps at the reference batch ``B0`` and LR
``eta_eff = eta * (B0 / B)**batch_exponent`` do on the same tokens (exponent 1/2: seesaw's "halving the
LR equals doubling the batch and cutting the LR by sqrt 2"). Both laws then run on these *virtual
steps* of ``B0`` sequences: S1 gains ``k * eta_eff`` per real step, the momentum and the multi-power
area advance by ``k`` virtual steps of ``eta_eff``, and a real step's drop happens at its first virtual
step. For a constant batch ``k = 1`` and everything reduces to the per-step laws above; a run that
doubles its batch under the sqrt LR rule keeps ``eta_eff`` unchanged (no drop) and doubles its S1 per
step: per token, it is the constant-batch run. ``batch_exponent`` is fixed at 1/2 (a documented rule,
not fitted: constant-batch fitting curves cannot identify it); above the critical batch the equivalence
fails (a large batch wastes tokens) and the law will be optimistic there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
from scipy.optimize import least_squares, nnls

from launcher.errors import require

LawName = Literal["momentum", "multi-power"]
LAWS: tuple[str, ...] = get_args(LawName)
#: Momentum-law lambda rule: the e-folding time 1/(1-lam) of the annealing momentum is this fraction of
#: the fitting runs' (virtual) steps.
LAM_SPAN_FRAC = 0.1
LAM_BOUNDS = (0.9, 0.999)
#: ``lam="fit"`` profiles the momentum law over e-folding times 1/(1-lam) on this grid (virtual steps).
LAM_FIT_SPANS = (5, 10, 20, 40, 70, 100, 150, 200, 300, 500, 1000, 2000)
#: Seesaw / Adam sqrt rule: eta_eff = eta * (B0 / B)**BATCH_EXPONENT.
BATCH_EXPONENT = 0.5
ETA_FLOOR = 1e-6
HUBER_SCALE = 1e-3


# -- the per-step schedule ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSchedule:
    """What a run applies step by step: ``lr[i]`` and ``batch[i]`` (sequences) of step ``i + 1``."""

    lr: np.ndarray
    batch: np.ndarray
    seq_length: int

    def __post_init__(self) -> None:
        lr = np.asarray(self.lr, dtype=float)
        batch = np.asarray(self.batch, dtype=float)
        if batch.ndim == 0:
            batch = np.full_like(lr, float(batch))
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "batch", batch)
        require(lr.ndim == 1 and lr.size > 0, "a schedule needs at least one step")
        require(batch.shape == lr.shape, f"schedule: {batch.size} batches for {lr.size} steps")
        require(bool(np.all(np.isfinite(lr)) and np.all(lr >= 0)), "schedule: LRs must be finite and >= 0")
        require(bool(np.all(batch > 0)), "schedule: batches must be > 0")
        require(self.seq_length > 0, f"schedule: seq_length={self.seq_length} must be > 0")

    @property
    def steps(self) -> int:
        return int(self.lr.size)

    @property
    def tokens(self) -> np.ndarray:
        """Tokens consumed after each step."""
        return np.cumsum(self.batch) * self.seq_length

    def step_at_tokens(self, tokens: Sequence[float] | np.ndarray) -> np.ndarray:
        """1-based index of the first step after which ``tokens`` are consumed (clipped to the run)."""
        idx = np.searchsorted(self.tokens, np.asarray(tokens, dtype=float), side="left") + 1
        return np.clip(idx, 1, self.steps)


def schedule_from_factor(
    factor: Callable[[float], float],
    peak_lr: float,
    seq_length: int,
    phases: Sequence[tuple[int, int]],
    lr_scale: Callable[[int], float] = lambda b: 1.0,
) -> StepSchedule:
    """Per-step LRs of a run: ``phases`` are ``(steps, batch)`` in order (``batch_size.simulate``), and the
    LR of a step is ``peak_lr * factor(tokens after the step) * lr_scale(batch)`` as the trainer applies it
    (``callbacks/lr_schedule.py``)."""
    batches = np.concatenate([np.full(int(n), float(b)) for n, b in phases if n > 0])
    tokens = np.cumsum(batches) * seq_length
    lr = np.array([peak_lr * factor(t) * lr_scale(int(b)) for t, b in zip(tokens, batches)])
    return StepSchedule(lr, batches, seq_length)


def schedule_from_points(
    points: Sequence[tuple[float, float]], batch: int | Sequence[int], seq_length: int
) -> StepSchedule:
    """Per-step LRs linear in tokens through ``(tokens, lr)`` points (the first at 0 tokens or later; flat
    before the first point); the run ends at the last point. ``batch``: one batch or one per step."""
    pts = sorted((float(t), float(v)) for t, v in points)
    require(len(pts) >= 2, "LR points: give at least two (tokens, lr) pairs")
    xs = np.array([p[0] for p in pts])
    require(bool(np.all(np.diff(xs) > 0)), "LR points: token positions must be distinct")
    total = xs[-1]
    if np.ndim(batch) == 0:
        n = math.ceil(total / (float(batch) * seq_length))
        batches = np.full(n, float(batch))
    else:
        batches = np.asarray(batch, dtype=float)
    tokens = np.minimum(np.cumsum(batches) * seq_length, total)
    lr = np.interp(tokens, xs, [p[1] for p in pts])
    return StepSchedule(lr, batches, seq_length)


# -- S1 and S2 ---------------------------------------------------------------------------------------------


def virtual_steps(
    schedule: StepSchedule, ref_lr: float, ref_batch: float, batch_exponent: float = BATCH_EXPONENT
) -> tuple[np.ndarray, np.ndarray]:
    """``(k, eta)`` per real step: how many reference-batch steps it is worth (``B / B0``) and the LR
    each of them runs at, relative to ``ref_lr`` (``eta * (B0 / B)**batch_exponent / ref_lr``)."""
    require(ref_lr > 0 and ref_batch > 0, "loss law: ref_lr and ref_batch must be > 0")
    k = schedule.batch / ref_batch
    eta = schedule.lr / ref_lr * k**-batch_exponent
    return k, eta


def lr_drops(eta: np.ndarray) -> np.ndarray:
    """``d_i = eta_{i-1} - eta_i``, 0 over the leading non-decreasing stretch (warmup and the stable phase
    up to the first fall) and at the first step."""
    eta = np.asarray(eta, dtype=float)
    d = np.zeros_like(eta)
    d[1:] = eta[:-1] - eta[1:]
    falls = np.nonzero(d > 0)[0]
    if falls.size == 0:
        return np.zeros_like(eta)
    d[: falls[0]] = 0.0
    return d


def s1_s2(eta: np.ndarray, lam: float, k: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """S1 and S2 after each step (the recurrences in the module docstring).

    With ``k`` (virtual steps per real step, :func:`virtual_steps`) a real step is ``k`` steps at ``eta``
    whose first carries the drop: ``m' = lam * m + d``; S2 gains ``m' * (1 + lam + ... + lam**(k-1))`` =
    ``m' * (1 - lam**k) / (1 - lam)`` and the momentum leaves at ``m' * lam**(k-1)``; S1 gains ``k * eta``.
    For ``k = 1`` this is exactly ``m_i = lam m_{i-1} + d_i``, ``S2 += m_i``. Real ``k`` uses the same
    closed forms.
    """
    require(0.0 <= lam <= 1.0, f"lambda={lam}: must be in [0, 1]")
    eta = np.asarray(eta, dtype=float)
    k = np.ones_like(eta) if k is None else np.asarray(k, dtype=float)
    d = lr_drops(eta)
    s1 = np.cumsum(k * eta)
    s2 = np.empty_like(eta)
    m = total = 0.0
    const_k = bool(np.all(k == 1.0))
    for i in range(eta.size):
        m = lam * m + d[i]
        if const_k:
            total += m
        else:
            ki = k[i]
            total += m * (ki if lam == 1.0 else (1.0 - lam**ki) / (1.0 - lam))
            m *= lam ** (ki - 1.0)
        s2[i] = total
    return s1, s2


def lam_from_steps(steps: float) -> float:
    """The documented lambda rule: ``1 / (1 - lam) = LAM_SPAN_FRAC * steps``, clipped to ``LAM_BOUNDS``."""
    span = max(LAM_SPAN_FRAC * float(steps), 1.0)
    return float(min(max(1.0 - 1.0 / span, LAM_BOUNDS[0]), LAM_BOUNDS[1]))


def multi_power_drop(
    eta: np.ndarray, k: np.ndarray, at: np.ndarray, C: float, beta: float, gamma: float
) -> np.ndarray:
    """``sum_k d_k G(eta_k**-gamma S_k(t))`` at the 0-based step indices ``at`` (LD / B)."""
    return _drop_value(_drop_terms(eta, k, at), C, beta, gamma)


def _drop_terms(eta: np.ndarray, k: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What LD needs that no parameter changes: S_k(t) (points x drops), d_k and ln eta_k."""
    d = lr_drops(eta)
    idx = np.nonzero(d)[0]
    s1 = np.cumsum(k * eta)
    s1_before = s1 - k * eta  # S1 after step i-1
    area = np.maximum(s1[np.asarray(at)][:, None] - s1_before[idx][None, :], 0.0)  # 0: drop not yet made
    return area, d[idx], np.log(np.maximum(eta[idx], ETA_FLOOR))


def _drop_value(terms: tuple[np.ndarray, np.ndarray, np.ndarray], C: float, beta: float, gamma: float):
    area, d, log_eta = terms
    if d.size == 0:
        return np.zeros(area.shape[0])
    x = C * np.exp(-gamma * log_eta)[None, :] * area
    return ((1.0 - (1.0 + x) ** -beta) * d[None, :]).sum(axis=1)


# -- curves and fits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """A measured loss curve: ``loss[j]`` after step ``steps[j]`` (1-based) of ``schedule``."""

    name: str
    schedule: StepSchedule
    steps: np.ndarray
    loss: np.ndarray

    def __post_init__(self) -> None:
        steps = np.asarray(self.steps, dtype=int)
        loss = np.asarray(self.loss, dtype=float)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "loss", loss)
        require(steps.shape == loss.shape and steps.size > 0, f"{self.name}: no loss points")
        require(
            bool(np.all((steps >= 1) & (steps <= self.schedule.steps))),
            f"{self.name}: loss points outside the run's {self.schedule.steps} steps",
        )
        require(bool(np.all(np.isfinite(loss) & (loss > 0))), f"{self.name}: losses must be finite and > 0")

    @property
    def tokens(self) -> np.ndarray:
        return self.schedule.tokens[self.steps - 1]

    def after(self, frac: float) -> np.ndarray:
        """Which loss points lie past the first ``frac`` of the run's tokens (not its steps: a run that grows
        its batch takes its first 5% of steps on far fewer than 5% of its tokens)."""
        return self.tokens > frac * self.schedule.tokens[-1]


PARAMS: dict[str, tuple[str, ...]] = {
    "momentum": ("L0", "A", "alpha", "C"),
    "multi-power": ("L0", "A", "alpha", "B", "C", "beta", "gamma"),
}


@dataclass(frozen=True)
class LossLaw:
    """A fitted law, with every convention it needs to predict another schedule."""

    law: str
    params: dict[str, float]
    ref_lr: float
    ref_batch: float
    lam: float | None = None  # momentum law only
    lam_rule: str = ""
    batch_exponent: float = BATCH_EXPONENT
    fitted_on: tuple[str, ...] = ()
    rmse: float = float("nan")  # of ln L, in-sample
    mape: float = float("nan")  # mean |L_pred / L_obs - 1|, in-sample
    max_ape: float = float("nan")
    n_points: int = 0
    cost: float = float("nan")

    def predict_steps(self, schedule: StepSchedule, steps: Sequence[int] | np.ndarray | None = None):
        """Predicted loss after the given 1-based steps (default every step)."""
        at = np.arange(schedule.steps) if steps is None else np.asarray(steps, dtype=int) - 1
        k, eta = virtual_steps(schedule, self.ref_lr, self.ref_batch, self.batch_exponent)
        return _predict(self.law, self.params, eta, k, at, self.lam)

    def predict(self, curve: Curve) -> np.ndarray:
        return self.predict_steps(curve.schedule, curve.steps)

    def formula(self) -> str:
        p = self.params
        if self.law == "momentum":
            return (
                f"L = {p['L0']:.4f} + {p['A']:.4g} S1^-{p['alpha']:.4f} - {p['C']:.4g} S2  "
                f"(lambda {self.lam:.5g}: {self.lam_rule})"
            )
        return (
            f"L = {p['L0']:.4f} + {p['A']:.4g} S1^-{p['alpha']:.4f} - {p['B']:.4g} sum d_k "
            f"[1 - (1 + {p['C']:.4g} eta_k^-{p['gamma']:.4f} S_k)^-{p['beta']:.4f}]"
        )

    def describe(self) -> str:
        return (
            f"{self.law}: {self.formula()}; S1 in steps of {self.ref_batch:g} sequences at lr "
            f"{self.ref_lr:.4g}; fit on {', '.join(self.fitted_on)}: {self.n_points} points, "
            f"mean |err| {self.mape * 100:.3f}%, max {self.max_ape * 100:.3f}%"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["fitted_on"] = list(self.fitted_on)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LossLaw:
        require(d.get("law") in LAWS, f"fit: law={d.get('law')!r}: choose one of {', '.join(LAWS)}")
        keys = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in keys}
        kw["fitted_on"] = tuple(kw.get("fitted_on", ()))
        kw["params"] = {k: float(v) for k, v in kw["params"].items()}
        return cls(**kw)


def _predict(
    law: str, p: dict[str, float], eta: np.ndarray, k: np.ndarray, at: np.ndarray, lam: float | None
) -> np.ndarray:
    s1 = np.cumsum(k * eta)[at]
    base = p["L0"] + p["A"] * s1 ** -p["alpha"]
    if law == "momentum":
        assert lam is not None
        _, s2 = s1_s2(eta, lam, k)
        return base - p["C"] * s2[at]
    return base - p["B"] * multi_power_drop(eta, k, at, p["C"], p["beta"], p["gamma"])


@dataclass
class _Prepared:
    """Per fitting curve: virtual steps and the indices of the points fitted."""

    eta: np.ndarray
    k: np.ndarray
    at: np.ndarray
    loss: np.ndarray
    s1: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _prepare(curves: Sequence[Curve], ref_lr: float, ref_batch: float, skip_frac: float) -> list[_Prepared]:
    out = []
    for c in curves:
        k, eta = virtual_steps(c.schedule, ref_lr, ref_batch)
        keep = c.after(skip_frac)
        require(
            int(keep.sum()) >= 3,
            f"{c.name}: fewer than 3 loss points after the first {skip_frac:.0%} of its tokens",
        )
        at = c.steps[keep] - 1
        out.append(_Prepared(eta, k, at, c.loss[keep], np.cumsum(k * eta)[at]))
    return out


def fit_loss_law(
    curves: Sequence[Curve],
    law: str = "multi-power",
    lam: float | Literal["rule", "fit"] = "rule",
    skip_frac: float = 0.05,
    ref_batch: float | None = None,
) -> LossLaw:
    """Fit ``law`` jointly on ``curves`` (each point one residual); see the module docstring.

    ``skip_frac``: points in the first fraction of each run's tokens are left out (the earliest losses sit
    on no power law). ``ref_batch`` defaults to the first curve's first batch, ``ref_lr`` is its peak LR.
    """
    require(law in LAWS, f"law={law!r}: choose one of {', '.join(LAWS)}")
    require(len(curves) > 0, "fit: give at least one curve")
    require(0.0 <= skip_frac < 1.0, f"skip_frac={skip_frac}: must be in [0, 1)")
    ref_lr = float(curves[0].schedule.lr.max())
    b0 = float(ref_batch if ref_batch is not None else curves[0].schedule.batch[0])
    require(ref_lr > 0, f"{curves[0].name}: its LR is 0 everywhere")
    prep = _prepare(curves, ref_lr, b0, skip_frac)
    names = tuple(c.name for c in curves)
    if law == "momentum":
        if lam == "fit":
            cands = [
                (1.0 - 1.0 / s, f"fitted on the fitting curves (grid 1/(1-lam) in {LAM_FIT_SPANS})")
                for s in LAM_FIT_SPANS
            ]
        elif lam == "rule":
            steps = float(np.mean([p.k.sum() for p in prep]))
            cands = [(lam_from_steps(steps), f"rule: 1/(1-lam) = {LAM_SPAN_FRAC:g} x {steps:.0f} steps")]
        else:
            require(
                isinstance(lam, (int, float)) and 0 <= lam < 1,
                f"lambda={lam!r}: give rule, fit or a value in [0, 1)",
            )
            cands = [(float(lam), "fixed by the user")]
        best = None
        for value, rule in cands:
            fit = _fit_momentum(prep, value)
            if best is None or fit[1] < best[1]:
                best = (fit[0], fit[1], value, rule)
        assert best is not None
        params, cost, lam_v, rule = best
    else:
        params, cost = _fit_multi_power(prep)
        lam_v, rule = None, ""
    result = LossLaw(law, params, ref_lr, b0, lam_v, rule, BATCH_EXPONENT, names, cost=cost)
    pred = np.concatenate([_predict(law, params, p.eta, p.k, p.at, lam_v) for p in prep])
    obs = np.concatenate([p.loss for p in prep])
    rel = pred / obs - 1.0
    return LossLaw(
        **{
            **result.__dict__,
            "rmse": float(np.sqrt(np.mean(np.log(pred / obs) ** 2))),
            "mape": float(np.mean(np.abs(rel))),
            "max_ape": float(np.max(np.abs(rel))),
            "n_points": int(obs.size),
        }
    )


def _solve(
    prep: list[_Prepared],
    names: tuple[str, ...],
    bounds: dict[str, tuple[float, float]],
    model: Callable[[dict[str, float]], np.ndarray],
    starts: list[dict[str, float]],
) -> tuple[dict[str, float], float]:
    """Bounded robust least squares of ``model`` (all fitted points, concatenated) from each start."""
    lo = np.array([bounds[n][0] for n in names])
    hi = np.array([bounds[n][1] for n in names])
    log_obs = np.log(np.concatenate([p.loss for p in prep]))

    def resid(x: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(model(dict(zip(names, x))), 1e-6)) - log_obs

    best: tuple[dict[str, float], float] | None = None
    for s in starts:
        x0 = np.clip(np.array([s[n] for n in names]), lo + 1e-12 * (hi - lo), hi - 1e-12 * (hi - lo))
        try:
            r = least_squares(
                resid,
                x0,
                bounds=(lo, hi),
                loss="huber",
                f_scale=HUBER_SCALE,
                max_nfev=400 * len(names),
                x_scale="jac",
            )
        except ValueError:
            continue
        if best is None or r.cost < best[1]:
            best = (dict(zip(names, map(float, r.x))), float(r.cost))
    require(best is not None, "loss-law fit failed from every start")
    assert best is not None
    return best


def _linear_start(prep: list[_Prepared], alpha: float, drop: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Non-negative least squares of L on [1, S1^-alpha, -drop] over every curve: (L0, A, C or B)."""
    X = np.vstack([np.column_stack([np.ones_like(p.s1), p.s1**-alpha, -d]) for p, d in zip(prep, drop)])
    y = np.concatenate([p.loss for p in prep])
    coef, res = nnls(X, y)
    return coef, float(res)


def _fit_momentum(prep: list[_Prepared], lam: float) -> tuple[dict[str, float], float]:
    s2s = [s1_s2(p.eta, lam, p.k)[1][p.at] for p in prep]
    s1 = np.concatenate([p.s1 for p in prep])
    s2 = np.concatenate(s2s)
    lmax = float(max(p.loss.max() for p in prep))
    grid = []
    for alpha in (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.5):
        coef, res = _linear_start(prep, alpha, s2s)
        grid.append((res, {"L0": min(coef[0], lmax * 0.999), "A": coef[1], "alpha": alpha, "C": coef[2]}))
    grid.sort(key=lambda g: g[0])
    bounds = {"L0": (0.0, lmax), "A": (0.0, 1e8), "alpha": (1e-3, 3.0), "C": (0.0, 1e3)}

    def model(p: dict[str, float]) -> np.ndarray:
        return p["L0"] + p["A"] * s1 ** -p["alpha"] - p["C"] * s2

    return _solve(prep, PARAMS["momentum"], bounds, model, [g[1] for g in grid[:4]])


def _fit_multi_power(prep: list[_Prepared]) -> tuple[dict[str, float], float]:
    lmax = float(max(p.loss.max() for p in prep))
    steps = float(np.mean([p.k.sum() for p in prep]))
    terms = [_drop_terms(p.eta, p.k, p.at) for p in prep]
    s1 = np.concatenate([p.s1 for p in prep])
    grid = []
    for alpha in (0.1, 0.3, 0.6, 1.0):
        for c in (0.1 / steps, 1.0 / steps, 10.0 / steps, 100.0 / steps):
            for beta in (0.3, 0.6, 1.2):
                for gamma in (0.2, 0.6):
                    drops = [_drop_value(t, c, beta, gamma) for t in terms]
                    coef, res = _linear_start(prep, alpha, drops)
                    start = {
                        "L0": min(coef[0], lmax * 0.999),
                        "A": coef[1],
                        "alpha": alpha,
                        "B": coef[2],
                        "C": c,
                        "beta": beta,
                        "gamma": gamma,
                    }
                    grid.append((res, start))
    grid.sort(key=lambda g: g[0])
    bounds = {
        "L0": (0.0, lmax),
        "A": (0.0, 1e8),
        "alpha": (1e-3, 3.0),
        "B": (0.0, 1e4),
        "C": (1e-9, 1e6),
        "beta": (1e-3, 5.0),
        "gamma": (0.0, 3.0),
    }

    def model(p: dict[str, float]) -> np.ndarray:
        ld = np.concatenate([_drop_value(t, p["C"], p["beta"], p["gamma"]) for t in terms])
        return p["L0"] + p["A"] * s1 ** -p["alpha"] - p["B"] * ld

    return _solve(prep, PARAMS["multi-power"], bounds, model, [g[1] for g in grid[:6]])


# -- evaluation and planning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """A prediction against a measured curve."""

    name: str
    mape: float  # mean |pred/obs - 1|
    max_ape: float
    final_error: float  # pred/obs - 1 at the last point
    final_pred: float
    final_obs: float


def compare(fit: LossLaw, curve: Curve) -> Comparison:
    pred = fit.predict(curve)
    rel = pred / curve.loss - 1.0
    return Comparison(
        curve.name,
        float(np.mean(np.abs(rel))),
        float(np.max(np.abs(rel))),
        float(rel[-1]),
        float(pred[-1]),
        float(curve.loss[-1]),
    )


@dataclass(frozen=True)
class DecayChoice:
    """One WSD candidate: decay start (fraction of the run), shape, predicted final loss."""

    start_frac: float
    shape: str
    final_loss: float


def choose_decay(
    fit: LossLaw,
    make: Callable[[float, str], StepSchedule],
    start_fracs: Sequence[float],
    shapes: Sequence[str],
) -> list[DecayChoice]:
    """Predicted final loss of every (start, shape) WSD candidate built by ``make``; best first."""
    out = [
        DecayChoice(f, s, float(fit.predict_steps(sched, [sched.steps])[0]))
        for f in start_fracs
        for s in shapes
        for sched in [make(f, s)]
    ]
    return sorted(out, key=lambda c: c.final_loss)
