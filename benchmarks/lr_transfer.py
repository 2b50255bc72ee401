"""Does the optimal LR transfer across width (and depth)? An LR sweep of the tiny MoE, standard vs muP.

    python benchmarks/lr_transfer.py                 # the full sweep (restartable: finished runs are cached)
    python benchmarks/lr_transfer.py --report-only   # table, JSON and PNG from the cached runs

Every run trains the same width family as ``tools/mup_coord_check.py`` (hidden = width, 4 heads, expert
hidden = width, muP base shape = the smallest width, 2 layers) on the same data in the same order for the
same number of tokens (240 steps x 16 x 128 = 0.49 M tokens by default), with the recipe's WSD schedule,
and is scored by ramp's evaluation: the loss on the fixed validation set at the end. It is also evaluated
at 6 points along the run (``val_curve``, the stable-phase losses that ``ramp-fit-lr-law`` extrapolates
in D). Runs train ``--workers`` at a time (default 2), each in its own process with one torch thread.

Stages, most important first: (1) the base shape under standard parameterisation over the LR grid;
(2) muP's base-shape logit multiplier (``mup.output_mult``, candidates ``--output-mults``) tuned on the
base shape at (1)'s best LR: muP transfers the base's hyper-parameters, it does not choose them, and this
family's base is far from its best at a multiplier of 1 (x4 gave 0.43 lower loss at width 64 when first
tried); (3) muP's base shape over the LR grid with that multiplier; (4) the wider models, LRs nearest the
base optimum first, and the depth arm, which trains the base width at 4 layers (muP base: 2 layers,
Depth-muP residual multiplier). At the base shape with a multiplier of 1 the two parameterisations are
the same model (muP with every ratio 1 is bitwise the standard run, tests/dist/test_mup_training.py), so
those runs are shared. Seeds: the muP width arms run ``--seeds``, standard parameterisation
``--standard-seeds``, the depth arm ``--depth-seeds``.

Per (parameterisation, shape, seed) the optimal LR is the vertex of the parabola in log LR
(``laws/lr_law.fit_lr_curve``) fitted to the grid argmin and up to two neighbours on each side (the
parabola is a local model; diverged runs far from the optimum would bend it); its R^2 is reported.
Goal: under muP the optimum moves by less than 1.3x across the 4x width change, and less than under
standard parameterisation; muP's best loss does not increase with width; on every seed.

Writes benchmarks/results/lr_transfer.json (``optimal_lr``: parameterisation -> width -> lr, seed-mean
curves; ``shift``: parameterisation -> largest / smallest optimal lr across widths; ``best_loss``:
parameterisation -> width -> best final loss on the grid, seed mean; ``goal_met``; ``per_seed`` and
``depth`` with the same per seed and for the depth arm; ``output_mult``: the tuned logit multiplier and
the loss of each candidate) and benchmarks/results/lr_transfer.png. Finished runs are cached as JSON in
benchmarks/results/lr_transfer_runs/<code version>/ (the tuning runs in its output_mult_tuning/), keyed
by the run's overrides and the code version (a hash of launcher/, patches/, the moe-tiny recipe and the
coordinate-check trainer), so a code change starts new runs and the sweep can be stopped and resumed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import cache  # noqa: E402
from benchmarks.cache import run_key  # noqa: E402
from launcher.errors import RampError  # noqa: E402
from launcher.laws.lr_law import CurveFit, fit_lr_curve  # noqa: E402
from tools.mup_coord_check import width_sets  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PARAMETRISATIONS = ("standard", "mup")
#: The sources whose content fixes a run's numbers: the cache key includes their hash.
CODE_PATHS = (*cache.MOE_TINY_CODE, "tools/mup_coord_check.py")
BASE_LAYERS = 2
CURVE_POINTS = 6  # evaluations along the run, besides the final one

# One run: 4 experts (top-2), seq 128, batch 16 sequences; the recipe's WSD schedule (1-sqrt decay over the
# last 20%) with a 5% warmup, AdamW wd 0.1, clip 1.0.
RUN_SETS = [
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


def run_sets(
    par: str, width: int, layers: int, base_width: int, lr: float, seed: int, steps: int, extra: list[str]
) -> list[str]:
    sets = [*RUN_SETS, f"model.num_layers={layers}", *width_sets(width, base_width, par == "mup")]
    if par == "mup" and layers != BASE_LAYERS:
        sets.append(f"mup.base_num_layers={BASE_LAYERS}")
    return [*sets, f"optimizer.lr={lr!r}", f"training.train_steps={steps}", f"training.seed={seed}", *extra]


def code_version() -> str:
    """Hash of the sources that fix a run's numbers (``CODE_PATHS``): part of every cache key."""
    return cache.code_version(CODE_PATHS)


def train_one(sets: list[str], steps: int, work: Path) -> dict:
    """Train in this process; the final loss on ramp's fixed validation set, the validation loss at
    ``CURVE_POINTS`` points along the run (``val_curve``: [tokens, loss] pairs, the last one final), and
    the last train loss.

    A run whose loss or gradients become non-finite has diverged: it stops there with ``val_loss`` NaN
    (the fit drops it).
    """
    from tools.mup_coord_check import trainer_for

    t0 = time.perf_counter()
    losses: list[float] = []
    curve: list[list[float]] = []
    eval_at = {round(steps * k / (CURVE_POINTS + 1)) for k in range(1, CURVE_POINTS + 1)}
    val, note = math.nan, ""
    with trainer_for(sets, work) as trainer:
        try:
            for step in range(1, steps + 1):
                trainer.emit("on_step_start")
                losses.append(trainer.train_step()["lm_loss"])
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(f"loss {losses[-1]} at step {len(losses)}")
                if step in eval_at:
                    curve.append([trainer.state.consumed_tokens, trainer.evaluate()["val_loss"]])
            val = trainer.evaluate()["val_loss"]
            curve.append([trainer.state.consumed_tokens, val])
        except (FloatingPointError, RuntimeError) as e:
            # megatron's grad check raises RuntimeError("... found NaN/Inf in local grad norm ...")
            if isinstance(e, RuntimeError) and "NaN" not in str(e) and "Inf" not in str(e):
                raise
            note = f"diverged at step {len(losses) + 1}: {str(e).splitlines()[0][-160:]}"
        tokens = trainer.state.consumed_tokens
    return {
        "val_loss": val,
        "val_curve": curve,
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


Key = tuple  # (parameterisation, width, layers, seed, lr)


def _worker_init() -> None:
    """A sweep worker trains with one torch thread: two such workers on two cores finish about twice the
    runs of one process using both cores (these models are too small for intra-op threads to pay)."""
    from tools.mup_coord_check import ensure_world

    ensure_world(threads=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument(
        "--depth", type=int, default=4, help="layers of the depth arm at the base width (0: none)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the muP width arms")
    ap.add_argument("--standard-seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--depth-seeds", type=int, nargs="*", default=[0], help="seeds of the muP depth arm")
    ap.add_argument("--lr-min", type=float, default=5e-4)
    ap.add_argument("--lr-max", type=float, default=1.6e-2)
    ap.add_argument("--points", type=int, default=6, help="log-spaced LRs from --lr-min to --lr-max")
    ap.add_argument("--steps", type=int, default=240, help="optimizer steps per run (16 x 128 tokens each)")
    ap.add_argument(
        "--output-mults",
        type=float,
        nargs="+",
        default=[1.0, 2.0, 4.0, 8.0],
        help="candidates for muP's base-shape logit multiplier (mup.output_mult), tuned on the base shape",
    )
    ap.add_argument(
        "--output-mult", type=float, default=None, help="use this mup.output_mult instead of tuning it"
    )
    ap.add_argument("--workers", type=int, default=2, help="runs trained at once, one torch thread each")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--cache", type=Path, default=RESULTS / "lr_transfer_runs")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where lr_transfer.json/.png go")
    ap.add_argument("--report-only", action="store_true", help="no training: report the cached runs")
    ap.add_argument(
        "--code-version",
        default=None,
        help="with --report-only: report the runs of this code version (default: the current code's)",
    )
    ap.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="K",
        help="retrain the K cheapest reported runs with the current code and compare their losses exactly "
        "(for runs of an older --code-version)",
    )
    args = ap.parse_args(argv)
    widths = sorted(args.widths)
    base = widths[0]
    lrs = lr_grid(args.lr_min, args.lr_max, args.points)
    current = code_version()
    version = args.code_version or current
    bad = [f"--workers={args.workers}: must be at least 1"] if args.workers < 1 else []
    bad += [
        f"--depth-seeds {s}: not among --seeds (the depth arm compares with the base shape's muP curve)"
        for s in args.depth_seeds
        if args.depth and s not in args.seeds
    ]
    if args.output_mult is None and not args.standard_seeds:
        bad.append("--standard-seeds is empty: the logit multiplier is tuned at the standard sweep's best LR")
    if any(x.startswith("mup.output_mult=") for x in args.sets):
        bad.append("--set mup.output_mult: give --output-mult (or let the sweep tune it)")
    if bad:
        print(f"lr_transfer: {bad[0]}", file=sys.stderr)
        return 2
    # One directory per code version: it holds one sweep (ramp-fit-lr-law reads a directory whole)
    cache_dir = args.cache / version
    cache_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runs: dict[Key, dict] = {}
    tuning: dict[float, dict] = {}  # output_mult -> the base-shape run that tried it
    # the tuning runs live apart, so the version's directory holds one sweep
    tuning_dir = cache_dir / "output_mult_tuning"
    tuning_dir.mkdir(exist_ok=True)
    pending: list[tuple[Future, Path, dict, Callable[[dict], None]]] = []
    trained = 0

    def submit(key: Key, out_mult: float, tuning_run: bool = False) -> None:
        """Queue one run on ``pool`` (or take it from the cache), filed in ``runs`` under ``key``, or for a
        tuning run in ``tuning`` under its multiplier (cached in ``tuning_dir``). muP on the base shape with
        a logit multiplier of 1 is the standard model bitwise (tests/dist/test_mup_training.py): shared."""
        par, w, layers, seed, lr = key

        def store(res: dict) -> None:
            if tuning_run:
                tuning[out_mult] = res
            else:
                runs[key] = res

        same = ("standard", w, layers, seed, lr)
        if par == "mup" and w == base and layers == BASE_LAYERS and out_mult == 1.0 and same in runs:
            store(runs[same])
            return
        extra = [*args.sets] if par == "standard" else [f"mup.output_mult={out_mult!r}", *args.sets]
        sets = run_sets(par, w, layers, base, lr, seed, args.steps, extra)
        tag = "" if par == "standard" else f"-out{out_mult:g}"
        name = f"{par}{tag}-w{w}-L{layers}-s{seed}-lr{lr:g}-{run_key(sets, version)}.json"
        path = (tuning_dir if tuning_run else cache_dir) / name
        done = next((p for p in (path, cache_dir / name, tuning_dir / name) if p.exists()), None)
        if done is not None:
            text = done.read_text()
            if done != path and not args.report_only:  # a tuning run that is also a run of the sweep
                path.write_text(text)
            store(json.loads(text))
        elif not args.report_only:
            meta = dict(
                parametrisation=par,
                width=w,
                layers=layers,
                seed=seed,
                lr=lr,
                output_mult=None if par == "standard" else out_mult,
                code_version=version,
                overrides=sets,
                threads=1,
            )
            work = Path(tmp) / path.stem
            pending.append((pool.submit(train_one, sets, args.steps, work), path, meta, store))

    def drain() -> None:
        """Wait for every queued run; write each to the cache as it finishes."""
        nonlocal trained
        failed: list[str] = []
        for fut in as_completed([f for f, *_ in pending]):
            _, path, meta, store = next(p for p in pending if p[0] is fut)
            try:
                res = {**fut.result(), **meta}
            except Exception as e:  # keep every other run's result; report all failures at the end
                failed.append(f"{path.name}: {type(e).__name__}: {e}")
                print(f"FAILED {failed[-1]}", flush=True)
                continue
            path.write_text(json.dumps(res, indent=2) + "\n")
            store(res)
            trained += 1
            print(
                f"[{trained} trained] {meta['parametrisation']:<8} width {meta['width']:>4} "
                f"L{meta['layers']} seed {meta['seed']} lr {meta['lr']:<8g} "
                f"out x{meta['output_mult'] or 1:g} "
                f"val {res['val_loss']:.4f} ({res['seconds']:.0f}s, "
                f"{(time.perf_counter() - t_start) / 60:.1f} min so far) {res['note']}",
                flush=True,
            )
        pending.clear()
        if failed:
            raise RuntimeError(f"{len(failed)} run(s) failed (the others are cached): " + "; ".join(failed))

    def best_lr(par: str, w: int, layers: int, seed: int) -> int:
        """Index of the grid LR with the lowest final loss so far (the middle of the grid if none)."""
        vals = [runs.get((par, w, layers, seed, lr), {}).get("val_loss", math.nan) for lr in lrs]
        finite = [i for i, v in enumerate(vals) if math.isfinite(v)]
        return min(finite, key=lambda i: vals[i]) if finite else (len(lrs) - 1) // 2

    def nearest_first(best: int) -> list[float]:
        return [lrs[i] for i in sorted(range(len(lrs)), key=lambda i: (abs(i - best), i))]

    # The stages of the module docstring, most important first, so a sweep cut short still answers the
    # main question.
    with (
        tempfile.TemporaryDirectory(prefix="ramp-lr-transfer-") as tmp,
        ProcessPoolExecutor(
            args.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init
        ) as pool,
    ):
        for seed in args.standard_seeds:
            for lr in lrs:
                submit(("standard", base, BASE_LAYERS, seed, lr), 1.0)
        drain()
        out_mult = args.output_mult
        tune_seed = (args.standard_seeds or args.seeds)[0]
        tune_lr = lrs[best_lr("standard", base, BASE_LAYERS, tune_seed)]
        scored: dict[float, float] = {}
        if out_mult is None:
            for m in args.output_mults:
                submit(("mup", base, BASE_LAYERS, tune_seed, tune_lr), m, tuning_run=True)
            drain()
            scored = {m: r["val_loss"] for m, r in tuning.items() if math.isfinite(r["val_loss"])}
            out_mult = min(scored, key=scored.__getitem__) if scored else 1.0
        for seed in args.seeds:
            for lr in lrs:
                submit(("mup", base, BASE_LAYERS, seed, lr), out_mult)
        drain()
        for seed in sorted(set(args.seeds) | set(args.standard_seeds)):
            pars = [
                p
                for p in PARAMETRISATIONS
                if seed in (args.standard_seeds if p == "standard" else args.seeds)
            ]
            order = {p: nearest_first(best_lr(p, base, BASE_LAYERS, seed)) for p in pars}
            for k in range(len(lrs)):  # both parameterisations' k-th nearest LR before either's (k+1)-th
                for par in pars:
                    for w in widths[1:]:
                        submit((par, w, BASE_LAYERS, seed, order[par][k]), out_mult)
        if args.depth:
            for seed in args.depth_seeds:
                for lr in nearest_first(best_lr("mup", base, BASE_LAYERS, seed)):
                    submit(("mup", base, args.depth, seed, lr), out_mult)
        drain()
        verified = verify(runs, args.verify, current, pool, Path(tmp)) if args.verify else None
    tuned = args.output_mult is None
    notes = []
    if tuned and scored and out_mult in (min(args.output_mults), max(args.output_mults)):
        notes.append(
            f"the best multiplier x{out_mult:g} is at the edge of the candidates: widen --output-mults"
        )
    mup_base_best = lrs[best_lr("mup", base, BASE_LAYERS, args.seeds[0])]
    if tuned and mup_base_best != tune_lr:
        notes.append(
            f"tuned at lr {tune_lr:g}, but muP's base shape is best at lr {mup_base_best:g} (seed "
            f"{args.seeds[0]}) with it: the multiplier may not be the best at that LR"
        )
    output = {
        "chosen": out_mult,
        "tuned": tuned,
        "at": {"width": base, "layers": BASE_LAYERS, "seed": tune_seed, "lr": tune_lr} if tuned else None,
        "val_loss": {f"{m:g}": r["val_loss"] for m, r in sorted(tuning.items())},
        "notes": notes,
    }
    return report(runs, widths, lrs, args, version, current, verified, output)


def verify(runs: dict, k: int, current: str, pool: ProcessPoolExecutor, tmp: Path) -> dict:
    """Retrain the ``k`` cheapest runs with the current code: are their validation curves bitwise the same?"""
    picked = sorted({id(r): r for r in runs.values()}.values(), key=lambda r: r.get("seconds", math.inf))[:k]
    checks = []
    futures = []
    for n, old in enumerate(picked):
        steps = int(next(s.split("=")[1] for s in old["overrides"] if s.startswith("training.train_steps=")))
        futures.append(pool.submit(train_one, old["overrides"], steps, tmp / f"verify{n}"))
    for old, fut in zip(picked, futures):
        new = fut.result()
        same = new["val_curve"] == old["val_curve"]
        checks.append(
            {
                "run": f"{old['parametrisation']} w{old['width']} L{old['layers']} seed {old['seed']} "
                f"lr {old['lr']:g} out x{old.get('output_mult') or 1:g}",
                "identical": same,
                # runs cached before the worker pool trained with every core: their bits may differ
                "threads": [old.get("threads"), 1],
                "val_loss": [old["val_loss"], new["val_loss"]],
            }
        )
        print(f"verify {checks[-1]['run']}: {'identical' if same else 'DIFFERENT'} {checks[-1]['val_loss']}")
    return {"code_version": current, "runs": checks, "identical": all(c["identical"] for c in checks)}


def _mean_curve(runs: dict, par: str, w: int, layers: int, seeds: list[int], lrs: list[float]) -> list[float]:
    """Final loss per LR, mean over the seeds that have it (NaN where a seed diverged or is missing)."""
    out = []
    for lr in lrs:
        vals = [runs.get((par, w, layers, s, lr), {}).get("val_loss", math.nan) for s in seeds]
        out.append(sum(vals) / len(vals) if vals and all(math.isfinite(v) for v in vals) else math.nan)
    return out


def _fit_summary(lrs: list[float], losses: list[float]) -> dict:
    fit, used, note = fit_width(lrs, losses)
    finite = [(lo, lr) for lo, lr in zip(losses, lrs) if math.isfinite(lo)]
    return {
        "lr_star": fit.lr_star if fit else math.nan,
        "L_min": fit.L_min if fit else math.nan,
        "C": fit.C if fit else math.nan,
        "r2": fit.r2 if fit else math.nan,
        "fit_lrs": [lrs[i] for i in used],
        "grid_argmin": min(finite)[1] if finite else math.nan,
        "best_loss": min(finite)[0] if finite else math.nan,
        "note": note,
    }


def _arm(runs: dict, shapes: list[tuple[int, int]], seeds: dict[str, list[int]], lrs: list[float]) -> dict:
    """Per parameterisation and shape: the seed-mean curve and its fit, and each seed's curve and fit."""
    out: dict = {}
    for par in PARAMETRISATIONS:
        out[par] = {}
        for w, layers in shapes:
            label = str(w) if layers == BASE_LAYERS else f"{w}xL{layers}"
            per_seed = {}
            for s in seeds[par]:
                curve = _mean_curve(runs, par, w, layers, [s], lrs)
                if any(math.isfinite(v) for v in curve):
                    per_seed[str(s)] = {"val_loss": curve, **_fit_summary(lrs, curve)}
            done = [int(s) for s in per_seed]
            mean = _mean_curve(runs, par, w, layers, done, lrs) if done else [math.nan] * len(lrs)
            out[par][label] = {
                "seeds": done,
                "val_loss": mean,
                **_fit_summary(lrs, mean),
                "per_seed": per_seed,
            }
    return out


def _shift(by_shape: dict, labels: list[str], field: str = "lr_star") -> float:
    vals = [by_shape[k][field] for k in labels if k in by_shape]
    ok = len(vals) == len(labels) and all(math.isfinite(v) for v in vals)
    return max(vals) / min(vals) if ok else math.nan


def report(
    runs: dict,
    widths: list[int],
    lrs: list[float],
    args,
    version: str,
    current: str,
    verified: dict | None,
    output: dict,
) -> int:
    seeds = {"standard": sorted(args.standard_seeds), "mup": sorted(args.seeds)}
    width_labels = [str(w) for w in widths]
    arm = _arm(runs, [(w, BASE_LAYERS) for w in widths], seeds, lrs)
    optimal = {par: {k: v["lr_star"] for k, v in arm[par].items()} for par in PARAMETRISATIONS}
    best = {par: {k: v["best_loss"] for k, v in arm[par].items()} for par in PARAMETRISATIONS}
    shift = {par: _shift(arm[par], width_labels) for par in PARAMETRISATIONS}
    per_seed: dict = {}
    for par in PARAMETRISATIONS:
        for s in seeds[par]:
            by_w = {k: v["per_seed"][str(s)] for k, v in arm[par].items() if str(s) in v["per_seed"]}
            bests = [by_w[k]["best_loss"] for k in width_labels if k in by_w]
            per_seed.setdefault(par, {})[str(s)] = {
                "optimal_lr": {k: v["lr_star"] for k, v in by_w.items()},
                "r2": {k: v["r2"] for k, v in by_w.items()},
                "best_loss": {k: v["best_loss"] for k, v in by_w.items()},
                "shift": _shift(by_w, width_labels),
                # wider is better or equal (1e-3 relative: below the run-to-run noise of the read-off)
                "best_loss_non_increasing": len(bests) == len(widths)
                and all(b <= a * (1 + 1e-3) for a, b in itertools.pairwise(bests)),
            }
    depth = None
    if args.depth:
        depth_seeds = {"standard": [], "mup": sorted(args.depth_seeds)}
        d = _arm(runs, [(widths[0], BASE_LAYERS), (widths[0], args.depth)], depth_seeds, lrs)["mup"]
        labels = list(d)
        depth = {
            "layers": [BASE_LAYERS, args.depth],
            "width": widths[0],
            "optimal_lr": {k: v["lr_star"] for k, v in d.items()},
            "r2": {k: v["r2"] for k, v in d.items()},
            "best_loss": {k: v["best_loss"] for k, v in d.items()},
            "shift": _shift(d, labels),
            "per_seed_shift": {
                str(s): _shift(
                    {k: v["per_seed"].get(str(s), {"lr_star": math.nan}) for k, v in d.items()}, labels
                )
                for s in depth_seeds["mup"]
            },
        }
    mup_seeds = per_seed.get("mup", {})
    goal_checks = {
        "mup_shift_below_1.3": shift["mup"] < 1.3,
        "mup_shift_below_standard": shift["mup"] < shift["standard"],
        "every_mup_seed_shift_below_1.3": bool(mup_seeds)
        and all(v["shift"] < 1.3 for v in mup_seeds.values()),
        "mup_best_loss_non_increasing_every_seed": bool(mup_seeds)
        and all(v["best_loss_non_increasing"] for v in mup_seeds.values()),
    }
    goal = all(goal_checks.values())

    tokens = args.steps * 16 * 128
    print(
        f"\nfinal validation loss ({args.steps} steps x 16 x 128 = {tokens / 1e6:.2f} M tokens; "
        "'-' = missing)"
    )
    print(
        f"{'param.':<9}{'shape':>8}{'seed':>6} "
        + "".join(f"{lr:>9g}" for lr in lrs)
        + f"{'lr*':>10}{'R^2':>6}"
    )

    def row(par: str, label: str, seed: str, v: dict) -> None:
        cells = "".join(f"{x:>9.4f}" if math.isfinite(x) else f"{'-':>9}" for x in v["val_loss"])
        print(f"{par:<9}{label:>8}{seed:>6} {cells}{v['lr_star']:>10.3g}{v['r2']:>6.2f}  {v['note']}")

    for par in PARAMETRISATIONS:
        for label, v in arm[par].items():
            for s, vs in v["per_seed"].items():
                row(par, label, s, vs)
            if len(v["seeds"]) > 1:
                row(par, label, "mean", v)
    ratio = widths[-1] / widths[0]
    tried = ", ".join(f"x{m}: {v:.4f}" for m, v in output["val_loss"].items())
    print(
        f"muP logit multiplier (mup.output_mult) x{output['chosen']:g}, "
        + (
            f"tuned on width {output['at']['width']} at lr {output['at']['lr']:g} ({tried})"
            if output["tuned"]
            else "given"
        )
    )
    for n in output["notes"]:
        print(f"  note: {n}")
    for par in PARAMETRISATIONS:
        seeds_txt = ", ".join(f"seed {s}: x{v['shift']:.2f}" for s, v in per_seed.get(par, {}).items())
        bests = ", ".join(f"{best[par][k]:.4f}" for k in width_labels)
        print(
            f"{par}: optimal LR moves x{shift[par]:.2f} across {ratio:g}x width ({seeds_txt}); "
            f"best loss {bests}"
        )
    if depth:
        print(f"muP depth {BASE_LAYERS} -> {args.depth} layers: optimal LR moves x{depth['shift']:.2f}")
    for name, ok in goal_checks.items():
        print(f"  {name}: {'yes' if ok else 'NO'}")
    print(f"goal: {'met' if goal else 'NOT met'}")

    result = {
        "optimal_lr": optimal,
        "shift": shift,
        "best_loss": best,
        "goal_met": goal,
        "goal_checks": goal_checks,
        "per_seed": per_seed,
        # muP's base-shape logit multiplier: tuned on the base shape (val_loss per candidate), then fixed
        "output_mult": output,
        "depth": depth,
        "widths": widths,
        "lrs": lrs,
        "fits": arm,
        "steps": args.steps,
        "tokens_per_run": tokens,
        "code_version": version,
        "code_version_is_current": version == current,
        # runs of an older code version retrained with the current code (--verify): same losses, bitwise?
        "verified_with_current_code": verified,
        "setup": {
            "overrides": RUN_SETS + args.sets,
            "family": "hidden = width, 4 heads, expert hidden = width, 2 layers, base shape = smallest width",
            "score": "final loss on ramp's fixed validation set (training.eval_samples sequences)",
            "fit": "parabola in ln(lr) through the grid argmin and up to 2 neighbours each side",
            "standard": "megatron's plain parameterisation, logits x1 at every width (mup.output_mult "
            "applies to muP only): with a tuned muP multiplier other than 1 the two arms' base shapes differ",
            "threads": "every run trains in a worker process with one torch thread",
            "seeds": seeds,
        },
        "seconds_total": sum(r.get("seconds", 0.0) for r in {id(r): r for r in runs.values()}.values()),
        # how to reproduce (a --report-only pass over the cached runs gives the same file)
        "command": " ".join(
            ["python benchmarks/lr_transfer.py", *(a for a in sys.argv[1:] if a != "--report-only")]
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lr_transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(arm, widths, lrs, shift, args.out / "lr_transfer.png")
    print(f"wrote {args.out / 'lr_transfer.json'} and {args.out / 'lr_transfer.png'}")
    return 0


def plot(arm: dict, widths: list[int], lrs: list[float], shift: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    cmap = plt.get_cmap("viridis")
    finite = []
    for ax, par in zip(axes, PARAMETRISATIONS):
        for i, w in enumerate(widths):
            color = cmap(i / max(len(widths) - 1, 1))
            f = arm[par][str(w)]
            for vs in f["per_seed"].values():  # each seed faint, the seed mean with its fit
                ax.plot(lrs, vs["val_loss"], "x", color=color, alpha=0.4, ms=4)
            ys = f["val_loss"]
            finite += [y for y in ys if math.isfinite(y)]
            ax.plot(lrs, ys, "o", color=color, label=f"width {w} (seeds {f['seeds']})")
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
    if finite:  # diverged or far-off points may leave the frame; the optimum region is what matters
        lo = min(finite)
        axes[0].set_ylim(lo - 0.05, min(max(finite), lo + 1.5) + 0.05)
    axes[0].set_ylabel("final validation loss")
    fig.suptitle("LR transfer across width, tiny MoE (o: seed mean with fitted parabola in log LR; x: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
