"""Does the optimal LR transfer across width? An LR sweep of the tiny MoE at 3+ widths, standard vs muP.

    python benchmarks/lr_transfer.py                 # the full sweep (restartable: finished runs are cached)
    python benchmarks/lr_transfer.py --report-only   # table, JSON and PNG from the cached runs

Every run trains the same width family as ``tools/mup_coord_check.py`` (hidden = width, 4 heads, expert
hidden = width, muP base shape = the smallest width) on the same data in the same order for the same
number of tokens, with the recipe's WSD schedule, and is scored by ramp's evaluation: the loss on the
fixed validation set at the end. At the base width the two parameterisations are the same model (muP
with every ratio 1 is bitwise the standard run, tests/dist/test_mup_training.py), so those runs are
shared. Per width the optimal LR is the vertex of the parabola in log LR (``laws/lr_law.fit_lr_curve``)
fitted to the grid argmin and up to two neighbours on each side (the parabola is a local model;
diverged runs far from the optimum would bend it). Goal: under muP the optimum moves by less than 1.5x
across a 4x width change, under standard parameterisation by more.

Writes benchmarks/results/lr_transfer.json (``optimal_lr``: parameterisation -> width -> lr; ``shift``:
parameterisation -> largest / smallest optimal lr across widths) and benchmarks/results/lr_transfer.png;
finished runs are cached as JSON in benchmarks/results/lr_transfer_runs/ (delete it to start afresh).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.errors import RampError  # noqa: E402
from launcher.laws.lr_law import CurveFit, fit_lr_curve  # noqa: E402
from tools.mup_coord_check import width_sets  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PARAMETRISATIONS = ("standard", "mup")

# One run: 2 layers, 4 experts (top-2), seq 128, batch 16 sequences; the recipe's WSD schedule (1-sqrt
# decay over the last 20%) with a 5% warmup, AdamW wd 0.1, clip 1.0.
RUN_SETS = [
    "model.num_layers=2",
    "model.num_experts=4",
    "model.moe_router_topk=2",
    "model.seq_length=128",
    "training.micro_batch_size=16",
    "training.global_batch_size=16",
    "training.train_tokens=null",
    "training.eval_interval=0",
    "training.log_interval=1000000",
    "training.eval_samples=128",
    "schedule.style=wsd",
    "schedule.warmup_frac=0.05",
    "checkpoint.save_at_exit=false",
    "logging.tensorboard=false",
    "logging.plots=false",
    "logging.wandb.enabled=false",
]


def run_sets(par: str, width: int, base_width: int, lr: float, steps: int, extra: list[str]) -> list[str]:
    return [
        *RUN_SETS,
        *width_sets(width, base_width, par == "mup"),
        f"optimizer.lr={lr!r}",
        f"training.train_steps={steps}",
        *extra,
    ]


def run_key(sets: list[str]) -> str:
    """Cache key: the run's full override list (any change of setup is a new run)."""
    return hashlib.sha1("\n".join(sets).encode()).hexdigest()[:12]


def train_one(sets: list[str], steps: int, work: Path) -> dict:
    """Train in this process; the final loss on ramp's fixed validation set, plus the train losses.

    A run whose loss or gradients become non-finite has diverged: it stops there with ``val_loss`` NaN
    (the fit drops it).
    """
    from tools.mup_coord_check import trainer_for

    t0 = time.perf_counter()
    losses: list[float] = []
    val, note = math.nan, ""
    with trainer_for(sets, work) as trainer:
        try:
            for _ in range(steps):
                trainer._emit("on_step_start")
                losses.append(trainer.train_step()["lm_loss"])
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(f"loss {losses[-1]} at step {len(losses)}")
            val = trainer.evaluate()["val_loss"]
        except (FloatingPointError, RuntimeError) as e:
            # megatron's grad check raises RuntimeError("... found NaN/Inf in local grad norm ...")
            if isinstance(e, RuntimeError) and "NaN" not in str(e) and "Inf" not in str(e):
                raise
            note = f"diverged at step {len(losses) + 1}: {str(e).splitlines()[0][-160:]}"
        tokens = trainer.state.consumed_tokens
    return {
        "val_loss": val,
        "train_loss_last": losses[-1] if losses else math.nan,
        "steps_done": len(losses),
        "tokens": tokens,
        "seconds": round(time.perf_counter() - t0, 1),
        "note": note,
    }


def fit_width(lrs: list[float], losses: list[float]) -> tuple[CurveFit | None, list[int], str]:
    """The parabola in log LR through the grid argmin and up to two neighbours each side (finite only)."""
    pts = sorted((lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss))
    if len(pts) < 3:
        return None, [], "fewer than 3 finite runs"
    i = min(range(len(pts)), key=lambda k: pts[k][1])
    lo, hi = max(0, i - 2), min(len(pts), i + 3)
    while hi - lo < 3:  # argmin at an end of the grid: take 3 points there
        lo, hi = (lo, hi + 1) if lo == 0 else (lo - 1, hi)
    window = pts[lo:hi]
    note = "" if 0 < i < len(pts) - 1 else "grid argmin at the edge of the grid: the optimum is not bracketed"
    try:
        fit = fit_lr_curve([p[0] for p in window], [p[1] for p in window])
    except RampError as e:  # not convex: no optimum inside the window
        return None, [], f"no fit: {e}"
    used = [lrs.index(p[0]) for p in window]
    if not fit.bracketed:
        note = (note + "; " if note else "") + "fitted optimum outside the fitted LRs (extrapolated)"
    if not fit.r2 >= 0.5:  # the losses barely depend on the LR there: the vertex is noise-dominated
        note = (note + "; " if note else "") + f"flat curve, vertex poorly determined (R^2 {fit.r2:.2f})"
    return fit, used, note


def lr_grid(lo: float, hi: float, points: int) -> list[float]:
    return [float(f"{lo * (hi / lo) ** (k / (points - 1)):.3g}") for k in range(points)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--lr-min", type=float, default=5e-4)
    ap.add_argument("--lr-max", type=float, default=3.2e-2)
    ap.add_argument("--points", type=int, default=7, help="log-spaced LRs from --lr-min to --lr-max")
    ap.add_argument("--steps", type=int, default=80, help="optimizer steps per run (16 x 128 tokens each)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--cache", type=Path, default=RESULTS / "lr_transfer_runs")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where lr_transfer.json/.png go")
    ap.add_argument("--report-only", action="store_true", help="no training: report the cached runs")
    args = ap.parse_args(argv)
    widths = sorted(args.widths)
    base = widths[0]
    lrs = lr_grid(args.lr_min, args.lr_max, args.points)
    args.cache.mkdir(parents=True, exist_ok=True)

    # Runs to do, base width once (shared by both parameterisations), cheapest first.
    plan: list[tuple[str, int, float]] = []
    for w in widths:
        for par in PARAMETRISATIONS:
            if w == base and par == "mup":
                continue
            plan += [(par, w, lr) for lr in lrs]
    runs: dict[tuple[str, int, float], dict] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ramp-lr-transfer-") as tmp:
        for n, (par, w, lr) in enumerate(plan, 1):
            sets = run_sets(par, w, base, lr, args.steps, args.sets)
            path = args.cache / f"{par}-w{w}-lr{lr:g}-{run_key(sets)}.json"
            if path.exists():
                runs[(par, w, lr)] = json.loads(path.read_text())
                continue
            if args.report_only:
                continue
            res = train_one(sets, args.steps, Path(tmp) / path.stem)
            res.update(parametrisation=par, width=w, lr=lr, overrides=sets)
            path.write_text(json.dumps(res, indent=2) + "\n")
            runs[(par, w, lr)] = res
            print(
                f"[{n}/{len(plan)}] {par:<8} width {w:>4} lr {lr:<8g} val {res['val_loss']:.4f} "
                f"({res['seconds']:.0f}s, {(time.perf_counter() - t_start) / 60:.1f} min so far) "
                f"{res['note']}",
                flush=True,
            )
    for lr in lrs:  # the base width's runs stand for both parameterisations
        if ("standard", base, lr) in runs:
            runs[("mup", base, lr)] = runs[("standard", base, lr)]
    return report(runs, widths, lrs, args)


def report(runs: dict, widths: list[int], lrs: list[float], args) -> int:
    curves: dict = {}
    optimal: dict = {}
    fits: dict = {}
    for par in PARAMETRISATIONS:
        curves[par], optimal[par], fits[par] = {}, {}, {}
        for w in widths:
            losses = [runs.get((par, w, lr), {}).get("val_loss", math.nan) for lr in lrs]
            curves[par][str(w)] = losses
            fit, used, note = fit_width(lrs, losses)
            finite = [(lo, lr) for lo, lr in zip(losses, lrs) if math.isfinite(lo)]
            grid_best = min(finite)[1] if finite else math.nan
            fits[par][str(w)] = {
                "lr_star": fit.lr_star if fit else math.nan,
                "L_min": fit.L_min if fit else math.nan,
                "C": fit.C if fit else math.nan,
                "r2": fit.r2 if fit else math.nan,
                "fit_lrs": [lrs[i] for i in used],
                "grid_argmin": grid_best,
                "note": note,
            }
            if fit:
                optimal[par][str(w)] = fit.lr_star
    shift = {
        par: (max(v.values()) / min(v.values()) if len(v) == len(widths) else math.nan)
        for par, v in optimal.items()
    }

    print(f"\nfinal validation loss ({args.steps} steps of 16 x 128 tokens; '-' = not run or diverged)")
    head = (
        f"{'param.':<9}{'width':>6} "
        + "".join(f"{lr:>9g}" for lr in lrs)
        + f"{'lr* (fit)':>12}{'grid best':>11}"
    )
    print(head)
    for par in PARAMETRISATIONS:
        for w in widths:
            row = "".join(f"{x:>9.4f}" if math.isfinite(x) else f"{'-':>9}" for x in curves[par][str(w)])
            f = fits[par][str(w)]
            print(f"{par:<9}{w:>6} {row}{f['lr_star']:>12.3g}{f['grid_argmin']:>11g}  {f['note']}")
    ratio = widths[-1] / widths[0]
    for par in PARAMETRISATIONS:
        print(f"{par}: optimal LR moves x{shift[par]:.2f} across a {ratio:g}x width change")
    goal = shift["mup"] < 1.5 and shift["standard"] > shift["mup"]
    print(f"goal (muP < 1.5x and standard moves more): {'met' if goal else 'NOT met'}")

    result = {
        "optimal_lr": optimal,
        "shift": shift,
        "goal_met": goal,
        "widths": widths,
        "lrs": lrs,
        "val_loss": curves,
        "fits": fits,
        "steps": args.steps,
        "tokens_per_run": args.steps * 16 * 128,
        "setup": {
            "overrides": RUN_SETS + args.sets,
            "family": "hidden = width, 4 heads, expert hidden = width, base shape = smallest width",
            "score": "final loss on ramp's fixed validation set (training.eval_samples sequences)",
            "fit": "parabola in ln(lr) through the grid argmin and up to 2 neighbours each side",
        },
        "seconds_total": sum(
            r.get("seconds", 0.0) for k, r in runs.items() if k[0] == "standard" or k[1] != widths[0]
        ),
        # how to reproduce (a --report-only pass over the cached runs gives the same file)
        "command": " ".join(
            ["python benchmarks/lr_transfer.py", *(a for a in sys.argv[1:] if a != "--report-only")]
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lr_transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(curves, fits, widths, lrs, shift, args.out / "lr_transfer.png")
    print(f"wrote {args.out / 'lr_transfer.json'} and {args.out / 'lr_transfer.png'}")
    return 0


def plot(curves: dict, fits: dict, widths: list[int], lrs: list[float], shift: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, par in zip(axes, PARAMETRISATIONS):
        for i, w in enumerate(widths):
            color = cmap(i / max(len(widths) - 1, 1))
            ys = curves[par][str(w)]
            ax.plot(lrs, ys, "o", color=color, label=f"width {w}")
            f = fits[par][str(w)]
            if math.isfinite(f["lr_star"]):
                xs = np.geomspace(min(f["fit_lrs"]), max(f["fit_lrs"]), 50)
                ax.plot(
                    xs, f["L_min"] + f["C"] * (np.log(xs) - math.log(f["lr_star"])) ** 2, "-", color=color
                )
                ax.axvline(f["lr_star"], color=color, ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_title(f"{par}: optimum moves x{shift[par]:.2f}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    finite = [y for par in curves for w in curves[par] for y in curves[par][w] if math.isfinite(y)]
    if finite:  # diverged or far-off points may leave the frame; the optimum region is what matters
        lo = min(finite)
        axes[0].set_ylim(lo - 0.05, min(max(finite), lo + 1.5) + 0.05)
    axes[0].set_ylabel("final validation loss")
    fig.suptitle("LR transfer across width, tiny MoE (curves: fitted parabola in log LR; dotted: lr*)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
