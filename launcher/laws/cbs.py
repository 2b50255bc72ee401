"""The critical batch size (CBS) by branched training, arXiv 2505.23971 (papers.md section 2.2): read-off,
noise, branch length, and the CBS curve over training tokens.

**Read-off** (:func:`read_off`). From one checkpoint, branches at batch ``k x B`` (LR by the Adam rule
``sqrt(k)``) train the same token budget on the same data; ``L_k`` is each branch's loss at its end. The CBS
multiplier is the largest ``k`` with ``L_k <= L_k' + epsilon`` for every smaller ``k'``; ``epsilon`` is
relative (``L_k <= L_k' (1 + epsilon)``, default 1%) or absolute (the paper's 0.01 loss units). The grid
is walked upwards and the first ``k`` that fails ends it, so "stop probing at the first failure" and the
full grid read the same number; a larger ``k`` that passes again after a failure is reported in the note
(noise, not a CBS), never taken. The CBS is an interval ``[k* B, k_fail B)``; at the edges of the tried
range it is a bound, and the note says which.

**Which loss** (``rule``). ``val`` (default): the final loss over the run's fixed validation set. ``ema``:
the paper's EMA(0.5) of the training loss. calibration.md measured, at small batches, noise sd 2-4% for the
EMA rule against 0.25% for the fixed validation set, so ``ema`` is for large-batch runs only.

**Noise estimate** (:func:`loss_noise`): the sd of the read-off loss of one branch, from the branch alone.
``val``: the residual sd of the branch's validation losses around a straight line over the second half of
the branch (the weights' step-to-step wander that a different data order would also move); ``ema``: the
per-step residual sd of the training loss times ``sqrt(alpha / (2 - alpha))``, the sd of an EMA of
independent noise. A failing comparison within ``z`` noise sds of the threshold lowers the confidence.

**Branch length** (:func:`branch_tokens`): the shortest budget at which a difference of two branches is
resolved at ``epsilon``: ``z sqrt(2) sd(Delta) <= epsilon`` with ``sd(Delta) = sd0 (Delta0 / Delta)**a``
measured once at ``Delta0`` (calibration: sd0 = 0.25% at 262 k tokens, against epsilon = 1%), and at least
``min_steps`` optimizer steps of the largest branch so Adam's moments re-adapt to the new batch.

**Curve** (:func:`fit_cbs_curve`): CBS against tokens, fitted in log space (CBS values are powers of 2
apart) by two saturating forms: ``c (1 - exp(-t / tau))`` and the power law with a plateau
``c x**p / (1 + x**p)``, ``x = t / tau`` (``~ t**p`` early, ``c`` late). The form with the lower
leave-one-out error of log CBS is chosen (held-out quality, not in-sample residual).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
from scipy.optimize import least_squares

from launcher.errors import check_choices, require, require_choice
from launcher.laws.batch_size import LrRule

ReadoffRule = Literal["val", "ema"]
BranchSchedule = Literal["hold", "decay"]
EpsilonMode = Literal["relative", "absolute"]
CurveForm = Literal["saturating", "power_plateau"]
# online mode: who trains the k = 1 branch (run: the run itself, where it can; branch: a child job)
Reference = Literal["run", "branch"]
READOFF_RULES: tuple[str, ...] = get_args(ReadoffRule)
EPSILON_MODES: tuple[str, ...] = get_args(EpsilonMode)
CURVE_FORMS: tuple[str, ...] = get_args(CurveForm)
BRANCH_SCHEDULES: tuple[str, ...] = get_args(BranchSchedule)

#: The paper's tolerance is 0.01 loss units; relative 1% is the same at loss ~1 and is what calibration.md
#: compared the noise floor with.
DEFAULT_EPSILON = 0.01
DEFAULT_MULTIPLIERS: tuple[int, ...] = (1, 2, 4, 8, 16)
EMA_ALPHA = 0.5  # the paper's smoothing of the training loss
#: A comparison whose margin to the threshold is under this many noise sds is flagged as uncertain.
Z_CONFIDENT = 2.0


# -- how probes run: ramp-probe's options and the recipe's probes: section --------------------------------


@dataclass
class ProbeConfig:
    """How the branches of a fork are run and read (``ramp-probe --help`` names each one), and, as the
    recipe's ``probes:`` section, when a run forks them while it trains (online mode: ``every_tokens``
    and/or ``first_tokens``; see :func:`fork_points`)."""

    multipliers: list[float] = field(default_factory=lambda: list(DEFAULT_MULTIPLIERS))
    lr_rule: LrRule = "sqrt"
    # hold: the fork's LR held over the branch (the paper); decay: annealed to the parent's final LR
    lr_schedule: BranchSchedule = "hold"
    budget_tokens: int | None = None  # None: from the noise floor (branch_tokens)
    noise_sd: float = 0.0025  # read-off noise (in epsilon's units) measured at noise_tokens (calibration.md)
    noise_tokens: int = 262_144
    min_steps: int = 4  # the largest branch trains at least this many steps (Adam's moments re-adapt)
    rule: ReadoffRule = "val"
    epsilon: float = DEFAULT_EPSILON
    epsilon_mode: EpsilonMode = "relative"
    evals: int = 6  # validation passes per branch (the last at its end)
    stop_at_failure: bool = True
    nproc: int = 1  # processes per branch (torchrun when > 1); 1: the branch trains unsharded
    timeout_s: float | None = None
    extra_sets: list[str] = field(default_factory=list)  # applied to every branch last
    # online mode: fork at every ``every_tokens`` and/or on the geometric grid first_tokens * growth**i
    # (dense early, where the CBS rises fast), before ``until_tokens`` (None: the whole run)
    every_tokens: int | None = None
    first_tokens: int | None = None
    growth: float = 2.0
    until_tokens: int | None = None
    # run: the run itself is the k = 1 branch where it can be (multipliers start at 1, LR held, val
    # read-off, and the run's LR and batch stay put over the branch's tokens); its other branches run and
    # the decision applies once the run has trained those tokens. branch: k = 1 is a child job like the
    # others, and the decision applies at the fork.
    reference: Reference = "run"
    # an online run whose decisions set its batch tries only the multipliers whose outcome can change the
    # decision (laws.batch_size.deciding_multipliers: with the paper's rule, not k = 2)
    deciding_only: bool = True

    def __post_init__(self) -> None:
        check_choices(self, "probes")
        ks = list(self.multipliers)
        require(len(ks) >= 2, f"probe multipliers {ks}: give at least two (e.g. 1,2,4,8,16)")
        require(all(k > 0 for k in ks), f"probe multipliers {ks}: must be > 0")
        require(ks == sorted(set(ks)), f"probe multipliers {ks}: must increase")
        require(self.epsilon > 0, f"probe epsilon={self.epsilon}: must be > 0")
        require(self.evals >= 1, f"probe evals={self.evals}: must be >= 1")
        require(self.min_steps >= 1, f"probe min_steps={self.min_steps}: must be >= 1")
        require(self.nproc >= 1, f"probes.nproc={self.nproc}: must be >= 1")
        for name in ("budget_tokens", "every_tokens", "first_tokens", "until_tokens"):
            value = getattr(self, name)
            require(value is None or value > 0, f"probes.{name}={value}: must be > 0")
        require(self.growth > 1.0, f"probes.growth={self.growth}: must be > 1 (a geometric grid grows)")
        require(
            self.timeout_s is None or self.timeout_s > 0, f"probes.timeout_s={self.timeout_s}: must be > 0"
        )

    @property
    def online(self) -> bool:
        """Whether the run forks probes while it trains."""
        return self.every_tokens is not None or self.first_tokens is not None


def fork_points(cfg: ProbeConfig, train_tokens: int) -> list[int]:
    """Token counts at which an online run forks (each at the first step end at or past it): the
    multiples of ``every_tokens`` and the geometric grid ``first_tokens * growth**i``, below ``until_tokens``
    and the run's end."""
    end = min(train_tokens, cfg.until_tokens) if cfg.until_tokens is not None else train_tokens
    points: set[int] = set()
    if cfg.every_tokens is not None:
        points.update(range(cfg.every_tokens, end, cfg.every_tokens))
    if cfg.first_tokens is not None:
        t = float(cfg.first_tokens)
        while t < end:
            points.add(round(t))
            t *= cfg.growth
    return sorted(p for p in points if 0 < p < end)


# -- losses and their noise -----------------------------------------------------------------------------


def ema(values: Sequence[float], alpha: float = EMA_ALPHA) -> float:
    """The last value of ``s_0 = x_0, s_i = alpha x_i + (1 - alpha) s_{i-1}``."""
    require(len(values) > 0, "ema: no values")
    s = float(values[0])
    for x in values[1:]:
        s = alpha * float(x) + (1.0 - alpha) * s
    return s


def _residual_sd(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Sd of ``ys`` around their least-squares line in ``xs`` (n - 2 degrees of freedom); None below 3."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(y) < 3:
        return None
    a = np.vstack([x - x.mean(), np.ones_like(x)]).T
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    r = y - a @ coef
    return float(math.sqrt(float(r @ r) / (len(y) - 2)))


def branch_loss(
    rule: ReadoffRule,
    train: Sequence[tuple[int, float]],
    evals: Sequence[tuple[int, float]],
    tail_frac: float = 0.5,
) -> tuple[float, float | None]:
    """``(L, noise sd)`` of one branch from its ``(tokens, train loss)`` and ``(tokens, val loss)`` series.

    ``val``: the last validation loss; noise from the evals in the last ``tail_frac`` of the branch.
    ``ema``: EMA(0.5) of the training losses; noise from their tail residuals (see the module docstring).
    """
    require_choice("readoff rule", rule, READOFF_RULES)
    series = evals if rule == "val" else train
    require(len(series) > 0, f"branch_loss: no {'validation' if rule == 'val' else 'training'} losses")
    series = sorted(series)
    t0, t1 = series[0][0], series[-1][0]
    tail = [(t, v) for t, v in series if t >= t1 - tail_frac * (t1 - t0)]
    sd = _residual_sd([t for t, _ in tail], [v for _, v in tail])
    if rule == "val":
        return float(series[-1][1]), sd
    scale = math.sqrt(EMA_ALPHA / (2.0 - EMA_ALPHA))
    return ema([v for _, v in series]), (None if sd is None else sd * scale)


# -- the read-off -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BranchResult:
    """One branch: multiplier ``k``, its read-off loss, the noise sd of that loss, and an error if it did
    not finish (then ``loss`` is None)."""

    k: float
    loss: float | None
    noise: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Readoff:
    """The CBS read from one fork: ``k_star`` passes, ``k_fail`` (None: none failed) is the first that
    failed or did not finish; ``cbs`` = ``k_star x base_batch`` sequences; ``edge`` says whether it is a
    bound (``low``: the first step up already failed; ``high``: every tried k passed; ``error``: a branch
    did not finish) and ``confidence`` is ``ok`` or ``low`` with the reasons in ``note``."""

    k_star: float
    k_fail: float | None
    base_batch: int
    cbs: float
    cbs_upper: float | None
    edge: Literal["none", "low", "high", "error"]
    confidence: Literal["ok", "low"]
    note: str
    passed: dict[float, bool] = field(default_factory=dict)  # every finished branch's test result
    noise: float | None = None  # the largest noise sd of a finished branch (loss units)


def within(loss: float, ref: float, epsilon: float, mode: EpsilonMode) -> bool:
    """``loss <= ref + epsilon`` (absolute) or ``loss <= ref (1 + epsilon)`` (relative)."""
    return loss <= (ref * (1.0 + epsilon) if mode == "relative" else ref + epsilon)


def _margin(loss: float, ref: float, epsilon: float, mode: EpsilonMode) -> float:
    """How far ``loss`` is under the threshold, in the units of the noise sds (loss units)."""
    return (ref * (1.0 + epsilon) if mode == "relative" else ref + epsilon) - loss


def read_off(
    branches: Sequence[BranchResult],
    base_batch: int,
    epsilon: float = DEFAULT_EPSILON,
    mode: EpsilonMode = "relative",
    z: float = Z_CONFIDENT,
) -> Readoff:
    """The CBS of one fork (module docstring). ``branches`` in any order; the smallest ``k`` is the
    reference that always passes, and it must have finished."""
    require_choice("epsilon mode", mode, EPSILON_MODES)
    require(epsilon >= 0, f"epsilon={epsilon}: must be >= 0")
    require(len(branches) > 0, "read_off: no branches")
    bs = sorted(branches, key=lambda b: b.k)
    require(len({b.k for b in bs}) == len(bs), "read_off: two branches share a multiplier")
    first = bs[0]
    require(
        first.loss is not None and math.isfinite(first.loss),
        f"read_off: the reference branch k={first.k:g} did not finish ({first.error or 'no loss'}); "
        f"no CBS can be read from this fork",
    )
    notes: list[str] = []
    low = False
    passed: dict[float, bool] = {first.k: True}
    k_star, k_fail, edge = first.k, None, "none"
    done: list[BranchResult] = [first]
    for b in bs[1:]:
        if b.loss is None or not math.isfinite(b.loss):
            k_fail, edge = b.k, "error"
            notes.append(
                f"branch k={b.k:g} did not finish ({b.error or 'non-finite loss'}): the CBS is a lower bound"
            )
            break
        ok = all(within(b.loss, d.loss, epsilon, mode) for d in done)  # type: ignore[arg-type]
        passed[b.k] = ok
        # the deciding comparison: the smallest margin against any smaller branch
        worst = min(_margin(b.loss, d.loss, epsilon, mode) for d in done)  # type: ignore[arg-type]
        sds = [x.noise for x in (b, *done) if x.noise is not None]
        if sds and abs(worst) < z * math.sqrt(2.0) * max(sds):
            low = True
            notes.append(
                f"k={b.k:g} {'passed' if ok else 'failed'} by {abs(worst):.3g}, within {z:g} noise sds "
                f"of the threshold (sd {max(sds):.3g})"
            )
        if not ok:
            k_fail = b.k
            break
        k_star = b.k
        done.append(b)
    if k_fail is not None:
        for b in bs:  # after the first failure: noted, never taken
            again = b.k > k_fail and b.loss is not None and math.isfinite(b.loss)
            if again and all(within(b.loss, d.loss, epsilon, mode) for d in done):  # type: ignore[arg-type]
                low = True
                notes.append(f"k={b.k:g} passes again after k={k_fail:g} failed: non-monotone losses")
    if k_fail is None and len(bs) > 1:
        edge = "high"
        low = True
        notes.append(f"every tried k passed: the CBS is at least {k_star:g} x {base_batch}; try larger k")
    elif len(bs) == 1:
        edge = "high"
        low = True
        notes.append("one branch only: no comparison")
    elif edge != "error" and k_star == first.k:
        edge = "low"
        low = True
        notes.append(
            f"the first step up (k={k_fail:g}) failed: the CBS is at most {k_fail:g} x {base_batch} and may "
            f"be below {base_batch}; fork from a smaller batch to resolve it"
        )
    finished = [b.noise for b in bs if b.noise is not None]
    return Readoff(
        k_star=k_star,
        k_fail=k_fail,
        base_batch=base_batch,
        cbs=k_star * base_batch,
        cbs_upper=None if k_fail is None else k_fail * base_batch,
        edge=edge,  # type: ignore[arg-type]
        confidence="low" if low else "ok",
        note="; ".join(notes) or "ok",
        passed=passed,
        noise=max(finished) if finished else None,
    )


# -- branch length ----------------------------------------------------------------------------------------


def noise_at(noise_sd: float, measured_tokens: int, tokens: int, exponent: float = 0.5) -> float:
    """The read-off noise model: ``sd(D) = noise_sd (measured_tokens / D)**exponent`` for a branch of ``D``
    tokens (``noise_sd`` measured at ``measured_tokens``; the units of ``noise_sd``). A branch too short
    for a noise estimate of its own (fewer than 3 evaluations in its tail) gets this one."""
    require(noise_sd >= 0 and measured_tokens > 0 and tokens > 0, "noise_at: noise_sd >= 0, tokens > 0")
    return noise_sd * (measured_tokens / tokens) ** exponent


def branch_tokens(
    noise_sd: float,
    measured_tokens: int,
    epsilon: float = DEFAULT_EPSILON,
    z: float = Z_CONFIDENT,
    exponent: float = 0.5,
    min_tokens: int = 0,
) -> int:
    """The shortest branch (tokens) whose read-off resolves ``epsilon``: ``z sqrt(2) sd(D) <= epsilon`` with
    ``sd(D) = noise_sd (measured_tokens / D)**exponent``, and not below ``min_tokens`` (e.g. ``min_steps``
    steps of the largest branch). ``noise_sd`` in the units of ``epsilon`` (relative: a fraction).

    Calibration (sd 0.25% at 262,144 tokens, epsilon 1%, z 2): ``D = 262144 (2 sqrt(2) 0.0025 / 0.01)**2``
    = 131,072 tokens, half the length that was used.
    """
    require(noise_sd >= 0 and measured_tokens > 0, "branch_tokens: noise_sd >= 0 and measured_tokens > 0")
    require(epsilon > 0 and z > 0, "branch_tokens: epsilon and z must be > 0")
    need = z * math.sqrt(2.0) * noise_sd / epsilon  # the factor by which the noise must shrink (<=1: none)
    if exponent <= 0:
        require(
            need <= 1.0,
            f"branch_tokens: noise sd {noise_sd:g} cannot resolve epsilon {epsilon:g} at z={z:g} and the "
            f"noise does not fall with length (exponent {exponent}); raise epsilon or measure it again",
        )
        return max(int(measured_tokens), int(min_tokens))
    tokens = measured_tokens * need ** (1.0 / exponent)
    # round off float fuzz first: sqrt(2)**2 is 2.0000000000000004, and a ceil of 131072.00000000003 would
    # cost a whole extra step of every branch once the budget is rounded up to whole steps
    return max(math.ceil(round(tokens, 6)), int(min_tokens))


# -- the CBS curve ---------------------------------------------------------------------------------------


def _saturating(t: np.ndarray, c: float, tau: float) -> np.ndarray:
    return c * -np.expm1(-t / tau)


def _power_plateau(t: np.ndarray, c: float, tau: float, p: float) -> np.ndarray:
    x = (t / tau) ** p
    return c * x / (1.0 + x)


_FORMS: dict[str, tuple[Callable[..., np.ndarray], int]] = {
    "saturating": (_saturating, 2),
    "power_plateau": (_power_plateau, 3),
}


@dataclass(frozen=True)
class CurveFit:
    """A fitted CBS curve: ``form``, its parameters (``c``, ``tau`` and ``p`` for ``power_plateau``), the
    in-sample RMS of log CBS, and the leave-one-out RMS of log CBS of every form tried (the choice)."""

    form: CurveForm
    params: dict[str, float]
    rms_log: float
    loo_rms_log: dict[str, float]

    def __call__(self, tokens: float | Sequence[float] | np.ndarray) -> np.ndarray:
        fn, _ = _FORMS[self.form]
        return fn(np.asarray(tokens, float), *self.params.values())

    def to_dict(self) -> dict:
        return {
            "form": self.form,
            "params": self.params,
            "rms_log": self.rms_log,
            "loo_rms_log": self.loo_rms_log,
        }


def _fit_form(form: str, t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares of log CBS; parameters in log space (all positive); a grid of starts for tau."""
    fn, n = _FORMS[form]
    ly = np.log(y)

    def resid(q: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(fn(t, *np.exp(q)), 1e-300)) - ly

    best: tuple[np.ndarray, float] | None = None
    for tau0 in np.geomspace(t.min() / 4, t.max() * 4, 9):
        starts = [math.log(y.max()), math.log(tau0)] + ([0.0] if n == 3 else [])
        sol = least_squares(resid, np.array(starts), method="lm" if len(t) > n else "trf")
        cost = float(np.mean(sol.fun**2))
        if best is None or cost < best[1]:
            best = (np.exp(sol.x), cost)
    assert best is not None
    return best[0], math.sqrt(best[1])


def fit_cbs_curve(
    tokens: Sequence[float], cbs: Sequence[float], forms: Sequence[str] = CURVE_FORMS
) -> CurveFit:
    """Fit every form in ``forms`` and keep the one with the lowest leave-one-out RMS of log CBS (a form
    needs one point more than it has parameters to be judged). Points at ``tokens <= 0`` are left out
    (a fork needs a checkpoint after some training; both forms are 0 there)."""
    for f in forms:
        require_choice("CBS curve form", f, CURVE_FORMS)
    pts = sorted((float(t), float(c)) for t, c in zip(tokens, cbs) if t > 0)
    require(all(c > 0 for _, c in pts), "fit_cbs_curve: every CBS must be > 0")
    t = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    usable = [f for f in forms if len(t) >= _FORMS[f][1] + 2]
    require(
        bool(usable),
        f"fit_cbs_curve: {len(t)} probe points at tokens > 0; a held-out choice needs at least "
        f"{min(_FORMS[f][1] for f in forms) + 2}",
    )
    loo: dict[str, float] = {}
    for f in usable:
        errs = []
        for i in range(len(t)):
            keep = np.arange(len(t)) != i
            q, _ = _fit_form(f, t[keep], y[keep])
            pred = _FORMS[f][0](t[i : i + 1], *q)[0]
            errs.append(math.log(max(pred, 1e-300)) - math.log(y[i]))
        loo[f] = float(math.sqrt(np.mean(np.square(errs))))
    form = min(usable, key=lambda f: loo[f])
    q, rms = _fit_form(form, t, y)
    names = ("c", "tau", "p")[: _FORMS[form][1]]
    return CurveFit(form, dict(zip(names, map(float, q))), rms, loo)  # type: ignore[arg-type]
