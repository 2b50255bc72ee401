"""E(S), B_min and B_opt against the target loss from constant-batch runs (arXiv 2601.05034 at tiny scale).

moe-tiny on the embedded corpus, one process, six or more runs identical except for their constant global
batch (default 2, 4, 8, 16, 24, 32 sequences of 256; micro-batch the largest power of 2 <= 8 dividing it),
the same LR 2e-3 for all (the paper keeps the LR when it changes the batch), constant LR after a 2% warmup
(the WSD stable phase the paper's E(S) covers), equal tokens (default 1.23 M, the loss-law benchmark's runs;
at batch 32 that is 150 steps, so the targets reach down to about the loss batch 32 ends at). Every step is
logged; the fixed validation set (128 sequences, the loss-law benchmark's) is evaluated every 2% of the run.
Runs train two at a time with one torch thread each (``--workers``). Per target loss (``--n-targets``
between the loss six runs reach and the highest loss every run has passed after 10% of its tokens): E and S
per run, the piecewise E(S) fit, B_min and B_opt (``launcher/laws/e_of_s.py``), and the B_opt(D) power law
with the two ``batch_schedule.kind=bopt`` keys. The paper's qualitative claim to check: B_min and B_opt both
grow as the target loss falls.

    python benchmarks/e_of_s.py [--tokens 1228800] [--batches 2 4 8 16 24 32] [--workers 2]

Writes ``benchmarks/results/e_of_s.json`` (``target_loss``, ``b_min``, ``b_opt`` as equal-length lists, in
sequences; ``bopt_coef``, ``bopt_exponent``; ``grows_as_loss_falls``) and ``e_of_s.png``; runs are cached
under ``results/e_of_s_runs/`` by code version and overrides.
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
from launcher.laws.e_of_s import MIN_POINTS, BatchRun, analyse, bopt_curve  # noqa: E402
from tools.fit_e_of_s import auto_targets, plot  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CODE_PATHS = cache.MOE_TINY_CODE
SEQ = 256
LR = 2e-3


def sets(tokens: int, batch: int) -> list[str]:
    steps = tokens // (batch * SEQ)
    micro = max(m for m in (1, 2, 4, 8) if batch % m == 0)  # divides the 128 validation sequences too
    return [
        f"training.train_tokens={tokens}",
        f"training.micro_batch_size={micro}",
        f"training.global_batch_size={batch}",
        "training.eval_samples=128",
        f"training.eval_interval={max(1, steps // 50)}",
        "training.log_interval=1",
        "training.threads=1",
        "schedule.style=constant",
        f"schedule.warmup_tokens={round(0.02 * tokens / SEQ) * SEQ}",
        "schedule.warmup_frac=null",
        "checkpoint.interval=0",
        "checkpoint.save_at_exit=false",
        "checkpoint.checksums=false",
        "logging.tensorboard=false",
        "logging.plots=false",
        "logging.wandb.enabled=false",
        f"optimizer.lr={LR}",
    ]


def to_batch_run(name: str, rec: dict) -> BatchRun:
    val = np.array(rec["val"])
    lr = np.array(rec["lr"])
    keep = lr[val[:, 0].astype(int) - 1] >= lr.max() * (1 - 1e-9)  # stable phase: after warmup
    batch = int(rec["global_batch"][0])
    tokens = val[:, 0] * batch * rec["seq_length"]
    return BatchRun(name, batch, int(rec["seq_length"]), tokens[keep], val[keep, 1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_228_800)
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8, 16, 24, 32])
    ap.add_argument("--n-targets", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS / "e_of_s.json")
    ap.add_argument("--cache", type=Path, default=RESULTS / "e_of_s_runs")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        help="runs trained at once (each run has one torch thread whatever this is: the same cached runs)",
    )
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error(f"--workers {args.workers}: must be >= 1")
    args.batches = list(dict.fromkeys(args.batches))  # a batch given twice is one run
    if len(args.batches) < MIN_POINTS:
        ap.error(f"--batches: give at least {MIN_POINTS} different batches (E(S) has six parameters)")
    version = code_version(CODE_PATHS)
    jobs = {f"b{b}": sets(args.tokens, b) for b in args.batches}

    def report(name: str, rec: dict) -> None:
        print(
            f"batch {name[1:]:>4s}: {len(rec['lr'])} steps, final val {rec['val'][-1][1]:.4f}, "
            f"wall {rec['wall_s']:.0f}s",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="e_of_s-") as tmp:  # each run: one torch thread
        recs = cached_runs(jobs, version, args.cache, args.work or Path(tmp), args.workers, report)
    runs = [to_batch_run(name, recs[name]) for name in jobs]  # in batch order
    targets = auto_targets(runs, args.n_targets, 0.1)
    results = analyse(runs, targets)
    fitted = [r for r in results if r.fit is not None]
    curve = bopt_curve(fitted, SEQ) if len(fitted) >= 2 else None
    out = {
        "code_version": version,
        "tokens": args.tokens,
        "batches": args.batches,
        "target_loss": [r.target for r in fitted],
        "b_min": [
            r.b_min / SEQ if r.b_min is not None else None for r in fitted
        ],  # None: linear stage unmeasured
        "b_opt": [r.b_opt / SEQ for r in fitted],
        "e_min": [r.fit.E_min for r in fitted],
        "fit_rmse_log": [r.fit.rmse_log for r in fitted],
        "skipped_targets": {f"{r.target:.4f}": r.note for r in results if r.fit is None},
        "bopt_coef": curve.coef if curve else None,
        "bopt_exponent": curve.exponent if curve else None,
        "bopt_r2": curve.r2 if curve else None,
    }
    falling = sorted(range(len(fitted)), key=lambda i: -out["target_loss"][i])

    def grows(key: str) -> bool | None:
        """Whether ``key`` rises as the target falls, over the targets where it is measured (None: < 2)."""
        seq = [out[key][i] for i in falling if out[key][i] is not None]
        return bool(all(np.diff(seq) > 0)) if len(seq) >= 2 else None

    out["grows_as_loss_falls"] = {k: grows(k) for k in ("b_min", "b_opt")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    plot(results, runs, curve, SEQ, args.out.with_suffix(".png"))
    print(f"\n{'target':>8s} {'B_min':>8s} {'B_opt':>8s} {'E_min':>10s}  (batches in sequences)")
    for t, bm, bo, e in zip(out["target_loss"], out["b_min"], out["b_opt"], out["e_min"]):
        print(f"{t:8.4f} {'-' if bm is None else f'{bm:.3g}':>8s} {bo:8.3g} {e:10.4g}")
    for t, note in out["skipped_targets"].items():
        print(f"{t:>8s}  skipped: {note}")
    if curve:
        print(
            f"B_opt(D) = {curve.coef:.4g} D^{curve.exponent:.4f} (R^2 {curve.r2:.3f}); recipe keys: "
            + " ".join(curve.recipe_keys())
        )
    print(f"grows as the loss falls: {out['grows_as_loss_falls']}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
