"""Fit the optimal-LR law lr*(N, D) = c N^a D^b from an LR sweep and predict the LR of recipes.

    ramp-fit-lr-law benchmarks/results/lr_transfer_runs          # the LR-transfer sweep's run cache
    ramp-fit-lr-law benchmarks/results/lr_transfer_runs --recipe moe-1b-a0.2b --recipe moe-7b-a1b
    ramp-fit-lr-law sweep.csv --fix-b -0.35                     # final losses only: N, D, lr, loss
    ramp-fit-lr-law --recipe moe-7b-a1b                         # the paper's published law only (a prior)

**A run cache** (a directory of JSON files, one per run, as ``benchmarks/lr_transfer.py`` writes them)
is fitted with the paper's method (launcher/laws/lr_law.py). Each file has ``parametrisation``
(standard | mup), ``width``, ``lr`` (the recipe's ``optimizer.lr``), ``val_loss`` (the final loss on the
fixed validation set, after the WSD decay; NaN when the run diverged), ``tokens`` (at the end of the run)
and ``overrides`` (the run's ``--set KEY=VALUE`` list, applied to ``--base-recipe``), and optionally
``seed`` and ``val_curve``: ``[tokens, val_loss]`` pairs measured along the run on the same validation
set. Under WSD every pair but the last is a *stable-phase* loss (measured at the peak LR, before the
decay); the last is the final, decayed loss. Pairs measured after the decay started (by the run's own
schedule, rebuilt from its overrides) are not stable-phase losses and are left out. Per run:

1. ``L(D) = L0 + A D^-gamma`` is fitted to the stable-phase points from ``--min-frac`` of the run on
   (robust, bounded, multi-start; R^2 and RMSE printed per run), and the run's decay gain (that curve at
   the final tokens minus the final loss) is subtracted to give its decayed loss at every target budget
   ``--targets`` (the gain is taken as independent of D: see the module docstring). A run without
   ``val_curve``, or with fewer than 3 stable points, gives its final loss at its own tokens only.
2. Per (N, D) the parabola ``L = L_min + C (ln lr - x*)^2`` through the best LR and ``--neighbours`` LRs
   each side gives ``lr*(N, D)``; seeds are separate points of the same parabola.
3. ``ln lr* = ln c + a ln N + b ln D`` per parametrisation, with R^2, and a hold-out check: the law
   refitted without the largest N predicts that N's optima (printed as log errors).

Runs are grouped by (parametrisation, N); N is rebuilt from each run's overrides by
``launcher.laws.lr_law.count_params`` (by default active non-embedding parameters: ``--n-count``,
``--with-embeddings``). The LR of the law is the **hidden-matrix LR**: ``optimizer.lr`` times the LR
multiplier of the ``attention_qkv`` group in ``launcher.laws.mup.multiplier_table`` (1 under standard
parameterisation; under muP the base LR over the width ratio, while ``optimizer.lr`` is the embedding's).
Under muP the base width's runs are the standard runs at that width (the two are the same model, and
``benchmarks/lr_transfer.py`` runs them once); ``--no-share-base`` turns that off.

**A CSV** (header N,D,lr,loss) **or JSON list** of ``{N, D, lr, loss}`` gives final losses only: one
point per run, at its own D (no extrapolation), steps 2 and 3 above.

``--recipe`` (repeatable) prints, per recipe, N, D (its training tokens), its hidden-matrix LR, what the
paper's law gives (units unconfirmed) and what each fitted law gives.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from launcher.errors import RampError, require
from launcher.laws.lr_law import (
    N_KINDS,
    PAPER_LAW,
    SweepFit,
    SweepRun,
    count_params,
    fit_sweep,
    fit_sweep_runs,
    read_sweep,
)

#: The group whose LR the law predicts: a hidden matrix of fan-in hidden_size (present in every model).
HIDDEN_GROUP = "attention_qkv"
PARAMETRISATIONS = ("standard", "mup")
RUN_KEYS = ("parametrisation", "width", "lr", "val_loss", "tokens", "overrides")
DEFAULT_TARGETS = ("0.5x", "1x", "2x", "4x")


def describe_recipe(r: Any, n_kind: str, embeddings: bool, vocab: int | None = None) -> dict[str, Any]:
    """N (the parameter counter), D (the run's tokens, whole steps) and the hidden-matrix LR of a recipe."""
    from launcher.laws.mup import multiplier_table

    m, t = r.model, r.training
    if vocab is None:
        vocab = m.vocab_size or (r.data.embedded_vocab_size if r.data.is_embedded else None)
    if vocab is None:
        raise RampError(f"recipe {r.name}: the vocabulary comes from its tokenizer: give --vocab-size")
    counts = count_params(m, vocab)
    table = multiplier_table(m, r.mup, r.optimizer.lr_mult, r.optimizer.weight_decay)
    mult = table[HIDDEN_GROUP].lr_mult
    tokens_per_step = t.global_batch_size * m.seq_length
    steps = t.train_steps if t.train_steps is not None else math.ceil(t.train_tokens / tokens_per_step)
    return {
        "name": r.name,
        "N": counts.n(n_kind, embeddings),
        "D": steps * tokens_per_step,
        "n_kind": f"{n_kind}{'' if embeddings else ' non-embedding'}",
        "total_params": counts.total,
        "active_params": counts.active,
        "optimizer_lr": r.optimizer.lr,
        "hidden_lr_mult": mult,
        "hidden_lr": r.optimizer.lr * mult,
        "mup": bool(r.mup.enabled),
    }


def load_runs(
    directory: Path,
    base_recipe: str,
    n_kind: str,
    embeddings: bool,
    pattern: str = "*.json",
    share_base: bool = True,
) -> tuple[dict[str, list[SweepRun]], list[str]]:
    """The run cache as SweepRuns per parametrisation (LR = hidden-matrix LR), plus notes."""
    from launcher.recipe import load

    files = sorted(directory.glob(pattern))
    require(bool(files), f"{directory}: no run files matching {pattern!r}")
    groups: dict[str, list[SweepRun]] = {p: [] for p in PARAMETRISATIONS}
    widths: dict[str, dict[int, list[SweepRun]]] = {p: {} for p in PARAMETRISATIONS}
    base_widths: set[int] = set()
    seen: dict[tuple, Path] = {}
    notes: list[str] = []
    for path in files:
        try:
            run = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RampError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        require(isinstance(run, dict), f"{path}: a run file is a JSON object")
        missing = [k for k in RUN_KEYS if k not in run]
        require(not missing, f"{path}: run file has no {', '.join(missing)} (keys: {', '.join(run)})")
        par = run["parametrisation"]
        require(
            par in PARAMETRISATIONS,
            f"{path}: parametrisation={par!r}: choose one of {', '.join(PARAMETRISATIONS)}",
        )
        r = load(base_recipe, list(run["overrides"]))
        require(
            r.mup.enabled == (par == "mup"),
            f"{path}: parametrisation={par} but its overrides give mup.enabled={r.mup.enabled}",
        )
        require(
            math.isclose(r.optimizer.lr, float(run["lr"]), rel_tol=1e-9),
            f"{path}: lr={run['lr']} but its overrides give optimizer.lr={r.optimizer.lr}",
        )
        rec = describe_recipe(r, n_kind, embeddings)
        curve = run.get("val_curve") or []
        require(
            all(isinstance(p, (list, tuple)) and len(p) == 2 for p in curve),
            f"{path}: val_curve must be a list of [tokens, val_loss] pairs",
        )
        # The last pair is after the decay; of the others keep those measured before the decay started
        # (an evaluation inside the decay window is not a stable-phase loss).
        decay_start = _decay_start(r)
        stable = tuple((float(t), float(v)) for t, v in curve[:-1] if float(t) <= decay_start)
        if len(stable) < len(curve) - 1:
            notes.append(
                f"{path.name}: {len(curve) - 1 - len(stable)} val_curve point(s) inside the decay left out"
            )
        seed = run.get("seed")
        key = (par, rec["N"], float(run["lr"]), seed, float(run["tokens"]))
        require(
            key not in seen,
            f"{path} and {seen.get(key)} are the same run (parametrisation, N, lr, seed, tokens); "
            "select one set of runs with --glob",
        )
        seen[key] = path
        sweep_run = SweepRun(
            N=float(rec["N"]),
            lr=float(rec["hidden_lr"]),
            tokens=float(run["tokens"]),
            final_loss=float(run["val_loss"]),
            stable=stable,
            name=f"{par} w{run['width']} lr {run['lr']:g}" + (f" seed {seed}" if seed is not None else ""),
        )
        groups[par].append(sweep_run)
        widths[par].setdefault(int(run["width"]), []).append(sweep_run)
        if par == "mup" and r.mup.base_hidden_size is not None:
            base_widths.add(int(r.mup.base_hidden_size))
    if share_base:
        for w in sorted(base_widths):
            shared = widths["standard"].get(w, [])
            if shared and w not in widths["mup"]:
                groups["mup"] += shared
                notes.append(f"muP at its base width {w}: the {len(shared)} standard runs there (same model)")
    return {p: runs for p, runs in groups.items() if runs}, notes


def _decay_start(r: Any) -> float:
    """Tokens at which the run's LR decay starts (its stable phase ends), from its own schedule."""
    from launcher.laws.schedule import resolve_schedule

    d = r.derive(world_size=r.parallel.model_parallel_size)  # one data-parallel rank: same token counts
    return float(resolve_schedule(r.schedule, d.train_tokens, d.tokens_per_step, d.warmup_tokens).decay_start)


def resolve_targets(specs: list[str], runs: list[SweepRun]) -> list[float]:
    """Target budgets: ``2x`` is twice the median final tokens of the runs, a plain number is tokens."""
    ref = statistics.median(r.tokens for r in runs)
    out = []
    for s in specs:
        try:
            out.append(float(s[:-1]) * ref if s.endswith("x") else float(s))
        except ValueError:
            raise RampError(
                f"--targets {s!r}: give tokens (2e9) or a multiple of the run length (2x)"
            ) from None
        require(out[-1] > 0, f"--targets {s!r}: must be > 0")
    return sorted(set(out))


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def print_fit(label: str, fit: SweepFit) -> None:
    if fit.runs:
        print(
            f"{label}: per-run fits of L(D) = L0 + A D^-gamma on stable-phase losses ({len(fit.runs)} runs):"
        )
        print(
            f"  {'run':<28} {'N':>9} {'lr':>9} {'pts':>4} {'L0':>7} {'A':>9} {'gamma':>6} {'R^2':>7} "
            f"{'rmse':>7} {'decay':>7}  note"
        )
        for rf in fit.runs:
            f = rf.fit
            cols = (
                f"{f.n:>4} {f.L0:>7.4f} {f.A:>9.4g} {f.gamma:>6.3f} {f.r2:>7.4f} {f.rmse:>7.4f} "
                f"{f.decay_gain:>7.4f}"
                if f is not None
                else f"{'-':>4} {'-':>7} {'-':>9} {'-':>6} {'-':>7} {'-':>7} {'-':>7}"
            )
            print(f"  {rf.run.name:<28} {_fmt(rf.run.N):>9} {rf.run.lr:>9.3g} {cols}  {rf.note}")
    print(f"{label}: per-(N, D) fits of L = L_min + C (ln lr - x*)^2 ({len(fit.curves)} curves):")
    print(f"  {'N':>10} {'D':>10} {'points':>6} {'lr*':>10} {'L_min':>8} {'C':>8} {'R^2':>7}  note")
    for c, res in zip(fit.curves, fit.law.residuals):
        note = "" if c.bracketed else "; optimum outside the swept LRs (extrapolated)"
        print(
            f"  {_fmt(c.N):>10} {_fmt(c.D):>10} {c.n:>6} {c.lr_star:>10.4g} {c.L_min:>8.4f} "
            f"{c.C:>8.4f} {c.r2:>7.4f}  law residual {res:+.3f}{note}"
        )
    for s in fit.skipped:
        print(f"  skipped: {s}")
    print(f"{label} law: {fit.law.describe()}")
    if fit.law.note:
        print(f"  note: {fit.law.note}")
    if fit.holdout is not None:
        h = fit.holdout
        errs = ", ".join(f"D={_fmt(d)}: {r:+.3f}" for d, r in zip(h.D, h.residuals))
        print(
            f"  hold-out: refitted without N={_fmt(h.N)} ({h.law.formula()}); ln(observed/predicted) "
            f"lr* there: {errs} (max |.| {h.max_abs:.3f}, x{math.exp(h.max_abs):.2f})"
        )
    else:
        print(f"  {fit.holdout_note}")


def fit_to_dict(fit: SweepFit) -> dict[str, Any]:
    out: dict[str, Any] = {
        "curves": [dict(c.__dict__, lr_star=c.lr_star, bracketed=c.bracketed) for c in fit.curves],
        "skipped": list(fit.skipped),
        "law": fit.law.to_dict(),
        "holdout": None,
    }
    if fit.holdout is not None:
        h = fit.holdout
        out["holdout"] = {"N": h.N, "law": h.law.to_dict(), "D": list(h.D), "ln_residuals": list(h.residuals)}
    if fit.runs:
        out["runs"] = [
            {
                "name": rf.run.name,
                "N": rf.run.N,
                "lr": rf.run.lr,
                "tokens": rf.run.tokens,
                "final_loss": rf.run.final_loss,
                "fit": rf.fit.__dict__ if rf.fit is not None else None,
                "losses": {str(d): v for d, v in rf.losses.items()},
                "note": rf.note,
            }
            for rf in fit.runs
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ramp-fit-lr-law", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", nargs="?", help="run-cache directory, or CSV/JSON of points N, D, lr, loss")
    ap.add_argument("--recipe", action="append", default=[], help="recipe name or YAML (repeatable)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--base-recipe", default="moe-tiny", help="recipe the run files' overrides apply to")
    ap.add_argument("--glob", default="*.json", help="which files of the run cache to read")
    ap.add_argument(
        "--targets",
        nargs="+",
        default=list(DEFAULT_TARGETS),
        help="budgets D to extrapolate each run to: tokens, or multiples of the run length such as 2x",
    )
    ap.add_argument(
        "--min-frac", type=float, default=0.1, help="use stable-phase points from this fraction of a run on"
    )
    ap.add_argument(
        "--neighbours", type=int, default=2, help="LRs each side of the best one in each parabola (0: all)"
    )
    ap.add_argument("--no-share-base", action="store_true", help="muP: do not reuse standard base-width runs")
    ap.add_argument("--n-count", choices=N_KINDS, default="active", help="N: active or total parameters")
    ap.add_argument("--with-embeddings", action="store_true", help="count embedding and head in N")
    ap.add_argument("--vocab-size", type=int, help="vocabulary size when a recipe takes it from a tokenizer")
    ap.add_argument("--fix-a", type=float, help="hold the N exponent fixed (a sweep at one N)")
    ap.add_argument("--fix-b", type=float, help="hold the D exponent fixed (a sweep at one D)")
    ap.add_argument("--no-prior", action="store_true", help="do not print the paper's published law")
    ap.add_argument("--json", type=Path, help="also write the fits and predictions to this JSON file")
    args = ap.parse_args(argv)

    try:
        if args.sweep is None and not args.recipe:
            raise RampError("give a sweep (run-cache directory or CSV/JSON), a --recipe, or both")
        require(0.0 <= args.min_frac < 1.0, f"--min-frac {args.min_frac}: must be in [0, 1)")
        require(args.neighbours >= 0, f"--neighbours {args.neighbours}: must be >= 0 (0: every LR)")
        n_kind = f"{args.n_count}{'' if args.with_embeddings else ' non-embedding'}"
        neighbours = args.neighbours or None
        out: dict[str, Any] = {}
        fits: dict[str, SweepFit] = {}
        if args.sweep is not None:
            path = Path(args.sweep)
            if path.is_dir():
                groups, notes = load_runs(
                    path,
                    args.base_recipe,
                    args.n_count,
                    args.with_embeddings,
                    args.glob,
                    not args.no_share_base,
                )
                for note in notes:
                    print(f"note: {note}")
                for par, runs in groups.items():
                    targets = resolve_targets(args.targets, runs)
                    try:
                        fits[par] = fit_sweep_runs(
                            runs, targets, args.min_frac, args.fix_a, args.fix_b, n_kind, neighbours
                        )
                    except RampError as e:
                        hint = (
                            ""
                            if any(len(r.stable) >= 3 for r in runs)
                            else " (no run has a val_curve with 3+ stable-phase points: each gives its"
                            " final loss at its own D only)"
                        )
                        raise RampError(f"{par}: {e}{hint}") from None
            else:
                fits["sweep"] = fit_sweep(read_sweep(path), args.fix_a, args.fix_b, n_kind, neighbours)
            for label, fit in fits.items():
                print_fit(label, fit)
            out["fits"] = {label: fit_to_dict(fit) for label, fit in fits.items()}
        if not args.no_prior:
            print(f"prior: {PAPER_LAW.describe()}")
            print(f"  note: {PAPER_LAW.note}")
            out["prior"] = PAPER_LAW.to_dict()
        if args.recipe:
            from launcher.recipe import load

            out["recipes"] = []
            for name in args.recipe:
                rec = describe_recipe(
                    load(name, args.overrides), args.n_count, args.with_embeddings, args.vocab_size
                )
                print(
                    f"recipe {rec['name']}: N={rec['N']:.4g} ({rec['n_kind']}; total "
                    f"{rec['total_params']:.4g}, active {rec['active_params']:.4g}), "
                    f"D={rec['D']:.4g} tokens, "
                    f"hidden-matrix LR {rec['hidden_lr']:.4g} (optimizer.lr {rec['optimizer_lr']:g} x "
                    f"{rec['hidden_lr_mult']:.4g})"
                )
                rec["lr_fit"] = {}
                for label, fit in fits.items():
                    lr = float(fit.law.predict(rec["N"], rec["D"]))
                    rec["lr_fit"][label] = lr
                    ratio = rec["hidden_lr"] / lr
                    print(f"  predicted lr* ({label} fit): {lr:.4g}  (recipe / law: {ratio:.3g}x)")
                if not args.no_prior:
                    rec["lr_prior"] = float(PAPER_LAW.predict(rec["N"], rec["D"]))
                    print(
                        f"  predicted lr* (paper prior): {rec['lr_prior']:.4g}  (recipe / law: "
                        f"{rec['hidden_lr'] / rec['lr_prior']:.3g}x; units unconfirmed, see note)"
                    )
                out["recipes"].append(rec)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2))
    except RampError as e:
        print(f"ramp-fit-lr-law: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
