"""E(S), B_min and B_opt from constant-batch runs, and the B_opt(D) curve of the batch scheduler.

    ramp-fit-e-of-s runs/b8 runs/b16 runs/b32 runs/b64 runs/b128 runs/b256 --out e_of_s
    ramp-fit-e-of-s runs/b* --targets 3.2 3.1 3.0 2.9

K >= 6 run directories that differ only in their constant global batch (``metrics.jsonl`` and
``config.yaml`` as ``ramp-train`` writes them); only points at the run's peak LR count (the stable phase:
no warmup, no decay), on the validation loss by default. Per target loss: tokens E and steps S of every run
that reaches it, the fit of 2601.05034's piecewise E(S), ``B_min`` and ``B_opt`` (tokens per step and
sequences), then ``B_opt(D) = coef * D**exponent`` over the targets and the two recipe keys that
``batch_schedule.kind=bopt`` reads. Method and choices: ``launcher/laws/e_of_s.py``. Writes
``e_of_s.json`` and ``e_of_s.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from launcher.errors import RampError, require
from launcher.laws.e_of_s import MIN_POINTS, BatchRun, TargetResult, analyse, bopt_curve
from tools.fit_loss_curve import LOSS_KINDS, read_run


def read_batch_run(run_dir: Path, loss: str) -> BatchRun:
    """A run's stable-phase curve (steps at its peak LR); refused if its batch changes."""
    c = read_run(run_dir, loss)
    b = c.schedule.batch
    require(bool(np.all(b == b[0])), f"{run_dir}: its batch changes; E(S) needs constant-batch runs")
    lr = c.schedule.lr[c.steps - 1]
    keep = lr >= c.schedule.lr.max() * (1 - 1e-9)
    require(int(keep.sum()) >= 3, f"{run_dir}: fewer than 3 loss points at the peak LR (stable phase)")
    return BatchRun(c.name, int(b[0]), c.schedule.seq_length, c.tokens[keep], c.loss[keep])


def auto_targets(runs: list[BatchRun], n: int, min_frac: float) -> list[float]:
    """``n`` targets between the loss that ``MIN_POINTS`` runs reach and the highest loss every run has
    passed after ``min_frac`` of its tokens (ends excluded)."""
    finals = sorted(float(r.loss.min()) for r in runs)
    lo = finals[MIN_POINTS - 1]
    hi = min(float(r.loss[r.tokens >= min_frac * r.tokens.max()][0]) for r in runs)
    require(hi > lo, f"runs: no loss range reached by {MIN_POINTS} runs (give --targets)")
    return [float(x) for x in np.linspace(hi, lo, n + 2)[1:-1]]


def plot(results: list[TargetResult], runs: list[BatchRun], curve, seq: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for r in results:
        (pts,) = axes[0].plot(r.S, np.array(r.E) / 1e6, "o", ms=4, label=f"L={r.target:.3f}")
        if r.fit is not None:
            s = np.geomspace(max(min(r.S) * 0.8, r.fit.S_min * 1.01), max(r.S) * 1.2, 200)
            axes[0].plot(s, r.fit.E(s) / 1e6, "-", color=pts.get_color(), lw=1)
    axes[0].set(xscale="log", yscale="log", xlabel="steps S", ylabel="tokens E (M)", title="E(S) per target")
    fitted = [r for r in results if r.fit is not None]
    tg = [r.target for r in fitted]
    axes[1].plot(tg, [r.b_opt / seq for r in fitted], "o-", label="B_opt")
    axes[1].plot(tg, [np.nan if r.b_min is None else r.b_min / seq for r in fitted], "s-", label="B_min")
    axes[1].set(
        xlabel="target loss", ylabel="batch (sequences)", yscale="log", title="B_min, B_opt vs target"
    )
    axes[1].invert_xaxis()
    if curve is not None:
        d = np.array([p[0] for p in curve.points])
        axes[2].plot(d / 1e6, [p[1] for p in curve.points], "o", label="B_opt at E_min")
        dd = np.geomspace(d.min(), d.max(), 100)
        axes[2].plot(dd / 1e6, curve.predict(dd), "-", label=f"{curve.coef:.3g} D^{curve.exponent:.3f}")
    axes[2].set(
        xscale="log", yscale="log", xlabel="tokens D (M)", ylabel="B_opt (sequences)", title="B_opt(D)"
    )
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ramp-fit-e-of-s", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "runs", nargs="+", type=Path, help=f"at least {MIN_POINTS} constant-batch run directories"
    )
    ap.add_argument("--loss", choices=LOSS_KINDS, default="val")
    ap.add_argument("--targets", type=float, nargs="+", help="target losses (default: --n-targets automatic)")
    ap.add_argument("--n-targets", type=int, default=6)
    ap.add_argument("--min-frac", type=float, default=0.1, help="smooth on points from this fraction on")
    ap.add_argument("--no-smooth", action="store_true", help="interpolate the raw curve's running minimum")
    ap.add_argument("--out", type=Path, default=Path("e_of_s"))
    args = ap.parse_args(argv)
    try:
        require(
            len(args.runs) >= MIN_POINTS, f"give at least {MIN_POINTS} run directories, got {len(args.runs)}"
        )
        require(args.n_targets >= 2, f"--n-targets {args.n_targets}: must be >= 2")
        require(0.0 <= args.min_frac < 1.0, f"--min-frac {args.min_frac}: must be in [0, 1)")
        runs = [read_batch_run(p, args.loss) for p in args.runs]
        seqs = {r.seq_length for r in runs}
        require(len(seqs) == 1, f"runs: sequence lengths differ ({sorted(seqs)}); compare runs of one model")
        seq = seqs.pop()
        targets = args.targets or auto_targets(runs, args.n_targets, args.min_frac)
        results = analyse(runs, targets, args.min_frac, not args.no_smooth)
        print(
            f"{'target':>8} {'runs':>4} {'S_opt':>9} {'E_min':>10} {'B_opt tok':>10} {'B_opt seq':>9} "
            f"{'B_min seq':>9} {'rms ln':>7}  note"
        )
        for r in results:
            f = r.fit
            if f is None:
                print(
                    f"{r.target:>8.4f} {len(r.runs):>4} "
                    + " ".join(f"{'-':>{w}}" for w in (9, 10, 10, 9, 9, 7))
                    + f"  {r.note}"
                )
                continue
            print(
                f"{r.target:>8.4f} {len(r.runs):>4} {f.S_opt:>9.4g} {f.E_min:>10.4g} {f.b_opt:>10.4g} "
                f"{f.b_opt / seq:>9.4g} {'-' if r.b_min is None else f'{r.b_min / seq:.4g}':>9s} "
                f"{f.rmse_log:>7.4f}"
            )
        fitted = [r for r in results if r.fit is not None]
        curve = None
        out = {
            "seq_length": seq,
            "targets": [
                {
                    "target": r.target,
                    "runs": list(r.runs),
                    "S": list(r.S),
                    "E": list(r.E),
                    "fit": r.fit.to_dict() if r.fit else None,
                    "note": r.note,
                }
                for r in results
            ],
        }
        if len(fitted) >= 2:
            curve = bopt_curve(fitted, seq)
            print(
                f"B_opt(D) = {curve.coef:.4g} * D^{curve.exponent:.4f}  (D tokens, B sequences; R^2 "
                f"{curve.r2:.3f} over {curve.n} targets)"
            )
            if curve.exponent > 0:
                print("recipe keys: batch_schedule.kind=bopt " + " ".join(curve.recipe_keys()))
            else:
                print(
                    "B_opt does not grow with D here (exponent <= 0): batch_schedule.kind=bopt needs an "
                    "exponent > 0; keep a constant batch"
                )
            out["bopt_curve"] = curve.to_dict()
        else:
            print(f"B_opt(D): needs fits at two or more targets ({len(fitted)} fitted)")
        rising = [r.fit.b_opt for r in sorted(fitted, key=lambda r: -r.target)]
        out["b_opt_grows_as_loss_falls"] = bool(len(rising) >= 2 and all(np.diff(rising) > 0))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "e_of_s.json").write_text(json.dumps(out, indent=1))
        plot(results, runs, curve, seq, args.out / "e_of_s.png")
        print(f"wrote {args.out / 'e_of_s.json'} and {args.out / 'e_of_s.png'}")
    except RampError as e:
        print(f"ramp: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
