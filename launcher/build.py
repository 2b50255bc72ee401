"""Build a run: the plan made before processes talk (recipe, derived sizes, LR schedule, muP table), and
the trainer with ramp's standard callbacks. The entry point, the tools and the benchmarks share these, and
a relayout or a CBS probe builds trainers through them too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from launcher import layout
from launcher.laws.mup import MupTable, multiplier_table
from launcher.laws.schedule import TokenSchedule, resolve_schedule
from launcher.recipe import Derived, Recipe


@dataclass
class RunPlan:
    """Everything decided before processes talk to each other."""

    recipe: Recipe
    derived: Derived
    env: layout.Env
    schedule: TokenSchedule
    table: MupTable


def schedule_and_table(r: Recipe, d: Derived) -> tuple[TokenSchedule, MupTable]:
    """The token LR schedule and the parameter-group multiplier table the recipe implies."""
    schedule = resolve_schedule(r.schedule, d.train_tokens, d.tokens_per_step, d.warmup_tokens)
    table = multiplier_table(r.model, r.mup, r.optimizer.lr_mult, r.optimizer.weight_decay)
    return schedule, table


def plan_run(r: Recipe, world_size: int, cuda: bool, env: layout.Env) -> RunPlan:
    """Derived sizes, schedule and muP table of ``r`` for ``world_size`` ranks; one-line errors only."""
    from launcher import checkpoint

    r.data = r.data.absolute()  # the run records where its data is, readable from any directory
    d = r.derive(world_size, cuda)
    schedule, table = schedule_and_table(r, d)
    if r.checkpoint.load is not None:
        checkpoint.resolve(r.checkpoint.load, r.checkpoint_dir)
    return RunPlan(r, d, env, schedule, table)


def build_trainer(
    r: Recipe, d: Derived, schedule: TokenSchedule, table: MupTable, extra_callbacks=(), start_tokens: int = 0
):
    """The trainer with ramp's standard callbacks, in the order they must run, built in the layout of the
    batch phase that starts at ``start_tokens`` (where a resume continues)."""
    from launcher import gpu
    from launcher.callbacks.batch_size_schedule import BatchSizeSchedule
    from launcher.callbacks.cbs_probes import CbsProbes
    from launcher.callbacks.checkpointing import Checkpointing
    from launcher.callbacks.loss_spikes import LossSpikes
    from launcher.callbacks.lr_schedule import LRSchedule
    from launcher.callbacks.manual_gc import ManualGC
    from launcher.callbacks.metrics import Metrics
    from launcher.callbacks.plotting import Plots
    from launcher.corpus import TOKENIZER_FILE
    from launcher.trainer import Trainer

    run_dir = r.run_dir
    if torch.distributed.get_rank() == 0:
        r.dump(run_dir / "config.yaml")
        (run_dir / "mup_table.json").write_text(table.to_json())
    bs = r.batch_schedule
    probes = []
    if r.probes.online:  # first at a step start: its decision is the batch the batch callback then sets
        drive = bs if bs.kind == "cbs" and bs.cbs_source == "probes" else None
        probes = [CbsProbes(r.probes, run_dir, r.requested_tokens, drive, schedule)]
    callbacks = [
        *probes,
        BatchSizeSchedule(
            d.batch_schedule.lr_scale
        ),  # before the LR callback: the step's batch and LR factor
        LRSchedule(schedule),
        *extra_callbacks,
        LossSpikes(r.resilience.spike_window, r.resilience.spike_zscore),
        Metrics(
            run_dir,
            r.training.log_interval,
            r.logging.tensorboard,
            r.logging.wandb,
            r.name,
            r.to_dict(),
        ),
        Checkpointing(r.checkpoint.interval, r.checkpoint.save_at_exit),
    ]
    if r.logging.plots:
        callbacks.append(Plots(run_dir))
    settings = gpu.resolve(r, d.device)
    if settings.manual_gc:
        callbacks.append(ManualGC(int(settings.manual_gc_interval)))
    trainer = Trainer(r, d, table, callbacks, phase=d.phase_at(start_tokens))
    if torch.distributed.get_rank() == 0:  # the run directory keeps its tokenizer (ramp-convert reads it)
        trainer.bundle.tokenizer.save(run_dir / TOKENIZER_FILE)
    return trainer
