"""Batch-size warmup under WSD: steps saved at equal tokens, and what an in-job layout switch costs.

moe-tiny on the embedded corpus, 2 gloo processes, WSD (2% warmup, 1-sqrt decay over the last 20% to 0.1),
LR 2e-3 at 8 sequences and ``sqrt(B / 8)`` with the batch, equal tokens for every run (2.46 M), each run
read off on the same fixed validation set (384 sequences). Six batch schedules:

- ``small``: 8 sequences throughout; ``large``: 64 throughout (LR x sqrt(8));
- ``warmup``: a hand step schedule, 8 -> 16 at 20% -> 32 at 38% of the tokens (calibration.md: under WSD,
  growing late and capping at 32 beat growing to 64, whose last phase the decay favours the small batch in);
- ``late``: calibration.md's winning schedule, later still: 8 -> 16 at 25% -> 32 at 50% (half the steps);
- ``seesaw`` (arXiv 2510.14717): a doubling wherever the WSD decay halves the LR;
- ``cbs``: 2505.23971's doubling rule on the CBS calibration.md measured by branched training (8 sequences
  at 2% and 8%, 32 from 20% on).

Micro-batch 8 on 2 processes leaves an 8-sequence phase no room for DP2: it trains as PP2, and the larger
phases as DP2, so every schedule that grows switches layout in the same processes. Compare within a seed:
seeds differ by ~2% at this scale.

    python benchmarks/batch_warmup.py [--seeds 0 1 2] [--runs small warmup ...]
    python benchmarks/batch_warmup.py --switch-probe   # the layout switch alone, ~5 minutes

Writes ``benchmarks/results/batch_warmup.json`` (``steps``, ``final_loss``: run -> list over that run's
``seeds``; every run this code version has cached is reported, and each schedule is compared with ``small``
on the seeds both have (a schedule counts for ``steps_saved_frac`` only with every seed ``small`` has);
``steps_saved_frac``, ``switch_time_s``, ``switch_time_steps``) and ``batch_warmup.png``. Finished runs are
cached under ``results/batch_warmup_runs/`` by code version and overrides. ``--switch-probe`` times the
switch alone (three short runs) into ``results/batch_warmup_switch.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ramp_run import run_ramp  # noqa: E402

from benchmarks import cache  # noqa: E402
from benchmarks.cache import code_version, run_key  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "batch_warmup_runs"
CODE_PATHS = cache.MOE_TINY_CODE
SEQ = 256
TOKENS = 2_457_600  # 1,200 steps of 8 sequences; every phase boundary below is a multiple of 64 sequences
LR = 2e-3  # at 8 sequences (calibration.md's sweep optimum)
SEEDS = range(10)  # the seeds a run may have (the report reads every one the cache holds)


def frac(f: float) -> int:
    """``f`` of the run's tokens, rounded to whole 64-sequence steps."""
    return round(f * TOKENS / (64 * SEQ)) * 64 * SEQ


BASE = [
    f"training.train_tokens={TOKENS}",
    "training.micro_batch_size=8",
    "training.global_batch_size=8",
    "training.eval_samples=384",
    "training.eval_interval=100",
    "training.log_interval=10",
    f"schedule.warmup_tokens={frac(0.02)}",
    "schedule.warmup_frac=null",
    "checkpoint.interval=0",
    "checkpoint.save_at_exit=false",
    "checkpoint.keep_last=1",
    "checkpoint.checksums=false",
    "logging.tensorboard=false",
    "logging.wandb.enabled=false",
    "batch_schedule.layouts={8: {pp: 2}, 16: {}, 32: {}, 64: {}}",
]
CBS_TABLE = [[frac(0.02), 8], [frac(0.08), 8], [frac(0.20), 32], [frac(0.40), 32], [frac(0.70), 32]]
RUNS: dict[str, list[str]] = {
    "small": [f"optimizer.lr={LR}"],
    "large": ["training.global_batch_size=64", f"optimizer.lr={LR * 8**0.5:.6g}"],
    "warmup": [
        f"optimizer.lr={LR}",
        "batch_schedule.kind=steps",
        f"batch_schedule.steps=[[{frac(0.20)}, 16], [{frac(0.38)}, 32]]",
    ],
    "late": [
        f"optimizer.lr={LR}",
        "batch_schedule.kind=steps",
        f"batch_schedule.steps=[[{frac(0.25)}, 16], [{frac(0.50)}, 32]]",
    ],
    "seesaw": [f"optimizer.lr={LR}", "batch_schedule.kind=seesaw", "batch_schedule.max_batch=64"],
    "cbs": [
        f"optimizer.lr={LR}",
        "batch_schedule.kind=cbs",
        f"batch_schedule.cbs_table={json.dumps(CBS_TABLE)}",
        "batch_schedule.max_batch=64",
    ],
}


def run_sets(name: str, seed: int) -> list[str]:
    return [*BASE, *RUNS[name], f"training.seed={seed}"]


def cache_path(name: str, seed: int, version: str) -> Path:
    return CACHE / f"{name}-s{seed}-{run_key(run_sets(name, seed), version)}.json"


def train(name: str, seed: int, version: str, work: Path) -> dict:
    """One run (from the cache when this code already ran it): its steps, losses, times and switches."""
    sets = run_sets(name, seed)
    cached = cache_path(name, seed, version)
    if cached.exists():
        return json.loads(cached.read_text())
    t0 = time.perf_counter()
    run = run_ramp(work / f"{name}-s{seed}", sets, nproc=2, base=[], timeout=4 * 3600).check()
    wall = time.perf_counter() - t0
    train_recs = sorted(run.train, key=lambda r: r["step"])
    switches = [
        {k: r[k] for k in r if k.startswith("switch_") or k in ("step", "layout", "global_batch")}
        for r in train_recs
        if "switch_time_s" in r
    ]
    result = {
        "run": name,
        "seed": seed,
        "sets": sets,
        "code_version": version,
        "steps": train_recs[-1]["step"],
        "tokens": train_recs[-1]["tokens"],
        "final_loss": run.evals[-1]["val_loss"],
        "wall_s": wall,
        "train_s": sum(r["step_time"] for r in run.train),  # logged steps only: a sample
        "step_times": [r["step_time"] for r in train_recs if "switch_time_s" not in r],
        "switches": switches,
        "curve": [[r["step"], r["tokens"], r["loss"], r["global_batch"]] for r in train_recs],
        "val_curve": [[r["step"], r["tokens"], r["val_loss"]] for r in run.evals],
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=1))
    return result


def report(results: dict[str, dict[int, dict]], version: str) -> dict:
    """Every schedule is compared with ``small`` on the seeds both ran (a run may have fewer seeds than
    another); ``steps_saved_frac`` is the best schedule that ran every seed ``small`` ran and whose final
    loss is <= small's on each of them."""
    names = [n for n in RUNS if results.get(n)]
    seeds = sorted({s for n in names for s in results[n]})
    steps = {n: [results[n][s]["steps"] for s in seeds if s in results[n]] for n in names}
    final = {n: [results[n][s]["final_loss"] for s in seeds if s in results[n]] for n in names}
    small = results.get("small", {})
    shared = {n: [s for s in seeds if s in results[n] and s in small] for n in names}
    best, saved = None, None
    for n in names:
        if n == "small" or not shared[n] or len(shared[n]) < len(small):
            continue
        ok = all(results[n][s]["final_loss"] <= small[s]["final_loss"] for s in shared[n])
        frac_saved = 1 - statistics.mean(results[n][s]["steps"] for s in shared[n]) / statistics.mean(
            small[s]["steps"] for s in shared[n]
        )
        if ok and (saved is None or frac_saved > saved):
            best, saved = n, frac_saved
    switch_times = [sw["switch_time_s"] for n in names for r in results[n].values() for sw in r["switches"]]
    step_times = [t for n in names for r in results[n].values() if r["switches"] for t in r["step_times"]]
    switch_s = statistics.median(switch_times) if switch_times else None
    step_s = statistics.median(step_times) if step_times else None
    return {
        "code_version": version,
        "code_version_is_current": version == code_version(CODE_PATHS),
        "seeds": {n: [s for s in seeds if s in results[n]] for n in names},
        "tokens": TOKENS,
        "runs": {n: RUNS[n] for n in names},
        "steps": steps,
        "final_loss": final,
        "wall_time_s": {
            n: [round(results[n][s]["wall_s"], 1) for s in seeds if s in results[n]] for n in names
        },
        "loss_vs_small": {
            n: {s: results[n][s]["final_loss"] / small[s]["final_loss"] - 1 for s in shared[n]} for n in names
        },
        "layout_switches": {
            n: [
                [(sw["step"], sw["layout"]) for sw in results[n][s]["switches"]]
                for s in seeds
                if s in results[n]
            ]
            for n in names
        },
        "best_schedule": best,
        "steps_saved_frac": saved,
        "switch_time_s": switch_s,
        "median_step_time_s": step_s,
        "switch_time_steps": switch_s / step_s if switch_s and step_s else None,
        "switch_parts_s": {
            part: statistics.median(
                sw[f"switch_{part}_s"] for n in names for r in results[n].values() for sw in r["switches"]
            )
            for part in ("save", "teardown", "rebuild", "load")
        }
        if switch_times
        else None,
        "goals": {
            "steps_saved_frac >= 0.55": saved is not None and saved >= 0.55,
            "switch_time_steps <= 3": switch_s is not None and step_s is not None and switch_s / step_s <= 3,
        },
    }


def plot(results: dict[str, dict[int, dict]], seed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for name in RUNS:
        r = results.get(name, {}).get(seed)
        if r is None:
            continue
        steps = [c[0] for c in r["curve"]]
        tokens = [c[1] / 1e6 for c in r["curve"]]
        loss = [c[2] for c in r["curve"]]
        (line,) = axes[0].plot(steps, loss, label=f"{name} ({r['steps']} steps)", lw=1)
        axes[1].plot(tokens, loss, color=line.get_color(), lw=1, label=f"{name}: val {r['final_loss']:.4f}")
        axes[1].plot(
            [v[1] / 1e6 for v in r["val_curve"]],
            [v[2] for v in r["val_curve"]],
            "o",
            color=line.get_color(),
            ms=3,
        )
        axes[2].step(tokens, [c[3] for c in r["curve"]], where="post", color=line.get_color(), label=name)
        for sw in r["switches"]:
            axes[2].axvline(
                next(c[1] for c in r["curve"] if c[0] == sw["step"]) / 1e6,
                color=line.get_color(),
                ls=":",
                lw=0.8,
            )
    axes[0].set(xlabel="optimizer steps", ylabel="train loss", title=f"loss vs steps (seed {seed})")
    axes[1].set(xlabel="tokens (M)", ylabel="loss (dots: fixed validation set)", title="loss vs tokens")
    axes[2].set(
        xlabel="tokens (M)",
        ylabel="global batch (sequences)",
        yscale="log",
        title="global batch (dotted: in-job layout switch)",
    )
    for ax in axes[:2]:
        ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def switch_probe(work: Path, version: str, repeats: int = 3) -> dict:
    """The switch alone, quickly: ``BASE`` for 70 steps (40 at 8 sequences as PP2, then 16 as DP2), run
    ``repeats`` times; the median switch against the median step of the same runs (steps 6-40 and 46-70,
    past each phase's first steps)."""
    cut = 40 * 8 * SEQ
    sets = [s for s in BASE if not s.startswith(("training.train_tokens", "schedule.", "training.eval_"))]
    sets += [
        f"training.train_tokens={cut + 30 * 16 * SEQ}",
        "schedule.warmup_tokens=0",
        "schedule.warmup_frac=null",
        "training.eval_interval=0",
        "training.log_interval=1",
        f"optimizer.lr={LR}",
        "batch_schedule.kind=steps",
        f"batch_schedule.steps=[[{cut}, 16]]",
    ]
    switches, steps = [], []
    for i in range(repeats):
        run = run_ramp(work / f"switch-{i}", sets, nproc=2, base=[], timeout=3600).check()
        recs = sorted(run.train, key=lambda r: r["step"])
        switches += [r for r in recs if "switch_time_s" in r]
        steps += [r["step_time"] for r in recs[5:40]] + [r["step_time"] for r in recs[45:]]
    switch_s = statistics.median(r["switch_time_s"] for r in switches)
    step_s = statistics.median(steps)
    return {
        "code_version": version,
        "runs": repeats,
        "switch_time_s": switch_s,
        "median_step_time_s": step_s,
        "switch_time_steps": switch_s / step_s,
        "switch_parts_s": {
            part: statistics.median(r[f"switch_{part}_s"] for r in switches)
            for part in ("save", "teardown", "rebuild", "load")
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], choices=SEEDS)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--work", type=Path, default=None, help="run directories (default: a temporary one)")
    ap.add_argument(
        "--switch-probe",
        action="store_true",
        help="only time the layout switch (3 short runs, ~5 minutes): results/batch_warmup_switch.json",
    )
    args = ap.parse_args(argv)
    import tempfile

    version = code_version(CODE_PATHS)
    if args.switch_probe:
        with tempfile.TemporaryDirectory(prefix="batch_warmup-") as tmp:
            probe = switch_probe(args.work or Path(tmp), version)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "batch_warmup_switch.json").write_text(json.dumps(probe, indent=1))
        print(json.dumps(probe, indent=1))
        return 0
    # Every run this code already made is in the report, also those of seeds or runs not asked for now.
    results: dict[str, dict[int, dict]] = {
        n: {s: json.loads(p.read_text()) for s in SEEDS if (p := cache_path(n, s, version)).exists()}
        for n in RUNS
    }
    with tempfile.TemporaryDirectory(prefix="batch_warmup-") as tmp:
        work = args.work or Path(tmp)
        for seed in args.seeds:
            for name in args.runs:
                t0 = time.perf_counter()
                r = results[name][seed] = train(name, seed, version, work)
                took = time.perf_counter() - t0
                print(
                    f"seed {seed} {name:7s} steps {r['steps']:5d} val {r['final_loss']:.4f} "
                    f"switches {len(r['switches'])} wall {r['wall_s']:.0f}s ({took:.0f}s now)",
                    flush=True,
                )
                out = report(results, version)
                RESULTS.mkdir(parents=True, exist_ok=True)
                (RESULTS / "batch_warmup.json").write_text(json.dumps(out, indent=1))
    seeds = sorted({s for runs in results.values() for s in runs})
    plot(results, seeds[0], RESULTS / "batch_warmup.png")
    print(f"\n{'run':8s} " + " ".join(f"{'seed ' + str(s):>22s}" for s in seeds))
    for n in RUNS:
        row = [results[n].get(s) for s in seeds]
        cells = [f"{r['steps']:5d} st {r['final_loss']:.4f} {r['wall_s']:5.0f}s" if r else "-" for r in row]
        print(f"{n:8s} " + " ".join(f"{c:>22s}" for c in cells))
    print(
        json.dumps(
            {
                k: out[k]
                for k in ("best_schedule", "steps_saved_frac", "switch_time_s", "switch_time_steps", "goals")
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
