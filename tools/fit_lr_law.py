"""Fit the optimal-LR law lr*(N, D) = c N^a D^b from an LR sweep and predict the LR for a recipe.

    ramp-fit-lr-law sweep.csv                       # fit and print the law
    ramp-fit-lr-law sweep.csv --recipe moe-tiny     # ... and the predicted LR for a recipe
    ramp-fit-lr-law --recipe moe-tiny               # the paper's published law only (a prior)

The sweep is a CSV (header N,D,lr,loss) or JSON list of {N, D, lr, loss}: N the parameter count the
runs used (by default active non-embedding parameters, as ``--n-count`` prints for a recipe), D training
tokens, lr the peak LR, loss the final loss. Per (N, D) it fits L = L_min + C (ln lr - x*)^2, then
ln lr* = ln c + a ln N + b ln D. See launcher/laws/lr_law.py for the method and the prior's caveats.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from launcher.errors import RampError
from launcher.laws.lr_law import N_KINDS, PAPER_LAW, PowerLaw, count_params, fit_sweep, read_sweep


def _recipe_nd(recipe: str, overrides: list[str], n_kind: str, embeddings: bool, vocab: int | None) -> dict:
    """N and D for a recipe: N from the parameter counter, D the run's tokens (whole steps)."""
    from launcher.recipe import load

    r = load(recipe, overrides)
    m, t = r.model, r.training
    if vocab is None:
        vocab = m.vocab_size or (r.data.embedded_vocab_size if r.data.is_embedded else None)
    if vocab is None:
        raise RampError("the recipe's vocabulary comes from its tokenizer: give --vocab-size")
    counts = count_params(m, vocab)
    tokens_per_step = t.global_batch_size * m.seq_length
    steps = t.train_steps if t.train_steps is not None else math.ceil(t.train_tokens / tokens_per_step)
    return {
        "name": r.name,
        "N": counts.n(n_kind, embeddings),
        "D": steps * tokens_per_step,
        "n_kind": f"{n_kind}{'' if embeddings else ' non-embedding'}",
        "total_params": counts.total,
        "active_params": counts.active,
        "recipe_lr": r.optimizer.lr,
    }


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ramp-fit-lr-law", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", nargs="?", help="CSV or JSON of sweep points: N, D, lr, loss")
    ap.add_argument("--recipe", help="recipe name or YAML: print the predicted LR for it")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--n-count", choices=N_KINDS, default="active", help="N of the recipe (default: active)")
    ap.add_argument("--with-embeddings", action="store_true", help="count embedding and head in N")
    ap.add_argument(
        "--vocab-size", type=int, help="vocabulary size when the recipe takes it from a tokenizer"
    )
    ap.add_argument("--fix-a", type=float, help="hold the N exponent fixed (a sweep at one N)")
    ap.add_argument("--fix-b", type=float, help="hold the D exponent fixed (a sweep at one D)")
    ap.add_argument("--no-prior", action="store_true", help="do not print the paper's published law")
    ap.add_argument("--json", type=Path, help="also write the fits and predictions to this JSON file")
    args = ap.parse_args(argv)

    try:
        if args.sweep is None and args.recipe is None:
            raise RampError("give a sweep file, a --recipe, or both")
        n_kind = f"{args.n_count}{'' if args.with_embeddings else ' non-embedding'}"
        out: dict = {}
        law: PowerLaw | None = None
        if args.sweep is not None:
            curves, law = fit_sweep(read_sweep(args.sweep), args.fix_a, args.fix_b, n_kind)
            print(f"per-(N, D) fits of L = L_min + C (ln lr - x*)^2 ({len(curves)} curves):")
            print(f"  {'N':>10} {'D':>10} {'points':>6} {'lr*':>10} {'L_min':>8} {'C':>8} {'R^2':>7}  note")
            for c, res in zip(curves, law.residuals):
                note = "" if c.bracketed else "optimum outside the swept LRs (extrapolated)"
                print(
                    f"  {_fmt(c.N):>10} {_fmt(c.D):>10} {c.n:>6} {c.lr_star:>10.4g} {c.L_min:>8.4f} "
                    f"{c.C:>8.4f} {c.r2:>7.4f}  law residual {res:+.3f}{'; ' + note if note else ''}"
                )
            print(f"law: {law.describe()}")
            if law.note:
                print(f"  note: {law.note}")
            out["curves"] = [dict(c.__dict__, lr_star=c.lr_star, bracketed=c.bracketed) for c in curves]
            out["law"] = law.to_dict()
        if not args.no_prior:
            print(f"prior: {PAPER_LAW.describe()}")
            print(f"  note: {PAPER_LAW.note}")
            out["prior"] = PAPER_LAW.to_dict()
        if args.recipe is not None:
            rec = _recipe_nd(args.recipe, args.overrides, args.n_count, args.with_embeddings, args.vocab_size)
            print(
                f"recipe {rec['name']}: N={rec['N']:.4g} ({rec['n_kind']}; total {rec['total_params']:.4g}, "
                f"active {rec['active_params']:.4g}), D={rec['D']:.4g} tokens, "
                f"optimizer.lr={rec['recipe_lr']:g}"
            )
            if law is not None:
                rec["lr_fit"] = float(law.predict(rec["N"], rec["D"]))
                print(f"  predicted lr* (your fit):   {rec['lr_fit']:.4g}")
            if not args.no_prior:
                rec["lr_prior"] = float(PAPER_LAW.predict(rec["N"], rec["D"]))
                print(f"  predicted lr* (paper prior): {rec['lr_prior']:.4g}  (units unconfirmed, see note)")
            out["recipe"] = rec
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2))
    except RampError as e:
        print(f"ramp-fit-lr-law: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
