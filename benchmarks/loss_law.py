"""Loss laws with LR annealing: fit on constant + one WSD run, predict six other schedules and two warmups.

moe-tiny on the embedded corpus, one process, batch 8 sequences of 256, LR 2e-3 (calibration.md's optimum),
warmup 2% of the tokens, equal tokens for every run (default 1.23 M = 600 steps at batch 8; nine runs, two
at a time with one torch thread each, took 66 min on 2 cores). Every step is logged (the laws read the LR
and batch actually applied). The fixed validation set (128 sequences, 32,768 tokens: the same set for every
run, so its sampling offset is shared; the seed repeat below measures what is not) is evaluated every 2%
of the run; the batch-warmup runs every 0.5% of their steps, at most 2% of the tokens at their largest
batch. Schedules:

- ``constant``; ``cosine`` (to 0); ``wsd10`` / ``wsd30``: linear decay to 0 over the last 10% / 30%;
  ``wsd-sqrt``: 1-sqrt decay over the last 20% to 0.1; ``two-step``: x0.3 at 50%, x0.09 at 80%;
- ``bw-a``: WSD as wsd-sqrt with the batch 8 -> 16 at 25% -> 32 at 50%; ``bw-b``: 8 -> 16 at 20% -> 32 at
  38% (LR x sqrt(B / 8) at each change, the recipe's ``lr_rule: sqrt``).

Each law (``launcher/laws/loss_curve.py``; the momentum law with lambda from its run-length rule) is fitted
on ``constant`` + ``wsd30`` and predicts all the others from their own LR and batch sequences. Errors are
relative, on the validation points after the first 5% of each run's tokens: ``mape_mean`` is the mean
over held-out schedules of each schedule's mean |error|, ``mape_max`` the worst single held-out point,
``final_error`` the error at each run's last point, ``ordering_correct`` whether the predicted final losses
of all runs sort like the measured ones. ``noise_floor``: the RMS relative difference between the constant
run's validation curve and a repeat of it with another seed (data order and init), over the same points:
what no law can resolve at this scale (a deterministic re-evaluation of one checkpoint on the fixed set gives
the same number, so "repeated evaluation" here is a repeated run).

    python benchmarks/loss_law.py [--tokens 2457600] [--schedules constant wsd30 cosine ...]

Writes ``benchmarks/results/loss_law.json`` and ``loss_law.png``; runs are cached under
``results/loss_law_runs/`` by code version and overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import cache  # noqa: E402
from benchmarks.cache import cached_runs, code_version  # noqa: E402
from launcher.laws.loss_curve import LAWS, Curve, StepSchedule, compare, fit_loss_law  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CODE_PATHS = cache.MOE_TINY_CODE
SEQ = 256
LR = 2e-3
FIT_ON = ("constant", "wsd30")
SKIP_FRAC = 0.05
EVAL_SAMPLES = 128  # one evaluation costs ~1/10 of the run's training at this size; 50-100 of them per run
REPEAT = "constant-seed1"  # the constant schedule again with another seed: the noise floor


def base(tokens: int) -> list[str]:
    steps = tokens // (8 * SEQ)
    return [
        f"training.train_tokens={tokens}",
        "training.micro_batch_size=8",
        "training.global_batch_size=8",
        f"training.eval_samples={EVAL_SAMPLES}",
        f"training.eval_interval={max(1, steps // 50)}",
        "training.log_interval=1",
        "training.threads=1",
        f"schedule.warmup_tokens={round(0.02 * tokens / (8 * SEQ)) * 8 * SEQ}",
        "schedule.warmup_frac=null",
        "checkpoint.interval=0",
        "checkpoint.save_at_exit=false",
        "checkpoint.checksums=false",
        "logging.tensorboard=false",
        "logging.plots=false",
        "logging.wandb.enabled=false",
        f"optimizer.lr={LR}",
    ]


def schedules(tokens: int) -> dict[str, list[str]]:
    def at(f: float) -> int:  # a fraction of the run, on a 32-sequence boundary
        return round(f * tokens / (32 * SEQ)) * 32 * SEQ

    # validation every <= 2% of the tokens at the largest batch (32 = 4x the base's 8 sequences)
    bw_eval = f"training.eval_interval={max(1, tokens // (8 * SEQ) // 200)}"

    wsd_sqrt = [
        "schedule.style=wsd",
        "schedule.decay.shape=1-sqrt",
        "schedule.decay.start_frac=0.8",
        "schedule.min_lr_ratio=0.1",
    ]
    return {
        "constant": ["schedule.style=constant"],
        "cosine": ["schedule.style=cosine", "schedule.min_lr_ratio=0.0"],
        "wsd10": [
            "schedule.style=wsd",
            "schedule.decay.shape=linear",
            "schedule.decay.start_frac=0.9",
            "schedule.min_lr_ratio=0.0",
        ],
        "wsd30": [
            "schedule.style=wsd",
            "schedule.decay.shape=linear",
            "schedule.decay.start_frac=0.7",
            "schedule.min_lr_ratio=0.0",
        ],
        "wsd-sqrt": wsd_sqrt,
        "two-step": [
            "schedule.style=wsd",
            "schedule.decay.shape=points",
            "schedule.decay.start_frac=0.5",
            "schedule.decay.points=[[0, 0.3], [0.6, 0.3], [0.6001, 0.09], [1, 0.09]]",
        ],
        "bw-a": [
            *wsd_sqrt,
            "batch_schedule.kind=steps",
            f"batch_schedule.steps=[[{at(0.25)}, 16], [{at(0.5)}, 32]]",
            bw_eval,
        ],
        "bw-b": [
            *wsd_sqrt,
            "batch_schedule.kind=steps",
            f"batch_schedule.steps=[[{at(0.2)}, 16], [{at(0.38)}, 32]]",
            bw_eval,
        ],
    }


def to_curve(name: str, rec: dict) -> Curve:
    sched = StepSchedule(np.array(rec["lr"]), np.array(rec["global_batch"]), int(rec["seq_length"]))
    val = np.array(rec["val"])
    return Curve(name, sched, val[:, 0].astype(int), val[:, 1])


def held_out_points(c: Curve) -> np.ndarray:
    return c.after(SKIP_FRAC)


def evaluate(curves: dict[str, Curve], lam: str) -> dict:
    out: dict = {"laws": {}, "fits": {}}
    fit_curves = [curves[n] for n in FIT_ON if n in curves]
    held = [n for n in curves if n not in FIT_ON]
    measured_final = {n: float(c.loss[-1]) for n, c in curves.items()}
    for law in LAWS:
        fit = fit_loss_law(fit_curves, law, lam=lam if law == "momentum" else "rule", skip_frac=SKIP_FRAC)
        out["fits"][law] = fit.to_dict()
        per, worst, final = {}, 0.0, {}
        for n in held:
            c = curves[n]
            keep = held_out_points(c)
            sub = Curve(n, c.schedule, c.steps[keep], c.loss[keep])
            cmp = compare(fit, sub)
            per[n], worst, final[n] = cmp.mape, max(worst, cmp.max_ape), cmp.final_error
        pred_final = {n: float(fit.predict_steps(c.schedule, [c.steps[-1]])[0]) for n, c in curves.items()}
        order = sorted(curves, key=lambda n: measured_final[n])
        out["laws"][law] = {
            "mape_mean": float(np.mean(list(per.values()))) if per else None,
            "mape_max": worst if per else None,
            "mape": per,
            "final_error": final,
            "predicted_final": pred_final,
            "ordering_correct": order == sorted(curves, key=lambda n: pred_final[n]),
        }
    scored = {k: v["mape_mean"] for k, v in out["laws"].items() if v["mape_mean"] is not None}
    out["best_law"] = min(scored, key=scored.get) if scored else None
    out["measured_final"] = measured_final
    return out


def noise_floor(a: Curve, b: Curve) -> float:
    keep = held_out_points(a)
    return float(np.sqrt(np.mean((a.loss[keep] / b.loss[keep] - 1.0) ** 2)))


def plot(curves: dict[str, Curve], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from launcher.laws.loss_curve import LossLaw

    fits = [LossLaw.from_dict(d) for d in result["fits"].values()]
    fig, axes = plt.subplots(1, len(fits), figsize=(8 * len(fits), 5.5))
    for ax, fit in zip(np.atleast_1d(axes), fits):
        for n, c in curves.items():
            (pts,) = ax.plot(
                c.tokens / 1e6, c.loss, "o", ms=2.5, label=f"{n}{' (fit)' if n in FIT_ON else ''}"
            )
            ax.plot(c.schedule.tokens / 1e6, fit.predict_steps(c.schedule), "-", lw=1, color=pts.get_color())
        lo = min(float(c.loss.min()) for c in curves.values())
        ax.set_ylim(lo * 0.98, lo * 1.25)
        ax.set(xlabel="tokens (M)", ylabel="validation loss", title=f"{fit.law}: fit on {', '.join(FIT_ON)}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_228_800)
    ap.add_argument("--schedules", nargs="+", default=None, help="subset (always with constant and wsd30)")
    ap.add_argument("--lambda", dest="lam", default="rule", help="momentum law: rule, fit or a value")
    ap.add_argument(
        "--no-repeat", action="store_true", help="skip the repeated constant run (no noise floor)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "loss_law.json")
    ap.add_argument("--cache", type=Path, default=RESULTS / "loss_law_runs")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=2, help="runs trained at once (one torch thread each)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error(f"--workers {args.workers}: must be >= 1")
    lam = args.lam if args.lam in ("rule", "fit") else float(args.lam)
    table = schedules(args.tokens)
    names = list(dict.fromkeys([*FIT_ON, *(args.schedules or table)]))
    version = code_version(CODE_PATHS)
    jobs = {n: [*base(args.tokens), *table[n]] for n in names}
    if not args.no_repeat:
        jobs[REPEAT] = [*base(args.tokens), *table["constant"], "training.seed=1"]

    def report(n: str, rec: dict) -> None:
        print(
            f"{n:14s} final val {rec['val'][-1][1]:.4f}  steps {len(rec['lr'])}  wall {rec['wall_s']:.0f}s",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="loss_law-") as tmp:  # each run: one torch thread
        recs = cached_runs(jobs, version, args.cache, args.work or Path(tmp), args.workers, report)
    repeat = recs.pop(REPEAT, None)
    recs = {n: recs[n] for n in names}
    curves = {n: to_curve(n, r) for n, r in recs.items()}
    result = evaluate(curves, lam)
    result["noise_floor"] = noise_floor(curves["constant"], to_curve("repeat", repeat)) if repeat else None
    result.update(
        code_version=version,
        tokens=args.tokens,
        fit_on=list(FIT_ON),
        schedules=names,
        goal="better law: held-out mape_mean <= 0.003, mape_max <= 0.01, ordering right",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(curves, result, args.out.with_suffix(".png"))
    print(f"\n{'law':12s} {'mean':>8s} {'worst':>8s} {'order':>6s}  final error per schedule")
    for law, r in result["laws"].items():
        fe = " ".join(f"{n} {v * 100:+.2f}%" for n, v in r["final_error"].items())
        mean = f"{r['mape_mean'] * 100:.3f}%" if r["mape_mean"] is not None else "-"
        worst = f"{r['mape_max'] * 100:.3f}%" if r["mape_max"] is not None else "-"
        print(f"{law:12s} {mean:>8s} {worst:>8s} {r['ordering_correct']!s:>6s}  {fe}")
    nf = result["noise_floor"]
    print(
        f"best law: {result['best_law']}; noise floor {nf * 100:.3f}%"
        if nf is not None
        else f"best law: {result['best_law']}; noise floor not measured"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
