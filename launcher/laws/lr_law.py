"""The optimal-LR law of arXiv 2601.05049 ("How to Set the Learning Rate for Large-Scale Pre-training?").

The paper's fitting paradigm (/work/shared/research/papers.md section 3.2), three fits:

1. per (N, lr) run, the loss against training tokens is a power law (paper Eq. 4):
   ``L(D) = L0 + A D^-gamma`` (:func:`fit_loss_curve`: robust soft-L1 least squares, bounded
   ``0 <= L0 <= min L``, ``A >= 0``, ``gamma`` in ``GAMMA_BOUNDS``, started from a grid of ``gamma`` with the
   linear parameters solved exactly at each, so no single start decides the result; R^2 and RMSE
   reported). Each run is then extrapolated to the target budgets D, so one sweep of LRs per N gives
   optima at several D without a decayed run per D.
2. per (N, D), the loss against the LR is a parabola in log LR (paper Eq. 2):
   ``L(lr) = L_min + C (ln lr - x*)^2``, so ``lr* = exp(x*)`` (:func:`fit_lr_curve`). We use the natural
   log; C depends on the base of the log, x* does not once exponentiated.
3. across (N, D), ``ln lr* = ln c + a ln N + b ln D`` (paper Eq. 6), least squares (:func:`fit_power_law`),
   with R^2 and a hold-out check: refit without the largest N and predict its optima.

Under WSD the losses measured along a run before the decay are *stable-phase* losses (peak LR); only the
final one, after the decay, is the loss the law is about. The paper does not say how it reads L at
intermediate D ([NF] in the digest). Here the power law is fitted to the stable-phase points and the run's
decay gain (its stable-phase fit at the final tokens minus its final, decayed, loss) is subtracted at
every target D: :meth:`DataFit.predict_decayed`. This assumes the gain of the decay does not depend on
the budget, which one decayed point per run cannot test; decayed branches at several D would.

``PAPER_LAW`` is the paper's published fit. It is a prior, not a transferable default: the constants
belong to the authors' MoE, initialisation, optimizer and WSD setup, and the units are not confirmed
(papers.md marks them [NF]). We read N as a parameter count and D as training tokens, which are the only
readings that give plausible LRs (1.3e9 active, 5e11 tokens -> 2.9e-5). Whether N counts total or active
MoE parameters, and whether embeddings count, is unknown; ramp's default is active non-embedding
parameters (the per-token compute that sets the update scale, and Kaplan's non-embedding convention),
and every fit records which count it used. The LR the law speaks of is the LR of the hidden matrices
(under the paper's standard parameterisation every group has it). Fit your own sweep before trusting a
prediction.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from launcher.errors import RampError, require

if TYPE_CHECKING:
    from launcher.recipe import ModelConfig

N_KINDS = ("active", "total")


@dataclass(frozen=True)
class CurveFit:
    """L(lr) = L_min + C (ln lr - x*)^2 at one (N, D)."""

    N: float
    D: float
    L_min: float
    C: float
    x_star: float  # natural log of the optimal LR
    r2: float
    rmse: float
    n: int
    lr_lo: float
    lr_hi: float

    @property
    def lr_star(self) -> float:
        return math.exp(self.x_star)

    @property
    def bracketed(self) -> bool:
        """False when the optimum lies outside the swept LRs (an extrapolation: sweep wider)."""
        return self.lr_lo <= self.lr_star <= self.lr_hi

    def predict(self, lr: float | np.ndarray) -> float | np.ndarray:
        return self.L_min + self.C * (np.log(lr) - self.x_star) ** 2


@dataclass(frozen=True)
class PowerLaw:
    """lr*(N, D) = c N^a D^b."""

    c: float
    a: float
    b: float
    r2: float = float("nan")  # on ln lr*
    rmse_log: float = float("nan")  # RMS of ln(lr*) residuals; exp(rmse_log) - 1 ~ typical relative error
    n: int = 0
    residuals: tuple[float, ...] = ()  # ln(observed / predicted), one per (N, D)
    n_kind: str = "active"  # which parameter count N is
    source: str = "fit"
    note: str = ""
    fixed: tuple[str, ...] = field(default=())  # exponents held fixed in the fit

    def predict(self, N: float | np.ndarray, D: float | np.ndarray) -> float | np.ndarray:
        return self.c * np.power(N, self.a) * np.power(D, self.b)

    def formula(self) -> str:
        return f"lr*(N, D) = {self.c:.6g} * N^{self.a:.4f} * D^{self.b:.4f}"

    def describe(self) -> str:
        """The law with its fit quality, one line."""
        q = f"R^2={self.r2:.4f}" if math.isfinite(self.r2) else "R^2 n/a"
        if math.isfinite(self.rmse_log):
            q += f", RMS log-residual {self.rmse_log:.3f} (~{math.expm1(self.rmse_log) * 100:.1f}%)"
        fixed = f", fixed {', '.join(self.fixed)}" if self.fixed else ""
        n = f"; n={self.n}" if self.n else ""
        return f"{self.formula()}  [{self.source}; {q}{n}; N={self.n_kind}{fixed}]"

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["residuals"] = list(self.residuals)
        d["fixed"] = list(self.fixed)
        return d


#: arXiv 2601.05049 Eq. 6 (R^2 = 0.9622 in the paper). Units unconfirmed; see the module docstring.
PAPER_LAW = PowerLaw(
    c=38.4588,
    a=-0.2219,
    b=-0.3509,
    r2=0.9622,
    n_kind="unconfirmed (read as a parameter count)",
    source="arXiv 2601.05049 Eq. 6",
    note=(
        "published prior for the authors' MoE/WSD setup; N assumed a parameter count (total vs active and "
        "embeddings unconfirmed), D tokens; use for orientation, fit your own sweep"
    ),
)


def fit_lr_curve(
    lr: Sequence[float], loss: Sequence[float], N: float = float("nan"), D: float = float("nan")
) -> CurveFit:
    """Fit the log-LR parabola at one (N, D). Non-finite losses (diverged runs) are dropped."""
    x_all = np.asarray(lr, dtype=float)
    y_all = np.asarray(loss, dtype=float)
    require(x_all.shape == y_all.shape, "lr and loss must have the same length")
    require(bool(np.all(x_all > 0)), f"N={N:g}, D={D:g}: learning rates must be > 0")
    keep = np.isfinite(y_all)
    x, y = np.log(x_all[keep]), y_all[keep]
    require(
        len(np.unique(x)) >= 3,
        f"N={N:g}, D={D:g}: need at least 3 distinct LRs with a finite loss to fit the parabola "
        f"(got {len(np.unique(x))})",
    )
    xm = float(x.mean())
    c2, c1, c0 = np.polyfit(x - xm, y, 2)
    require(
        c2 > 0,
        f"N={N:g}, D={D:g}: loss vs log-LR is not convex (curvature {c2:.3g}); the sweep does not bracket an "
        f"optimum, add LRs on both sides",
    )
    u_star = -c1 / (2.0 * c2)
    fitted = np.polyval([c2, c1, c0], x - xm)
    ss_res = float(np.sum((y - fitted) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return CurveFit(
        N=float(N),
        D=float(D),
        L_min=float(c0 - c1 * c1 / (4.0 * c2)),
        C=float(c2),
        x_star=float(xm + u_star),
        r2=1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        rmse=math.sqrt(ss_res / len(y)),
        n=len(y),
        lr_lo=float(np.exp(x.min())),
        lr_hi=float(np.exp(x.max())),
    )


def fit_power_law(
    N: Sequence[float],
    D: Sequence[float],
    lr_star: Sequence[float],
    fix_a: float | None = None,
    fix_b: float | None = None,
    n_kind: str = "active",
) -> PowerLaw:
    """Least squares of ln lr* = ln c + a ln N + b ln D; an exponent can be held fixed (one N or one D)."""
    n_arr, d_arr, y_arr = (np.asarray(v, dtype=float) for v in (N, D, lr_star))
    require(n_arr.shape == d_arr.shape == y_arr.shape, "N, D and lr* must have the same length")
    require(
        bool(np.all(n_arr > 0) and np.all(d_arr > 0) and np.all(y_arr > 0)),
        "N, D and lr* must all be > 0",
    )
    ln_n, ln_d, y = np.log(n_arr), np.log(d_arr), np.log(y_arr)
    target = y.copy()
    cols: list[np.ndarray] = [np.ones_like(y)]
    names = ["c"]
    if fix_a is None:
        require(
            len(np.unique(n_arr)) >= 2,
            "every sweep point has the same N: the N exponent cannot be fitted; hold it fixed (--fix-a)",
        )
        cols.append(ln_n)
        names.append("a")
    else:
        target -= fix_a * ln_n
    if fix_b is None:
        require(
            len(np.unique(d_arr)) >= 2,
            "every sweep point has the same D: the D exponent cannot be fitted; hold it fixed (--fix-b)",
        )
        cols.append(ln_d)
        names.append("b")
    else:
        target -= fix_b * ln_d
    X = np.stack(cols, axis=1)
    require(
        len(y) >= X.shape[1],
        f"{len(y)} (N, D) optima cannot determine {X.shape[1]} parameters ({', '.join(names)}); "
        "sweep more sizes",
    )
    require(
        np.linalg.matrix_rank(X) == X.shape[1],
        "ln N and ln D are collinear in the sweep (N and D grow together): vary them independently",
    )
    coef, *_ = np.linalg.lstsq(X, target, rcond=None)
    fitted = dict(zip(names, coef))
    a = fitted.get("a", fix_a)
    b = fitted.get("b", fix_b)
    pred = fitted["c"] + a * ln_n + b * ln_d
    resid = y - pred
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return PowerLaw(
        c=float(math.exp(fitted["c"])),
        a=float(a),
        b=float(b),
        r2=1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else float("nan"),
        rmse_log=float(math.sqrt(np.mean(resid**2))),
        n=len(y),
        residuals=tuple(float(r) for r in resid),
        n_kind=n_kind,
        source="fit",
        note="" if len(y) > X.shape[1] else "as many points as parameters: an exact fit, R^2 says nothing",
        fixed=tuple(k for k, v in (("a", fix_a), ("b", fix_b)) if v is not None),
    )


#: Bounds of the data exponent gamma in L(D) = L0 + A D^-gamma (language-model losses fall like D^-0.05 to
#: D^-1; Chinchilla's is 0.28) and the grid of starts of the multi-start fit.
GAMMA_BOUNDS = (0.01, 3.0)
GAMMA_STARTS = (0.03, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.2)


@dataclass(frozen=True)
class DataFit:
    """L(D) = L0 + A D^-gamma for one (N, lr) run (D in tokens), fitted on its stable-phase losses."""

    L0: float
    A: float
    gamma: float
    r2: float
    rmse: float
    n: int
    d_lo: float
    d_hi: float
    decay_gain: float = 0.0  # the stable-phase fit at the run's final tokens minus its final decayed loss
    note: str = ""

    def predict(self, D: float | np.ndarray) -> float | np.ndarray:
        """The stable-phase loss after D tokens."""
        return self.L0 + self.A * np.power(np.asarray(D, dtype=float), -self.gamma)

    def predict_decayed(self, D: float | np.ndarray) -> float | np.ndarray:
        """The loss after a decay ending at D tokens, taking the run's decay gain as independent of D."""
        return self.predict(D) - self.decay_gain


def fit_loss_curve(tokens: Sequence[float], loss: Sequence[float], label: str = "") -> DataFit:
    """Fit L(D) = L0 + A D^-gamma to one run's (tokens, loss) points; non-finite losses are dropped.

    Bounded (``0 <= L0 <= min loss``, ``A >= 0``, ``gamma`` in ``GAMMA_BOUNDS``), robust (soft-L1 loss with
    a scale from the median absolute residual of the best start, so one bad evaluation does not bend the
    curve) and multi-start: at every ``gamma`` of ``GAMMA_STARTS`` the linear parameters are solved
    exactly, and each of those starts is refined; the lowest robust cost wins.
    """
    from scipy.optimize import least_squares

    where = f"{label}: " if label else ""
    d_all = np.asarray(tokens, dtype=float)
    y_all = np.asarray(loss, dtype=float)
    require(d_all.shape == y_all.shape, f"{where}tokens and losses must have the same length")
    keep = np.isfinite(y_all) & np.isfinite(d_all)
    d, y = d_all[keep], y_all[keep]
    require(bool(np.all(d > 0)), f"{where}token counts must be > 0")
    require(
        len(np.unique(d)) >= 3,
        f"{where}need at least 3 token counts with a finite loss to fit L(D) = L0 + A D^-gamma "
        f"(got {len(np.unique(d))})",
    )
    d_ref = float(d.max())
    u = d / d_ref  # fit A_ref = A d_ref^-gamma: every parameter of order one
    y_min = float(y.min())
    lo = np.array([0.0, 0.0, GAMMA_BOUNDS[0]])
    hi = np.array([y_min, max(10.0 * float(y.max()), 1.0), GAMMA_BOUNDS[1]])

    def resid(p: np.ndarray) -> np.ndarray:
        return p[0] + p[1] * u ** -p[2] - y

    def jac(p: np.ndarray) -> np.ndarray:
        up = u ** -p[2]
        return np.stack([np.ones_like(u), up, -p[1] * up * np.log(u)], axis=1)

    starts = []
    for g in GAMMA_STARTS:
        basis = u**-g
        (l0, a), *_ = np.linalg.lstsq(np.stack([np.ones_like(u), basis], axis=1), y, rcond=None)
        p0 = np.clip([l0, a, g], lo, hi)
        starts.append((float(np.sum(resid(p0) ** 2)), p0))
    starts.sort(key=lambda s: s[0])

    def robust_scale(p: np.ndarray) -> float:  # the noise level of the points, from the median residual
        return max(1.4826 * float(np.median(np.abs(resid(p)))), 1e-4)

    scale = robust_scale(starts[0][1])
    best = None
    for _, p0 in starts:
        p0 = np.clip(p0, lo + 1e-12 * (hi - lo), hi - 1e-12 * (hi - lo))
        r = least_squares(resid, p0, jac=jac, bounds=(lo, hi), loss="soft_l1", f_scale=scale)
        if best is None or r.cost < best.cost:
            best = r
    # Second pass at the noise level of the robust fit (the first scale still carried any outlier).
    scale = robust_scale(best.x)
    best = least_squares(resid, best.x, jac=jac, bounds=(lo, hi), loss="soft_l1", f_scale=scale)
    l0, a_ref, gamma = (float(v) for v in best.x)
    res = resid(best.x)
    outliers = int(np.sum(np.abs(res) > 4.0 * scale)) if len(y) > 3 else 0
    ss_res = float(np.sum(res**2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    notes = []
    if len(y) == 3:
        notes.append("3 points for 3 parameters: an exact fit, R^2 says nothing")
    if outliers:
        notes.append(f"{outliers} point(s) more than 4x the noise level off the curve (down-weighted)")
    if a_ref <= 1e-9 * max(abs(y_min), 1.0):
        notes.append("the loss does not fall with D here")
    for name, v, (b_lo, b_hi) in (("gamma", gamma, GAMMA_BOUNDS), ("L0", l0, (0.0, y_min))):
        if min(abs(v - b_lo), abs(v - b_hi)) <= 1e-6 * max(abs(b_hi), 1.0):
            notes.append(f"{name} at its bound: extrapolation is unreliable")
    return DataFit(
        L0=l0,
        A=a_ref * d_ref**gamma,
        gamma=gamma,
        r2=1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        rmse=math.sqrt(ss_res / len(y)),
        n=len(y),
        d_lo=float(d.min()),
        d_hi=d_ref,
        note="; ".join(notes),
    )


@dataclass(frozen=True)
class SweepPoint:
    """One loss at (N, D, lr): a run's final loss, or a run's L(D) fit extrapolated to D."""

    N: float
    D: float
    lr: float
    loss: float


@dataclass(frozen=True)
class SweepRun:
    """One run of an LR sweep at size N: its final (decayed) loss and its stable-phase losses."""

    N: float
    lr: float
    tokens: float  # at the end of the run
    final_loss: float  # after the decay; NaN when the run diverged
    stable: tuple[tuple[float, float], ...] = ()  # (tokens, loss) measured before the decay
    name: str = ""


@dataclass(frozen=True)
class RunFit:
    """What one run contributed: its L(D) fit (None when it had too few stable points) and its losses."""

    run: SweepRun
    fit: DataFit | None
    losses: dict[float, float]  # D -> decayed loss, measured (D = the run's tokens) or extrapolated
    note: str = ""


def extrapolate_run(run: SweepRun, targets: Sequence[float], min_frac: float = 0.1) -> RunFit:
    """The run's decayed loss at every target D, from L(D) fitted to its stable-phase points.

    Stable points before ``min_frac`` of the run's tokens (warmup, the fast initial drop) are left out.
    With fewer than 3 usable points, or a diverged run, the run gives its final loss at its own tokens
    only (NaN when diverged: the LR fit drops it).
    """
    if not math.isfinite(run.final_loss):
        return RunFit(run, None, {float(D): math.nan for D in targets}, "diverged")
    pts = [(t, lo) for t, lo in run.stable if min_frac * run.tokens <= t < run.tokens and math.isfinite(lo)]
    if len({t for t, _ in pts}) < 3:
        note = f"{len(pts)} usable stable-phase points (3 needed): final loss only, at its own D"
        return RunFit(run, None, {float(run.tokens): run.final_loss}, note)
    fit = fit_loss_curve([t for t, _ in pts], [lo for _, lo in pts], label=run.name)
    fit = dataclasses.replace(fit, decay_gain=float(fit.predict(run.tokens)) - run.final_loss)
    losses = {float(D): float(fit.predict_decayed(D)) for D in targets}
    return RunFit(run, fit, losses, fit.note)


@dataclass(frozen=True)
class HoldOut:
    """The law refitted without the largest N, and how well it predicts that N's optima."""

    N: float
    law: PowerLaw
    residuals: tuple[float, ...]  # ln(observed lr* / predicted), one per D at the held-out N
    D: tuple[float, ...]

    @property
    def max_abs(self) -> float:
        return max(abs(r) for r in self.residuals)


@dataclass(frozen=True)
class SweepFit:
    """The whole fit: per-(N, D) parabolas, the law through their optima, the hold-out check."""

    curves: tuple[CurveFit, ...]
    law: PowerLaw
    skipped: tuple[str, ...] = ()  # (N, D) with no optimum, and why
    holdout: HoldOut | None = None
    holdout_note: str = ""
    runs: tuple[RunFit, ...] = ()  # per-run L(D) fits when the sweep came as runs


def near_minimum(lr: Sequence[float], loss: Sequence[float], neighbours: int) -> list[int]:
    """Indices of the points at the best LR and at up to ``neighbours`` LRs each side (finite only).

    The parabola is a local model of the loss near its minimum; far runs (near divergence, or barely
    trained) bend it. Repeated LRs (seeds) count once, by their mean loss; all their points are kept.
    """
    by_lr: dict[float, list[int]] = {}
    for i, (x, y) in enumerate(zip(lr, loss)):
        if math.isfinite(y):
            by_lr.setdefault(float(x), []).append(i)
    xs = sorted(by_lr)
    if not xs:
        return []
    mean = [float(np.mean([loss[i] for i in by_lr[x]])) for x in xs]
    k = int(np.argmin(mean))
    lo, hi = max(0, k - neighbours), min(len(xs), k + neighbours + 1)
    while hi - lo < min(3, len(xs)):  # best LR at an end of the grid: take 3 LRs there
        lo, hi = (lo, hi + 1) if lo == 0 else (lo - 1, hi)
    return sorted(i for x in xs[lo:hi] for i in by_lr[x])


def fit_sweep(
    points: Iterable[SweepPoint],
    fix_a: float | None = None,
    fix_b: float | None = None,
    n_kind: str = "active",
    neighbours: int | None = None,
) -> SweepFit:
    """Group the sweep by (N, D), fit one parabola each, then the power law through their optima.

    ``neighbours``: fit each parabola to the best LR and that many LRs each side (None: every LR). A
    group with no optimum (too few LRs, not convex) is skipped with its reason. The hold-out check refits
    without the largest N (needs 3 sizes, or 2 with ``fix_a``) and predicts that N's optima.
    """
    groups: dict[tuple[float, float], list[SweepPoint]] = {}
    for p in points:
        groups.setdefault((float(p.N), float(p.D)), []).append(p)
    require(bool(groups), "the sweep is empty")
    curves: list[CurveFit] = []
    skipped: list[str] = []
    for (n, d), pts in sorted(groups.items()):
        lrs, losses = [p.lr for p in pts], [p.loss for p in pts]
        if neighbours is not None:
            keep = near_minimum(lrs, losses, neighbours)
            lrs, losses = [lrs[i] for i in keep], [losses[i] for i in keep]
        try:
            curves.append(fit_lr_curve(lrs, losses, N=n, D=d))
        except RampError as e:
            skipped.append(str(e))
    require(bool(curves), f"no (N, D) of the sweep has a fitted optimum: {'; '.join(skipped)}")
    law = fit_power_law(
        [c.N for c in curves], [c.D for c in curves], [c.lr_star for c in curves], fix_a, fix_b, n_kind
    )
    holdout, why = _hold_out(curves, fix_a, fix_b, n_kind)
    return SweepFit(tuple(curves), law, tuple(skipped), holdout, why)


def fit_sweep_runs(
    runs: Iterable[SweepRun],
    targets: Sequence[float],
    min_frac: float = 0.1,
    fix_a: float | None = None,
    fix_b: float | None = None,
    n_kind: str = "active",
    neighbours: int | None = None,
) -> SweepFit:
    """The paper's method from runs: L(D) per run, extrapolated to ``targets``, then :func:`fit_sweep`."""
    fits = [extrapolate_run(r, targets, min_frac) for r in runs]
    require(bool(fits), "the sweep has no runs")
    points = [SweepPoint(f.run.N, d, f.run.lr, loss) for f in fits for d, loss in f.losses.items()]
    out = fit_sweep(points, fix_a, fix_b, n_kind, neighbours)
    return dataclasses.replace(out, runs=tuple(fits))


def _hold_out(
    curves: list[CurveFit], fix_a: float | None, fix_b: float | None, n_kind: str
) -> tuple[HoldOut | None, str]:
    sizes = sorted({c.N for c in curves})
    need = 2 if fix_a is not None else 3
    if len(sizes) < need:
        return None, f"no hold-out check: {len(sizes)} size(s), it needs {need}"
    rest = [c for c in curves if sizes[-1] > c.N]
    held = [c for c in curves if sizes[-1] == c.N]
    try:
        law = fit_power_law(
            [c.N for c in rest], [c.D for c in rest], [c.lr_star for c in rest], fix_a, fix_b, n_kind
        )
    except RampError as e:
        return None, f"no hold-out check: {e}"
    resid = tuple(float(math.log(c.lr_star / law.predict(c.N, c.D))) for c in held)
    return HoldOut(sizes[-1], law, resid, tuple(c.D for c in held)), ""


_ALIASES = {
    "N": ("n", "params", "parameters", "num_params"),
    "D": ("d", "tokens", "train_tokens", "data"),
    "lr": ("lr", "learning_rate", "peak_lr"),
    "loss": ("loss", "final_loss", "val_loss", "eval_loss"),
}


def read_sweep(path: str | Path) -> list[SweepPoint]:
    """Sweep results from a CSV with a header (N, D, lr, loss) or JSON (a list of such objects, or
    ``{"points": [...]}``). Column names are matched case-insensitively, with a few aliases
    (params/tokens/learning_rate/final_loss)."""
    p = Path(path)
    require(p.exists(), f"sweep file {str(p)!r} not found")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RampError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        rows = data.get("points") if isinstance(data, dict) else data
        require(isinstance(rows, list), f"{p}: expected a list of points or {{'points': [...]}}")
    else:
        with p.open(newline="") as f:
            rows = list(csv.DictReader(f))
    out = []
    for i, row in enumerate(rows, start=1):
        require(isinstance(row, dict), f"{p}: point {i} is not an object with N, D, lr, loss")
        lower = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
        vals = {}
        for key, names in _ALIASES.items():
            found = next((lower[n] for n in names if n in lower), None)
            require(found not in (None, ""), f"{p}: point {i} has no {key} (columns: {', '.join(lower)})")
            try:
                vals[key] = float(found)
            except (TypeError, ValueError):
                raise RampError(f"{p}: point {i}: {key}={found!r} is not a number") from None
        out.append(SweepPoint(**vals))
    require(bool(out), f"{p}: no sweep points")
    return out


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of the recipe's GPT/MoE model (matrices only; norms and biases are < 0.1%)."""

    embedding: int
    output: int  # untied output head; 0 when tied
    attention: int
    dense_mlp: int
    router: int
    experts_total: int
    experts_active: int  # the top-k experts a token passes through
    shared_experts: int

    @property
    def non_embedding_total(self) -> int:
        return self.attention + self.dense_mlp + self.router + self.experts_total + self.shared_experts

    @property
    def non_embedding_active(self) -> int:
        return self.attention + self.dense_mlp + self.router + self.experts_active + self.shared_experts

    @property
    def total(self) -> int:
        return self.non_embedding_total + self.embedding + self.output

    @property
    def active(self) -> int:
        return self.non_embedding_active + self.embedding + self.output

    def n(self, kind: str = "active", embeddings: bool = False) -> int:
        """The N of the LR law: ``active`` or ``total`` parameters, with or without embedding and head."""
        require(kind in N_KINDS, f"parameter count {kind!r}: choose one of {', '.join(N_KINDS)}")
        base = self.non_embedding_active if kind == "active" else self.non_embedding_total
        return base + (self.embedding + self.output if embeddings else 0)


def count_params(model: ModelConfig, vocab_size: int | None = None, gated: bool = True) -> ParamCount:
    """Count the parameters of the model launcher/model.py builds (SwiGLU MLPs when ``gated``, no biases).

    The vocabulary is padded to ``model.make_vocab_size_divisible_by`` as megatron does (at TP=1).
    """
    vocab = vocab_size if vocab_size is not None else model.vocab_size
    require(
        vocab is not None and vocab > 0, "count_params: give the vocabulary size (model.vocab_size is unset)"
    )
    div = model.make_vocab_size_divisible_by
    padded = -(-int(vocab) // div) * div
    h, hd = model.hidden_size, model.head_dim
    up = 2 if gated else 1
    attn = h * (model.num_attention_heads + 2 * model.query_groups) * hd + model.num_attention_heads * hd * h
    n_dense = model.first_k_dense if model.is_moe else model.num_layers
    n_moe = model.num_layers - n_dense
    mlp = lambda width: (up + 1) * h * width  # fc1 (x2 when gated) and fc2
    shared = model.moe_shared_expert_hidden_size or 0
    emb = padded * h
    return ParamCount(
        embedding=emb,
        output=0 if model.tie_embeddings else emb,
        attention=model.num_layers * attn,
        dense_mlp=n_dense * mlp(model.ffn_hidden_size),
        router=n_moe * model.num_experts * h,
        experts_total=n_moe * model.num_experts * mlp(model.moe_ffn_hidden_size),
        experts_active=n_moe * model.moe_router_topk * mlp(model.moe_ffn_hidden_size),
        shared_experts=n_moe * mlp(shared) if shared else 0,
    )
