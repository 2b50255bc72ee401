"""The optimal-LR law of arXiv 2601.05049 ("How to Set the Learning Rate for Large-Scale Pre-training?").

Two fits, as in the paper's fitting paradigm (/work/shared/research/papers.md section 3.2):

1. per (N, D), the final loss against the LR is a parabola in log LR (paper Eq. 2):
   ``L(lr) = L_min + C (ln lr - x*)^2``, so ``lr* = exp(x*)``. We use the natural log; C depends on the
   base of the log, x* does not once exponentiated.
2. across (N, D), ``lr*(N, D) = c N^a D^b`` (paper Eq. 6), a least-squares line in log space.

``PAPER_LAW`` is the paper's published fit. It is a prior, not a transferable default: the constants
belong to the authors' MoE, initialisation, optimizer and WSD setup, and the units are not confirmed
(papers.md marks them [NF]). We read N as a parameter count and D as training tokens, which are the only
readings that give plausible LRs (1.3e9 active, 5e11 tokens -> 2.9e-5). Whether N counts total or active
MoE parameters, and whether embeddings count, is unknown; ramp's default is active non-embedding
parameters (the per-token compute that sets the update scale, and Kaplan's non-embedding convention),
and every fit records which count it used. Fit your own sweep before trusting a prediction.
"""

from __future__ import annotations

import csv
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


@dataclass(frozen=True)
class SweepPoint:
    N: float
    D: float
    lr: float
    loss: float


def fit_sweep(
    points: Iterable[SweepPoint],
    fix_a: float | None = None,
    fix_b: float | None = None,
    n_kind: str = "active",
) -> tuple[list[CurveFit], PowerLaw]:
    """Group the sweep by (N, D), fit one parabola each, then the power law through their optima."""
    groups: dict[tuple[float, float], list[SweepPoint]] = {}
    for p in points:
        groups.setdefault((float(p.N), float(p.D)), []).append(p)
    require(bool(groups), "the sweep is empty")
    curves = [
        fit_lr_curve([p.lr for p in pts], [p.loss for p in pts], N=n, D=d)
        for (n, d), pts in sorted(groups.items())
    ]
    law = fit_power_law(
        [c.N for c in curves], [c.D for c in curves], [c.lr_star for c in curves], fix_a, fix_b, n_kind
    )
    return curves, law


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
