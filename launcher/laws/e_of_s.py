"""Data E against steps S to reach a target loss, B_min and B_opt (arXiv 2601.05034; papers.md section 1).

From K >= 6 runs that differ only in their constant global batch ``B_k`` (tokens per step), for each target
loss ``l``: ``E_k(l)`` the tokens at which run k first reaches ``l`` and ``S_k = E_k / B_k`` its steps. The
paper's revised E(S) for the WSD stable phase (papers.md 1.2) is piecewise::

            B_-1 / (S - S_min) + B_0        S_min < S < S_1     (inverse)
    E(S) =  C (S - S_opt)**2 + E_min        S_1 < S < S_2       (quadratic)
            A_1 S + A_0                     S > S_2             (linear)

with ``B_min = A_1`` (the slope of the linear stage: no smaller batch reaches ``l``) and
``B_opt = E_min / S_opt`` (the batch that reaches ``l`` on the fewest tokens).

How the paper fits the breakpoints is not known (papers.md: [NF]). Our choice, fixed here: E(S) is
continuous with a continuous slope at ``S_1`` and ``S_2``, which fixes ``B_-1, B_0, A_1, A_0`` from the
other six, ``S_min < S_1 < S_opt < S_2``, ``C > 0``, ``E_min > 0``::

    A_1  = 2 C (S_2 - S_opt)                 A_0 = C (S_2 - S_opt)**2 + E_min - A_1 S_2
    B_-1 = 2 C (S_opt - S_1) (S_1 - S_min)**2    B_0 = C (S_1 - S_opt)**2 + E_min - B_-1 / (S_1 - S_min)

The six are fitted by least squares on ``ln E`` (:func:`fit_e_of_s`), multi-start, unconstrained in a
log parameterisation that keeps the order. With six runs the fit interpolates; more runs give residuals.

Reading ``E_k(l)``: each run's loss curve is first smoothed by ``L(D) = L0 + A D**-gamma``
(``lr_law.fit_loss_curve``, robust and bounded; papers.md 1.4 step 2) on the points from ``min_frac`` of
the run on, and ``E_k`` solves ``L(E) = l`` inside the measured range (no extrapolation); ``smooth=False``
interpolates the running minimum of the raw curve instead.

The scheduler's curve (``batch_schedule.kind=bopt``): ``B_opt(D) = coef * D**exponent`` with ``D`` the
tokens ``E_min(l)`` at which the optimal batch reaches ``l`` and ``B`` in sequences, fitted in log-log
(:func:`fit_bopt_curve`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from launcher.errors import require
from launcher.laws.lr_law import fit_loss_curve

#: Runs needed per target: the form has six free parameters.
MIN_POINTS = 6
#: A fit whose E_min is below this fraction of the fewest tokens measured has dived between the points.
MIN_E_RATIO = 0.5


@dataclass(frozen=True)
class BatchRun:
    """A constant-batch run: ``loss[j]`` after ``tokens[j]`` tokens, ``batch`` sequences of ``seq_length``."""

    name: str
    batch: int
    seq_length: int
    tokens: np.ndarray
    loss: np.ndarray

    @property
    def batch_tokens(self) -> int:
        return self.batch * self.seq_length


def tokens_to_reach(
    run: BatchRun, targets: Sequence[float], min_frac: float = 0.1, smooth: bool = True
) -> np.ndarray:
    """``E`` (tokens) at which ``run`` first reaches each target; NaN where it does not within its tokens."""
    t = np.asarray(run.tokens, dtype=float)
    y = np.asarray(run.loss, dtype=float)
    require(t.size == y.size and t.size >= 3, f"{run.name}: need at least 3 loss points")
    keep = t >= min_frac * t.max()
    out = np.full(len(targets), np.nan)
    if smooth:
        fit = fit_loss_curve(t[keep], y[keep], run.name)
        lo, hi = float(t[keep].min()), float(t.max())
        for i, target in enumerate(targets):
            if target > fit.L0 and fit.A > 0:
                e = (fit.A / (target - fit.L0)) ** (1.0 / fit.gamma)
                if lo <= e <= hi:
                    out[i] = e
        return out
    env = np.minimum.accumulate(y)
    for i, target in enumerate(targets):
        hit = np.nonzero(env <= target)[0]
        if hit.size == 0 or hit[0] == 0:
            continue
        j = hit[0]
        # linear between the last point above and the first at or below the target
        f = (env[j - 1] - target) / (env[j - 1] - env[j]) if env[j - 1] > env[j] else 1.0
        out[i] = t[j - 1] + f * (t[j] - t[j - 1])
    return out


@dataclass(frozen=True)
class EofS:
    """The fitted piecewise E(S) of one target loss (module docstring)."""

    S_min: float
    S_1: float
    S_opt: float
    S_2: float
    C: float
    E_min: float
    rmse_log: float = float("nan")
    n: int = 0

    @property
    def A_1(self) -> float:
        return 2.0 * self.C * (self.S_2 - self.S_opt)

    @property
    def A_0(self) -> float:
        return self.C * (self.S_2 - self.S_opt) ** 2 + self.E_min - self.A_1 * self.S_2

    @property
    def B_m1(self) -> float:
        return 2.0 * self.C * (self.S_opt - self.S_1) * (self.S_1 - self.S_min) ** 2

    @property
    def B_0(self) -> float:
        # B_m1 / (S_1 - S_min) without the division: finite where S_1 and S_min coincide in floating point
        return (
            self.C * (self.S_1 - self.S_opt) ** 2
            + self.E_min
            - 2.0 * self.C * (self.S_opt - self.S_1) * (self.S_1 - self.S_min)
        )

    @property
    def b_min(self) -> float:
        """Tokens per step: the slope of the linear stage."""
        return self.A_1

    @property
    def b_opt(self) -> float:
        """Tokens per step: E_min / S_opt."""
        return self.E_min / self.S_opt

    def E(self, S: float | np.ndarray) -> np.ndarray:
        s = np.asarray(S, dtype=float)
        inv = self.B_m1 / np.maximum(s - self.S_min, 1e-300) + self.B_0
        quad = self.C * (s - self.S_opt) ** 2 + self.E_min
        lin = self.A_1 * s + self.A_0
        out = np.where(s < self.S_1, inv, np.where(s <= self.S_2, quad, lin))
        return np.where(s > self.S_min, out, np.inf)

    def to_dict(self) -> dict[str, float]:
        d = dict(self.__dict__)
        d.update(A_1=self.A_1, A_0=self.A_0, B_m1=self.B_m1, B_0=self.B_0, b_min=self.b_min, b_opt=self.b_opt)
        return d


def _unpack(x: np.ndarray) -> EofS:
    s_min = math.exp(x[0])
    s1 = s_min + math.exp(x[1])
    s_opt = s1 + math.exp(x[2])
    s2 = s_opt + math.exp(x[3])
    return EofS(s_min, s1, s_opt, s2, math.exp(x[4]), math.exp(x[5]))


def fit_e_of_s(S: Sequence[float], E: Sequence[float]) -> EofS:
    """Least squares on ln E over the six free parameters, from a grid of starts; the best."""
    s = np.asarray(S, dtype=float)
    e = np.asarray(E, dtype=float)
    ok = np.isfinite(s) & np.isfinite(e) & (s > 0) & (e > 0)
    s, e = s[ok], e[ok]
    require(s.size >= MIN_POINTS, f"E(S) fit: need at least {MIN_POINTS} (S, E) points, got {s.size}")
    order = np.argsort(s)
    s, e = s[order], e[order]
    i_min = int(np.argmin(e))
    s_lo, s_hi, s_at = float(s[0]), float(s[-1]), float(s[i_min])

    def resid(x: np.ndarray) -> np.ndarray:
        try:
            with np.errstate(all="ignore"):
                pred = _unpack(x).E(s)
        except OverflowError:  # a trial step far out of range (exp of a huge log-parameter)
            return np.full(s.size, 50.0)
        r = np.log(np.where(np.isfinite(pred) & (pred > 0), pred, 1e300)) - np.log(e)
        return np.clip(r, -50, 50)

    best = None
    for f_min in (0.3, 0.6, 0.9):
        for f_opt in (0.5, 1.0, 2.0):
            for f_2 in (1.2, 2.0, 4.0):
                s_min = f_min * s_lo
                s_opt = max(f_opt * s_at, s_min * 1.05)
                s1 = 0.5 * (s_min + s_opt)
                s2 = f_2 * s_opt
                curv = max(float(e.max() - e.min()), 1e-9 * e.min()) / max((s_hi - s_opt) ** 2, 1e-12)
                x0 = np.log([s_min, s1 - s_min, s_opt - s1, s2 - s_opt, curv, float(e.min())])
                try:
                    r = least_squares(resid, x0, max_nfev=3000)
                except ValueError:
                    continue
                if best is None or r.cost < best.cost:
                    best = r
    require(best is not None, "E(S) fit failed from every start")
    fit = _unpack(best.x)
    return EofS(**{**fit.__dict__, "rmse_log": float(np.sqrt(np.mean(best.fun**2))), "n": int(s.size)})


def unsupported(fit: EofS, S: Sequence[float], E: Sequence[float]) -> str:
    """Why the data do not pin ``fit``'s minimum down ("" when they do): ``S_opt`` outside the measured
    steps, or ``E_min`` below ``MIN_E_RATIO`` x the fewest tokens measured. Six parameters through six
    points can dive between them (this benchmark's first run: E_min = 0.015 tokens at two targets)."""
    s_lo, s_hi, e_lo = float(min(S)), float(max(S)), float(min(E))
    if not s_lo <= fit.S_opt <= s_hi:
        return f"degenerate fit: S_opt {fit.S_opt:.4g} outside the measured steps [{s_lo:.4g}, {s_hi:.4g}]"
    if fit.E_min < MIN_E_RATIO * e_lo:
        return f"degenerate fit: E_min {fit.E_min:.4g} far below the fewest tokens measured ({e_lo:.4g})"
    return ""


@dataclass(frozen=True)
class TargetResult:
    """Per target loss: the (S, E) points of the runs that reach it and the fit (None with too few points
    or a degenerate fit, see ``note``)."""

    target: float
    runs: tuple[str, ...]
    S: tuple[float, ...]
    E: tuple[float, ...]
    fit: EofS | None
    note: str = ""

    @property
    def b_opt(self) -> float | None:
        """Tokens per step, where fitted."""
        return None if self.fit is None else self.fit.b_opt

    @property
    def b_min(self) -> float | None:
        """Tokens per step, where the linear stage reaches into the data (``S_2`` below the most steps
        measured); beyond them its slope is an extrapolation the points do not constrain."""
        return None if self.fit is None or max(self.S) <= self.fit.S_2 else self.fit.b_min


def analyse(
    runs: Sequence[BatchRun], targets: Sequence[float], min_frac: float = 0.1, smooth: bool = True
) -> list[TargetResult]:
    """E and S per run and target, and the E(S) fit of every target that at least ``MIN_POINTS`` reach."""
    require(len(runs) >= MIN_POINTS, f"E(S): give at least {MIN_POINTS} constant-batch runs, got {len(runs)}")
    batches = [r.batch_tokens for r in runs]
    require(len(set(batches)) == len(batches), "E(S): the runs must differ in their batch size")
    reach = np.array([tokens_to_reach(r, targets, min_frac, smooth) for r in runs])  # (runs, targets)
    out = []
    for j, target in enumerate(targets):
        ok = np.isfinite(reach[:, j])
        names = tuple(r.name for r, o in zip(runs, ok) if o)
        E = reach[ok, j]
        S = E / np.array([b for b, o in zip(batches, ok) if o], dtype=float)
        fit, note = None, ""
        if ok.sum() >= MIN_POINTS:
            fit = fit_e_of_s(S, E)
            note = unsupported(fit, S, E)
            fit = None if note else fit
        else:
            note = f"only {int(ok.sum())} of {len(runs)} runs reach it (need {MIN_POINTS})"
        out.append(TargetResult(float(target), names, tuple(S.tolist()), tuple(E.tolist()), fit, note))
    return out


@dataclass(frozen=True)
class BoptCurve:
    """``B_opt(D) = coef * D**exponent``: D tokens, B sequences (``batch_schedule.kind=bopt``)."""

    coef: float
    exponent: float
    r2: float
    n: int
    points: tuple[tuple[float, float], ...] = field(default=())

    def recipe_keys(self) -> list[str]:
        return [
            f"batch_schedule.bopt_coef={self.coef:.6g}",
            f"batch_schedule.bopt_exponent={self.exponent:.6g}",
        ]

    def predict(self, D: float | np.ndarray) -> np.ndarray:
        return self.coef * np.asarray(D, dtype=float) ** self.exponent

    def to_dict(self) -> dict[str, Any]:
        return {
            "coef": self.coef,
            "exponent": self.exponent,
            "r2": self.r2,
            "n": self.n,
            "points": self.points,
        }


def fit_bopt_curve(D: Sequence[float], B: Sequence[float]) -> BoptCurve:
    """Least squares of ln B on ln D (at least two distinct D)."""
    d = np.asarray(D, dtype=float)
    b = np.asarray(B, dtype=float)
    ok = np.isfinite(d) & np.isfinite(b) & (d > 0) & (b > 0)
    d, b = d[ok], b[ok]
    require(np.unique(d).size >= 2, "B_opt(D) fit: need B_opt at two or more token counts (more targets)")
    x, y = np.log(d), np.log(b)
    slope, icpt = np.polyfit(x, y, 1)
    res = y - (icpt + slope * x)
    tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(res**2)) / tot if tot > 0 else float("nan")
    return BoptCurve(float(math.exp(icpt)), float(slope), r2, int(d.size), tuple(zip(d.tolist(), b.tolist())))


def bopt_curve(results: Sequence[TargetResult], seq_length: int) -> BoptCurve:
    """The scheduler's curve from the fitted targets: D = E_min, B = B_opt / seq_length (sequences)."""
    fits = [r.fit for r in results if r.fit is not None]
    return fit_bopt_curve([f.E_min for f in fits], [f.b_opt / seq_length for f in fits])
