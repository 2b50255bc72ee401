"""Fit loss-curve laws with LR annealing to runs; predict, compare and plan schedules (ramp-fit-loss).

    ramp-fit-loss runs/const runs/wsd                       # fit both laws on the validation loss
    ramp-fit-loss runs/const runs/wsd --law multi-power --compare runs/cosine
    ramp-fit-loss --fit loss_fit/fit.json --predict --set schedule.style=cosine
    ramp-fit-loss --fit loss_fit/fit.json --predict --lr-points 0:2e-3 2M:2e-3 2.4M:2e-4 --batch 8
    ramp-fit-loss --fit loss_fit/fit.json --choose-decay --budget 4M

Each run directory holds ``metrics.jsonl`` and ``config.yaml`` as ``ramp-train`` writes them. The LR and
batch of every step are read from the train records when every step is logged; otherwise they are rebuilt
from ``config.yaml`` (the trainer's own schedule code) and checked against every logged record. The law
(``launcher/laws/loss_curve.py``) is fitted on the validation loss (``--loss train``: the logged training
loss, far noisier). ``fit.json`` and ``fit.png`` (measured vs fitted, predictions and comparisons) go to
``--out``.

``--predict`` builds a schedule from a recipe (``--recipe``, default the first fitted run's
``config.yaml``, with ``--set`` overrides: ``schedule.*``, ``batch_schedule.*``, ``training.train_tokens``,
``optimizer.lr``) or from ``--lr-points TOKENS:LR ...`` (linear in tokens; the recipe's batch schedule,
if any, sets the batch and multiplies the LR by its rule). ``--choose-decay`` searches WSD decay starts
(``--starts``) and shapes (``--shapes``) for a token budget and prints the best with its alternatives.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from launcher.errors import RampError, require
from launcher.laws.loss_curve import (
    LAWS,
    Curve,
    LossLaw,
    StepSchedule,
    choose_decay,
    compare,
    fit_loss_law,
    schedule_from_factor,
)
from launcher.laws.units import parse_count

LOSS_KINDS = ("val", "train")
DEFAULT_SHAPES = ("linear", "1-sqrt", "cosine")
DEFAULT_STARTS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


# -- reading runs ------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of ``run_dir/metrics.jsonl``, sorted by step."""
    path = Path(run_dir) / "metrics.jsonl"
    require(path.exists(), f"{run_dir}: no metrics.jsonl (give a run directory that ramp-train wrote)")
    train, evals = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise RampError(f"{path}: line {i} is not JSON") from None
        (evals if "val_loss" in rec else train).append(rec)
    require(bool(train), f"{path}: no train records")
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def schedule_from_recipe(r: Any, lr_points: list[tuple[float, float]] | None = None) -> StepSchedule:
    """The per-step LR and batch the trainer applies for recipe ``r`` (``lr_points``: the LR at the first
    batch, linear in tokens, instead of the recipe's schedule; the run ends at the last point)."""
    from launcher.laws.batch_size import resolve_batch_schedule, simulate
    from launcher.laws.schedule import resolve_schedule

    m, t = r.model, r.training
    seq, b0 = m.seq_length, t.global_batch_size
    if lr_points:
        requested = int(max(p[0] for p in lr_points))
    else:
        requested = t.train_tokens if t.train_tokens is not None else t.train_steps * b0 * seq
    lr0 = resolve_schedule(r.schedule, requested, b0 * seq, r._warmup_tokens(requested, b0 * seq))
    bs = resolve_batch_schedule(
        r.batch_schedule, b0, requested, seq, lr0.factor, lr_peak_tokens=lr0.warmup_tokens
    )
    plan = simulate(bs, requested, seq)
    phases = [(p.steps, p.batch) for p in plan]
    if lr_points:
        xs = np.array([p[0] for p in lr_points], dtype=float)
        ys = np.array([p[1] for p in lr_points], dtype=float)
        return schedule_from_factor(lambda tok: float(np.interp(tok, xs, ys)), 1.0, seq, phases, bs.lr_scale)
    # the trainer's schedule is resolved on the simulated run's tokens (Recipe.derive)
    total = plan[-1].end_tokens
    lr = resolve_schedule(r.schedule, total, b0 * seq, r._warmup_tokens(total, b0 * seq))
    return schedule_from_factor(lr.factor, r.optimizer.lr, seq, phases, bs.lr_scale)


def read_run(run_dir: Path, loss: str = "val") -> Curve:
    """A run's loss curve with the LR and batch of every step."""
    require(loss in LOSS_KINDS, f"--loss {loss!r}: choose one of {', '.join(LOSS_KINDS)}")
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    steps = [r["step"] for r in train]
    last = steps[-1]
    if steps == list(range(1, last + 1)) and all("global_batch" in r for r in train):
        cfg = run_dir / "config.yaml"
        seq = _seq_length(cfg, train)
        sched = StepSchedule(
            np.array([r["lr"] for r in train]), np.array([r["global_batch"] for r in train]), seq
        )
    else:
        cfg = run_dir / "config.yaml"
        require(
            cfg.exists(),
            f"{run_dir}: metrics.jsonl logs only some steps and there is no config.yaml to rebuild the "
            f"others from; rerun with training.log_interval=1 or keep the run's config.yaml",
        )
        from launcher.recipe import load

        sched = schedule_from_recipe(load(cfg))
        require(
            sched.steps >= last,
            f"{run_dir}: metrics.jsonl reaches step {last} but its config.yaml gives {sched.steps} steps",
        )
        for r in train:
            want = sched.lr[r["step"] - 1]
            require(
                abs(r["lr"] - want) <= 1e-6 * max(abs(want), 1e-12) + 1e-12
                and r.get("global_batch", sched.batch[r["step"] - 1]) == sched.batch[r["step"] - 1],
                f"{run_dir}: step {r['step']} logged lr {r['lr']:.6g} batch {r.get('global_batch')}, but "
                f"its config.yaml gives {want:.6g} batch {sched.batch[r['step'] - 1]:g}; the run's "
                f"schedule cannot be rebuilt: log every step (training.log_interval=1)",
            )
        sched = StepSchedule(sched.lr[:last], sched.batch[:last], sched.seq_length)
    if loss == "val":
        require(
            bool(evals), f"{run_dir}: no validation records (set training.eval_interval, or --loss train)"
        )
        pts = [(e["step"], e["val_loss"]) for e in evals if 1 <= e["step"] <= last]  # step 0: before training
    else:
        pts = [(r["step"], r["loss"]) for r in train]
    return Curve(run_dir.name, sched, np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))


def _seq_length(cfg: Path, train: list[dict]) -> int:
    """Tokens per sequence: from the tokens and batch of the first record."""
    r = train[0]
    seq = r["tokens"] // (r["global_batch"] * r["step"]) if r["step"] == 1 else None
    if seq:
        return int(seq)
    from launcher.recipe import load

    require(cfg.exists(), f"{cfg.parent}: cannot tell the sequence length (no step-1 record, no config.yaml)")
    return load(cfg).model.seq_length


# -- output ------------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x * 100:.3f}%"


def plot(
    fits: list[LossLaw],
    fitted: list[Curve],
    others: list[Curve],
    predicted: dict[str, StepSchedule],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = ["-", "--", ":"]
    for c, role in [*((c, "fit") for c in fitted), *((c, "predicted") for c in others)]:
        (pts,) = ax.plot(c.tokens / 1e6, c.loss, "o", ms=3, label=f"{c.name} (measured)")
        for f, ls in zip(fits, styles):
            tok = c.schedule.tokens
            ax.plot(
                tok / 1e6,
                f.predict_steps(c.schedule),
                ls,
                color=pts.get_color(),
                lw=1,
                label=f"{f.law} {role}",
            )
    for name, s in predicted.items():
        for f, ls in zip(fits, styles):
            ax.plot(s.tokens / 1e6, f.predict_steps(s), ls, lw=1.2, label=f"{name}: {f.law}")
    lo = min([float(c.loss.min()) for c in [*fitted, *others]] or [0.0])
    ax.set_ylim(bottom=lo * 0.97, top=lo * 1.35 if lo > 0 else None)
    ax.set(xlabel="tokens (M)", ylabel="loss", title="loss law: measured (dots) vs fitted / predicted")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _points(specs: list[str]) -> list[tuple[float, float]]:
    out = []
    for s in specs:
        parts = s.split(":")
        tok, lr = (parse_count(parts[0]), parts[1]) if len(parts) == 2 else (None, None)
        try:
            out.append((float(tok), float(lr)))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise RampError(f"--lr-points {s!r}: give TOKENS:LR pairs such as 0:2e-3 1.2M:2e-4") from None
        require(out[-1][0] >= 0 and out[-1][1] >= 0, f"--lr-points {s!r}: tokens and LR must be >= 0")
    require(len(out) >= 2, "--lr-points: give at least two TOKENS:LR pairs")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ramp-fit-loss", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="run directories to fit on (jointly)")
    ap.add_argument("--law", choices=[*LAWS, "both"], default="both")
    ap.add_argument("--loss", choices=LOSS_KINDS, default="val", help="validation (default) or train loss")
    ap.add_argument(
        "--lambda", dest="lam", default="rule", help="momentum law: rule (default), fit or a value"
    )
    ap.add_argument(
        "--skip-frac",
        type=float,
        default=0.05,
        help="leave out points in this first fraction of each run's tokens",
    )
    ap.add_argument("--fit", type=Path, help="a fit.json to use instead of fitting runs")
    ap.add_argument("--out", type=Path, default=Path("loss_fit"), help="where fit.json and fit.png go")
    ap.add_argument("--compare", action="append", type=Path, default=[], metavar="RUN", help="measured run")
    ap.add_argument(
        "--predict", action="store_true", help="predict the schedule of --recipe/--set/--lr-points"
    )
    ap.add_argument("--recipe", help="recipe for --predict/--choose-decay (default: first run's config.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--lr-points", nargs="+", metavar="TOKENS:LR", help="a schedule as (tokens, lr) points")
    ap.add_argument("--batch", type=int, help="global batch (sequences) for --lr-points")
    ap.add_argument("--choose-decay", action="store_true", help="search WSD decay start and shape")
    ap.add_argument("--budget", help="tokens for --choose-decay (default: the recipe's train_tokens)")
    ap.add_argument("--starts", type=float, nargs="+", default=list(DEFAULT_STARTS))
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    ap.add_argument("--top", type=int, default=5, help="alternatives printed by --choose-decay")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except RampError as e:
        print(f"ramp: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from launcher.laws.schedule import SHAPES
    from launcher.recipe import load

    require(bool(args.runs) or args.fit is not None, "give run directories to fit, or --fit FIT.json")
    require(not (args.runs and args.fit), "give run directories or --fit, not both")
    require(0.0 <= args.skip_frac < 1.0, f"--skip-frac {args.skip_frac}: must be in [0, 1)")
    lam: Any = args.lam
    if lam not in ("rule", "fit"):
        try:
            lam = float(lam)
        except ValueError:
            raise RampError(f"--lambda {args.lam!r}: give rule, fit or a number in [0, 1)") from None
        require(0.0 <= lam < 1.0, f"--lambda {lam}: must be in [0, 1)")
    for s in args.shapes:
        require(s in SHAPES[:-1], f"--shapes {s!r}: choose from {', '.join(SHAPES[:-1])}")
    for f in args.starts:
        require(0.0 < f < 1.0, f"--starts {f}: a decay start is a fraction of the run in (0, 1)")
    if args.lr_points:
        require(args.predict, "--lr-points needs --predict")
    # everything the user gave is read before the fit starts
    points = _points(args.lr_points) if args.lr_points else None
    fitted = [read_run(p, args.loss) for p in args.runs]
    others = [read_run(p, args.loss) for p in args.compare]
    recipe = None
    if args.predict or args.choose_decay:
        src = args.recipe or (args.runs[0] / "config.yaml" if args.runs else None)
        require(src is not None, "--predict/--choose-decay with --fit need --recipe (the run's config.yaml)")
        sets = list(args.overrides)
        if args.batch is not None:
            sets.append(f"training.global_batch_size={args.batch}")
        recipe = load(str(src), sets)

    out: dict[str, Any] = {"loss": args.loss}
    if args.fit is not None:
        require(args.fit.exists(), f"--fit {args.fit}: no such file")
        try:
            saved = json.loads(args.fit.read_text())
        except json.JSONDecodeError:
            raise RampError(f"--fit {args.fit}: not a fit.json (invalid JSON)") from None
        require(isinstance(saved, dict) and "fits" in saved, f"--fit {args.fit}: no 'fits' in it")
        fits = [LossLaw.from_dict(d) for d in saved["fits"] if args.law in ("both", d.get("law"))]
        require(bool(fits), f"--fit {args.fit}: holds no {args.law} fit")
    else:
        laws = list(LAWS) if args.law == "both" else [args.law]
        fits = [fit_loss_law(fitted, law, lam=lam, skip_frac=args.skip_frac) for law in laws]
    out["fits"] = [f.to_dict() for f in fits]
    for f in fits:
        print(f.describe())
        for c in fitted:
            cmp = compare(f, c)
            print(
                f"  in-sample {c.name}: mean |err| {_pct(cmp.mape)}, max {_pct(cmp.max_ape)}, "
                f"final {cmp.final_error * 100:+.3f}%"
            )
    out["compare"] = {}
    for c in others:
        for f in fits:
            cmp = compare(f, c)
            out["compare"].setdefault(c.name, {})[f.law] = cmp.__dict__
            print(
                f"compare {c.name} ({f.law}): mean |err| {_pct(cmp.mape)}, max {_pct(cmp.max_ape)}, final "
                f"{cmp.final_pred:.4f} predicted vs {cmp.final_obs:.4f} measured "
                f"({cmp.final_error * 100:+.3f}%)"
            )
    predicted: dict[str, StepSchedule] = {}
    if args.predict:
        sched = schedule_from_recipe(recipe, points)
        label = "lr-points" if points else "recipe schedule"
        predicted[label] = sched
        out["predict"] = {"steps": sched.steps, "tokens": float(sched.tokens[-1]), "final_loss": {}}
        for f in fits:
            curve = f.predict_steps(sched)
            out["predict"]["final_loss"][f.law] = float(curve[-1])
            marks = sorted({max(1, round(q * sched.steps)) for q in (0.25, 0.5, 0.75, 1.0)})
            along = ", ".join(f"{sched.tokens[s - 1] / 1e6:.3g}M: {curve[s - 1]:.4f}" for s in marks)
            print(f"predict {label} ({f.law}): {sched.steps} steps, final loss {curve[-1]:.4f}  [{along}]")
        out["predict"]["curve"] = {
            f.law: [[float(t), float(v)] for t, v in zip(sched.tokens, f.predict_steps(sched))] for f in fits
        }
    if args.choose_decay:
        budget = parse_count(args.budget) if args.budget is not None else None
        if budget is not None:
            require(
                isinstance(budget, (int, float)) and budget > 0,
                f"--budget {args.budget!r}: give tokens, e.g. 4M",
            )
        out["choose_decay"] = {}
        for f in fits:

            def make(start: float, shape: str, f=f) -> StepSchedule:
                sets = [
                    "schedule.style=wsd",
                    f"schedule.decay.shape={shape}",
                    f"schedule.decay.start_frac={start}",
                    "schedule.decay.length_frac=null",
                    "schedule.decay.start_tokens=null",
                    "schedule.decay.length_tokens=null",
                    "schedule.decay.start_steps=null",
                    "schedule.decay.length_steps=null",
                ]
                if budget is not None:
                    sets += [f"training.train_tokens={int(budget)}", "training.train_steps=null"]
                return schedule_from_recipe(load(recipe.to_dict(), sets))

            ranked = choose_decay(f, make, args.starts, args.shapes)
            best = ranked[0]
            print(
                f"choose-decay ({f.law}): best WSD decay from {best.start_frac:.0%} of the run, "
                f"{best.shape}: "
                f"predicted final loss {best.final_loss:.4f}"
            )
            for c in ranked[1 : 1 + args.top]:
                print(
                    f"  alternative: from {c.start_frac:.0%}, {c.shape}: {c.final_loss:.4f} "
                    f"({c.final_loss - best.final_loss:+.4f})"
                )
            out["choose_decay"][f.law] = [c.__dict__ for c in ranked]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fit.json").write_text(json.dumps(out, indent=1))
    plot(fits, fitted, others, predicted, args.out / "fit.png")
    print(f"wrote {args.out / 'fit.json'} and {args.out / 'fit.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
