"""CBS probes: fork branches from a run's checkpoints at batch multipliers and read off the critical batch
size (arXiv 2505.23971; the math is ``laws/cbs.py``). ``ramp-probe`` (tools/cbs_probe.py) is the command.

A fork at checkpoint ``t`` (tokens consumed ``t``, batch ``B`` of the phase the run is in, LR ``eta`` that
its last step used: peak x batch-rule factor x schedule factor) starts one branch per multiplier ``k``:

- batch ``k B`` (``training.global_batch_size``, a constant batch schedule), peak LR ``eta x f(k)`` with
  ``f`` from ``lr_rule`` (sqrt: Adam's rule, linear, none);
- the same token budget for every ``k`` (rounded up to whole steps of the largest branch), from the
  checkpoint's data position, so every branch trains on exactly the same sequences; optimizer state
  carried over (``checkpoint.load_optimizer``);
- the LR over the branch (``lr_schedule``): ``hold`` (default) keeps the fork's LR constant, the paper's
  setting (its branches continue a long stable phase) and the one that measures the batch alone; ``decay``
  anneals it over the branch, linearly in the parent's decay shape, to the LR the parent ends at, so a
  WSD run can ask which batch is safe *under the decay it will see* (calibration.md, last section: the
  CBS at constant LR grows the batch too early for a WSD run);
- run by the real entry point in a child process, in its own run directory under the probe output with
  ``checkpoint.branch=true`` (never beside the parent's checkpoints; the parent's files are only read),
  no checkpoints of its own, and evaluations on the parent's fixed validation set spread over the branch
  (the last one at its end: the read-off loss; the others give the noise estimate).

Multipliers run in increasing order and a fork stops at the first ``k`` that fails the epsilon test or
does not finish; a branch that did not finish is recorded with its error, never dropped. A branch with too
few evaluations for a noise estimate of its own (under 3 in its tail) gets the noise floor model's
(``laws.cbs.noise_at``, the model that set its length). The online probes may give the k = 1 read-off
from the run itself (``reference``): that branch is then not run. ``probes.jsonl`` gets one line per fork
with its cost (``branch_tokens`` trained, ``eval_tokens`` evaluated), and ``cbs_vs_tokens.png`` the CBS
intervals with the fitted curve.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.errors import require
from launcher.launch.local import Run, run_pretrain
from launcher.laws import cbs as cbs_law
from launcher.laws.batch_size import KIND_FIELDS, lr_multiplier
from launcher.laws.cbs import BRANCH_SCHEDULES, ProbeConfig
from launcher.laws.schedule import resolve_schedule

__all__ = [
    "BRANCH_SCHEDULES",
    "Fork",
    "ProbeConfig",
    "draw_cbs_curve",
    "fit_and_plot",
    "read_fork",
    "run_fork",
]

PROBES_FILE = "probes.jsonl"
PLOT_FILE = "cbs_vs_tokens.png"
FIT_FILE = "cbs_fit.json"
RUN_ITSELF = "run"  # a branch record's run_dir when the run itself stood in for k = 1


@dataclass
class Fork:
    """Where a fork starts: the checkpoint and the parent's state there."""

    checkpoint: Path
    step: int
    tokens: int
    batch: int  # sequences per step in the parent at the fork
    lr: float  # peak LR of the parent's LR schedule x its batch-rule factor x the schedule factor
    lr_factor: float  # the schedule factor alone (for the decay's end ratio)
    seq_length: int
    phases: list[tuple[int, int]]  # the parent's (start tokens, batch) phases before the fork
    data_tokens: int = 0  # the tokens the parent's train data was built for (its sample order)


def read_fork(run_dir: Path, checkpoint: Path) -> tuple[Any, Fork]:
    """The parent's recipe (its ``config.yaml``) and its state at ``checkpoint``."""
    from launcher import checkpoint as ckpt
    from launcher import recipe

    config = Path(run_dir) / "config.yaml"
    require(config.exists(), f"ramp-probe: {config} does not exist; give the run directory of a ramp run")
    r = recipe.load(config)
    ts = ckpt.read_trainer_state(checkpoint)
    state, sizes = ts["state"], ts.get("layout", {})
    world = sizes.get("tp", 1) * sizes.get("pp", 1) * sizes.get("dp", 1)
    d = r.derive(world, False)  # the parent's plan: its token schedule and its batch phases
    schedule = resolve_schedule(r.schedule, d.train_tokens, d.tokens_per_step, d.warmup_tokens)
    tokens = int(state["consumed_tokens"])
    factor = schedule.factor(tokens)  # the LR of the parent's last step (a step's LR: factor after it)
    lr = r.optimizer.lr * float(state.get("lr_scale", 1.0)) * factor
    # the batch phases the parent ran: as saved (online decisions included), else as its recipe plans them
    planned = ts.get("batch_schedule", {}).get("phases") or [
        (p.start_tokens, p.batch) for p in d.batch_schedule.phases
    ]
    phases = [(int(t), int(b)) for t, b in planned if t < tokens]
    fork = Fork(
        Path(checkpoint),
        int(state["step"]),
        tokens,
        int(state["global_batch_size"]),
        lr,
        factor,
        r.model.seq_length,
        phases,
        max(d.data_tokens, d.train_tokens),
    )
    return r, fork


def budget_tokens(cfg: ProbeConfig, batch: int, seq_length: int) -> int:
    """The branch length of a fork at ``batch`` sequences per step, rounded up to whole steps of every
    branch (a common multiple of their step sizes), so every branch trains exactly these tokens, on the
    same sequences."""
    unit = math.lcm(*(round(k * batch) * seq_length for k in cfg.multipliers))
    per_step = int(max(cfg.multipliers) * batch) * seq_length
    if cfg.budget_tokens is not None:
        want = cfg.budget_tokens
    else:
        want = cbs_law.branch_tokens(
            cfg.noise_sd, cfg.noise_tokens, cfg.epsilon, min_tokens=cfg.min_steps * per_step
        )
    return -(-want // unit) * unit


def eval_interval(start_step: int, steps: int, evals: int) -> int:
    """A branch's ``training.eval_interval``: every ``steps // evals``-th step number (the trainer evaluates
    at multiples of it and at the last step, so ``evals`` or ``evals + 1`` times); with ``evals=1`` past the
    branch's end, so it evaluates once, at its last step."""
    return start_step + steps + 1 if evals == 1 else max(1, steps // evals)


def eval_steps(start_step: int, steps: int, evals: int) -> list[int]:
    """The steps at which a branch of ``steps`` steps from ``start_step`` evaluates, as the trainer does with
    :func:`eval_interval`. The online probes evaluate the run at the same points when it is the k = 1
    branch."""
    interval = eval_interval(start_step, steps, evals)
    end = start_step + steps
    return [s for s in range(start_step + 1, end + 1) if s % interval == 0 or s == end]


def branch_sets(parent, cfg: ProbeConfig, fork: Fork, k: float, budget: int) -> list[str]:
    """The ``--set`` overrides of branch ``k`` on top of the parent's config.yaml."""
    batch = k * fork.batch
    require(float(batch).is_integer(), f"probe multiplier {k:g} x batch {fork.batch} is not a whole batch")
    require(k >= 1, f"probe multiplier {k:g}: below 1 is not supported yet; fork from a smaller-batch run")
    lr = fork.lr * lr_multiplier(cfg.lr_rule, k)
    steps = budget // (int(batch) * fork.seq_length)
    data = [f"training.data_tokens={fork.data_tokens}"] if fork.data_tokens else []
    points = [[t, b] for t, b in fork.phases] + [[fork.tokens, int(batch)]]
    sets = [
        f"training.global_batch_size={points[0][1]}",
        "training.train_steps=null",
        f"training.train_tokens={fork.tokens + budget}",
        f"training.eval_interval={eval_interval(fork.step, steps, cfg.evals)}",
        *data,  # the parent's data order
        f"optimizer.lr={lr!r}",
        # The parent's phases up to the fork, then k B: planned from token 0 like any run, this reproduces
        # the parent's consumed tokens at the fork exactly, so the branch ends at fork + budget.
        "batch_schedule.kind=steps",
        f"batch_schedule.steps={points}",
        "batch_schedule.lr_rule=none",  # the branch's LR is set whole in optimizer.lr
        "batch_schedule.layouts=fixed",
        *(
            f"batch_schedule.{name}=null"
            for name in sorted({f for fs in KIND_FIELDS.values() for f in fs} - {"steps"})
        ),
        "batch_schedule.cbs_fraction=1.0",
        "batch_schedule.cbs_source=table",
        "probes.every_tokens=null",  # a branch never forks branches of its own
        "probes.first_tokens=null",
        "schedule.warmup_frac=null",
        "schedule.warmup_steps=null",
        "schedule.warmup_tokens=0",
        f"checkpoint.load={fork.checkpoint}",
        "checkpoint.branch=true",
        "checkpoint.load_optimizer=true",
        "checkpoint.dir=null",
        "checkpoint.interval=0",
        "checkpoint.save_at_exit=false",
        "logging.plots=false",
        "logging.tensorboard=false",
        "logging.wandb.enabled=false",
    ]
    if cfg.nproc == 1:  # one process: the branch trains unsharded whatever the parent's layout
        sets += [
            *(f"parallel.{k}=1" for k in ("tp", "pp", "ep")),
            *(f"parallel.{k}=null" for k in ("vpp", "sequence_parallel")),
        ]
    if cfg.lr_schedule == "hold":
        sets.append("schedule.style=constant")
    else:
        end_ratio = min(1.0, parent.schedule.min_lr_ratio / max(fork.lr_factor, 1e-12))
        shape = parent.schedule.decay.shape if parent.schedule.style == "wsd" else "linear"
        sets += [
            "schedule.style=wsd",
            f"schedule.min_lr_ratio={end_ratio!r}",
            f"schedule.decay.shape={'linear' if shape == 'points' else shape}",
            "schedule.decay.points=null",
            *(
                f"schedule.decay.{n}=null"
                for n in ("start_frac", "start_steps", "length_frac", "length_steps")
            ),
            f"schedule.decay.start_tokens={fork.tokens}",
            f"schedule.decay.length_tokens={budget}",
        ]
    return [*sets, *cfg.extra_sets]


@dataclass
class BranchRecord:
    k: float
    batch: int
    lr: float
    run_dir: str
    steps: int
    loss: float | None
    noise: float | None
    error: str | None
    passed: bool | None = None
    evals: int = 0  # validation passes the branch ran (forward-only compute)
    noise_from: str | None = None  # "evals": their tail's residual sd; "model": the noise floor model


def keep_checkpoint(src: Path, dst: Path) -> None:
    """A copy of checkpoint ``src`` at ``dst`` that outlives the run's retention of ``src``: hard links
    (instant, no space) where ``dst`` is on the same filesystem, else a copy. The copy is complete once
    the directory has its final name."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(src, tmp, copy_function=os.link)
    except OSError:  # another filesystem (EXDEV) or no hard links: copy the bytes
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def fork_dirname(tokens: int) -> str:
    """The directory of a fork's branches under the probe output."""
    return f"fork_{tokens:012d}"


def run_fork(
    run_dir: Path,
    checkpoint: Path,
    out_dir: Path,
    cfg: ProbeConfig,
    runner: Callable[..., Run] = run_pretrain,
    cwd: Path | None = None,
    inside_run: bool = False,
    should_stop: Callable[[], bool] | None = None,
    reference: tuple[float, float | None] | None = None,
    reference_evals: int = 0,
) -> dict[str, Any]:
    """Run the branches of one fork (increasing k, stopping at the first failure) and read off the CBS;
    the probes.jsonl record (also appended to ``out_dir/probes.jsonl`` unless ``inside_run``: the online
    callback, whose output is the run's own ``probes/`` directory, writes that file from its state).
    ``should_stop`` is asked before each branch (the online callback: a SIGTERM arrived): no more start.
    ``reference``: the read-off ``(loss, noise sd)`` of the first multiplier (k = 1) taken from the run
    itself, which trained those tokens at the fork's batch and LR on the same sequences (the online
    callback checks that it did); that branch is then not run, and ``reference_evals`` is the number of
    evaluations the run made for it alone (they count in the fork's ``eval_tokens``)."""
    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir).resolve()
    require(
        inside_run or not out_dir.is_relative_to(run_dir),
        f"ramp-probe: --out {out_dir} is inside the parent run {run_dir}; probes never write into it",
    )
    parent, fork = read_fork(run_dir, checkpoint)
    require(
        cfg.rule != "val" or parent.training.eval_samples > 0,
        "ramp-probe: the val read-off needs the run's fixed validation set, but training.eval_samples=0; "
        "pass --set training.eval_samples=N or use --rule ema",
    )
    budget = budget_tokens(cfg, fork.batch, fork.seq_length)
    config = run_dir / "config.yaml"
    fork_dir = out_dir / fork_dirname(fork.tokens)
    eval_tokens = parent.training.eval_samples * fork.seq_length  # forward-only tokens of one evaluation
    results: list[cbs_law.BranchResult] = []
    records: list[BranchRecord] = []

    def with_noise(loss: float, measured: float | None) -> tuple[float, str]:
        """The read-off's sd and where it came from: measured over the branch's evaluations, else the noise
        floor model's that set the branch length (loss units)."""
        if measured is not None:
            return measured, "evals"
        sd = cbs_law.noise_at(cfg.noise_sd, cfg.noise_tokens, budget)
        return (sd * loss if cfg.epsilon_mode == "relative" else sd), "model"

    if reference is not None:
        k = cfg.multipliers[0]
        require(k == 1, f"probes: the run can stand in for k=1 only, not the first multiplier {k:g}")
        loss, measured = reference
        noise, noise_from = with_noise(loss, measured)
        results.append(cbs_law.BranchResult(k, loss, noise, None))
        steps = budget // (fork.batch * fork.seq_length)
        records.append(
            BranchRecord(
                k,
                fork.batch,
                fork.lr,
                RUN_ITSELF,
                steps,
                loss,
                noise,
                None,
                evals=reference_evals,
                noise_from=noise_from,
            )
        )
    for k in cfg.multipliers[len(results) :]:
        if should_stop is not None and should_stop():
            break
        bdir = fork_dir / f"k{k:g}"
        require(
            not (bdir / "metrics.jsonl").exists(),
            f"ramp-probe: {bdir} already holds a branch; give a new --out (probes never overwrite)",
        )
        sets = branch_sets(parent, cfg, fork, k, budget)
        run = runner(config, sets, bdir, nproc=cfg.nproc, timeout=cfg.timeout_s, cwd=cwd)
        loss = noise = None
        noise_from = None
        error = run.error
        reached = run.train[-1]["tokens"] if run.train else 0
        if error is None and reached != fork.tokens + budget:  # stopped early (a SIGTERM), or a bug
            error = f"the branch stopped at {reached} tokens, not {fork.tokens + budget}"
        if error is None:
            train = [(r["tokens"], r["loss"]) for r in run.train if r["tokens"] > fork.tokens]
            evals = [(r["tokens"], r["val_loss"]) for r in run.evals if r["tokens"] > fork.tokens]
            try:
                loss, noise = cbs_law.branch_loss(cfg.rule, train, evals)
            except Exception as e:  # a branch without the losses the rule reads is a failed branch
                error = f"no read-off loss: {e}"
            if loss is not None and not math.isfinite(loss):
                loss, error = None, f"non-finite loss {loss}"
            if loss is not None:
                noise, noise_from = with_noise(loss, noise)
        results.append(cbs_law.BranchResult(k, loss, noise, error))
        records.append(
            BranchRecord(
                k,
                int(k * fork.batch),
                fork.lr * lr_multiplier(cfg.lr_rule, k),
                str(bdir),
                budget // (int(k * fork.batch) * fork.seq_length),
                loss,
                noise,
                error,
                evals=sum(1 for r in run.evals if r["tokens"] > fork.tokens),
                noise_from=noise_from,
            )
        )
        if error is not None and len(results) == 1:
            break  # no reference: nothing to compare with
        if cfg.stop_at_failure and len(results) > 1:
            partial = cbs_law.read_off(results, fork.batch, cfg.epsilon, cfg.epsilon_mode)
            if partial.k_fail is not None:
                break
    rec: dict[str, Any] = {
        "checkpoint": str(fork.checkpoint),
        "step": fork.step,
        "tokens": fork.tokens,
        "base_batch": fork.batch,
        "base_lr": fork.lr,
        "budget_tokens": budget,
        "lr_rule": cfg.lr_rule,
        "lr_schedule": cfg.lr_schedule,
        "rule": cfg.rule,
        "epsilon": cfg.epsilon,
        "epsilon_mode": cfg.epsilon_mode,
        "multipliers": list(cfg.multipliers),
        # the compute this fork cost: tokens its branches trained, and tokens their evaluations ran forward
        "branch_tokens": budget * sum(1 for r in records if r.run_dir != RUN_ITSELF),
        "eval_tokens": eval_tokens * sum(r.evals for r in records),
        "reference": RUN_ITSELF if reference is not None else "branch",
    }
    if not results:
        rec.update(cbs=None, cbs_upper=None, k_star=None, edge="error", confidence="low", note="stopped")
    elif results[0].loss is None:
        rec.update(
            cbs=None,
            cbs_upper=None,
            k_star=None,
            edge="error",
            confidence="low",
            note=f"reference branch k={results[0].k:g} did not finish ({results[0].error})",
        )
    else:
        ro = cbs_law.read_off(results, fork.batch, cfg.epsilon, cfg.epsilon_mode)
        for r in records:
            r.passed = ro.passed.get(r.k)
        rec.update(
            cbs=ro.cbs,
            cbs_upper=ro.cbs_upper,
            k_star=ro.k_star,
            edge=ro.edge,
            confidence=ro.confidence,
            note=ro.note,
            noise=ro.noise,
        )
    rec["branches"] = [asdict(r) for r in records]
    if not inside_run:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / PROBES_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


def read_probes(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / PROBES_FILE
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def fit_and_plot(out_dir: Path, records: Sequence[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Fit the CBS curve over the forks with a CBS (``cbs_fit.json``) and draw ``cbs_vs_tokens.png``;
    the fit is None (and the plot shows points only) with too few forks for a held-out choice."""
    records = list(records if records is not None else read_probes(out_dir))
    pts = [(r["tokens"], r["cbs"], r.get("cbs_upper"), r.get("edge")) for r in records if r.get("cbs")]
    fit = None
    try:
        fit = cbs_law.fit_cbs_curve([p[0] for p in pts], [p[1] for p in pts]).to_dict()
    except Exception as e:  # RampError: too few points; the plot still shows the read-offs
        fit = {"error": str(e)}
    (Path(out_dir) / FIT_FILE).write_text(json.dumps(fit, indent=1))
    _plot(Path(out_dir) / PLOT_FILE, pts, fit)
    return fit if "error" not in fit else None


def _plot(path: Path, pts, fit: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    draw_cbs_curve(ax, pts, fit, "C0")
    ax.set_title("critical batch size by branched training (red: at the edge of the tried range)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_cbs_curve(
    ax, pts, fit: dict[str, Any] | None, color: str, label: str = "", x_shift: float = 1.0
) -> None:
    """One run's CBS read-offs on a matplotlib ``ax``: per fork ``(tokens, cbs, cbs_upper, edge)`` a bar from
    the CBS up to the first failing batch (dotted to 2 x the CBS where none failed), its dot red at the edge
    of the tried range (``edge`` None: not marked), and the fitted curve of ``fit`` (a ``CurveFit`` dict);
    ``label`` (e.g. "seed 0") names them in the legend; ``x_shift`` draws them at ``x_shift`` x their tokens
    (runs side by side on a log axis)."""
    import numpy as np
    from matplotlib.ticker import ScalarFormatter

    for i, (t, lo, hi, edge) in enumerate(pts):
        top = hi if hi is not None else lo * 2
        x = t * x_shift
        ax.plot([x, x], [lo, top], color=color, lw=2, ls="-" if hi is not None else ":")
        dot = "C3" if edge not in (None, "none") else color
        ax.plot([x], [lo], "o", color=dot, label=f"{label}: read-offs" if label and i == 0 else None)
    has_fit = fit is not None and "form" in fit and bool(pts)
    if has_fit:
        curve = cbs_law.CurveFit(fit["form"], fit["params"], fit["rms_log"], fit["loo_rms_log"])
        ts = np.linspace(max(1.0, min(p[0] for p in pts) * 0.5), max(p[0] for p in pts) * 1.5, 200)
        params = ", ".join(f"{k} {v:.3g}" for k, v in fit["params"].items())
        name = f"{label}: fit" if label else "fit"
        ax.plot(ts * x_shift, curve(ts), color=color, alpha=0.6, label=f"{name}: {fit['form']} ({params})")
    if label or has_fit:
        ax.legend(fontsize=7)
    ax.set_xlabel("tokens at the fork")
    ax.set_ylabel("CBS (sequences); bar: up to the first failing batch")
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(ScalarFormatter())
