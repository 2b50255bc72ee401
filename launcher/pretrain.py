"""Entry point: recipe -> checks -> distributed init -> Trainer.fit().

Launch with ``deepspeed``, ``torchrun``, ``srun`` or plain ``python`` (one process)::

    python -m launcher.pretrain --recipe moe-tiny --set training.train_steps=50
    deepspeed --num_gpus 8 launcher/pretrain.py --recipe moe-7b-a1b

Every check that can fail on user input runs before any process-group work and fails with one line and
exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by a launcher: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from launcher import layout
from launcher.errors import RampError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="ramp-train", description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True, help="recipe name under recipes/ or a YAML path")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the derived plan, then exit")
    # The DeepSpeed launcher appends --local_rank=N; torch's launchers set LOCAL_RANK instead.
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def schedule_and_table(r, d):
    """The token LR schedule and the parameter-group multiplier table the recipe implies."""
    from launcher.laws.mup import multiplier_table
    from launcher.laws.schedule import resolve_schedule

    schedule = resolve_schedule(r.schedule, d.train_tokens, d.tokens_per_step, d.warmup_tokens)
    table = multiplier_table(r.model, r.mup, r.optimizer.lr_mult, r.optimizer.weight_decay)
    return schedule, table


def plan(args: argparse.Namespace):
    """Everything decided before processes talk to each other: recipe, derived sizes, schedule, muP."""
    from launcher import checkpoint, recipe

    r = recipe.load(args.recipe, args.set)
    env = layout.Env.from_environ()
    d = r.derive(env.world_size, cuda_available=torch.cuda.is_available())
    schedule, table = schedule_and_table(r, d)
    if r.checkpoint.load is not None:
        checkpoint.resolve(r.checkpoint.load, r.checkpoint_dir)
    return r, d, env, schedule, table


def set_threads(recipe, env: layout.Env) -> None:
    if recipe.training.threads:
        n = recipe.training.threads
    else:
        n = max(1, (os.cpu_count() or 1) // max(env.local_world_size, 1))
    torch.set_num_threads(n)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        r, d, env, schedule, table = plan(args)
    except RampError as e:
        print(f"ramp: error: {e}", file=sys.stderr)
        return 2
    if env.rank == 0:
        print(f"ramp: {r.name}: " + " ".join(d.lines()), flush=True)
        print(f"ramp: lr schedule: {schedule.describe()}", flush=True)
        print(
            f"ramp: parameter groups ({'muP' if r.mup.enabled else 'standard'}):\n{table.format_table()}",
            flush=True,
        )
    if args.dry_run:
        return 0

    import patches
    from launcher import resilience, runlock

    if "LOCAL_RANK" in os.environ or args.local_rank is not None:
        runlock.die_with_parent()  # a killed launcher never leaves workers training
    applied = patches.apply_all(cpu=d.device == "cpu")
    set_threads(r, env)
    layout.init_world(d.device, env, timeout_min=r.resilience.collective_timeout_s / 60)
    if env.rank == 0:
        print(f"ramp: patches applied: {', '.join(applied) or 'none'}", flush=True)
    lock = runlock.RunLock(r.run_dir)
    heartbeat = resilience.Heartbeat(r.resilience.heartbeat_s)
    heartbeat.start()
    try:
        _take_run_dir(lock, r, env.rank)
        trainer = build_trainer(r, d, schedule, table)
        if r.checkpoint.load is not None:
            path = trainer.load_checkpoint(r.checkpoint.load)
            if env.rank == 0:
                where = (
                    f"resumed from {path} at step {trainer.state.step}"
                    if path
                    else "no checkpoint: fresh start"
                )
                print(f"ramp: {where}", flush=True)
        trainer.fit()
        heartbeat.stop()
        # Leave together: rank 0 hosts the rendezvous store, and a gloo peer that disappears while the
        # others tear down their groups can abort them.
        torch.distributed.barrier()
    except RampError as e:
        print(f"ramp: error: {e}", file=sys.stderr)
        return 2
    except resilience.RunStopped as e:
        print(f"ramp: error: {e}", file=sys.stderr)
        return 3
    finally:
        heartbeat.stop()
        if env.rank == 0:
            lock.release()
        layout.shutdown()
    if env.rank == 0:
        print(
            f"ramp: done; metrics in {r.run_dir / 'metrics.jsonl'}, plots in {r.run_dir / 'plots'}",
            flush=True,
        )
    return 0


def _take_run_dir(lock, r, rank: int) -> None:
    """Rank 0 takes the run directory's lock and clears what crashed saves left; every rank learns the
    outcome, so a refused job stops on all ranks with the holder's name."""
    from launcher import checkpoint

    outcome: list[object] = [None]
    if rank == 0:
        try:
            lock.acquire()
            cleaned = checkpoint.clean_stale(r.checkpoint_dir)
            if cleaned:
                print(f"ramp: removed stale {', '.join(cleaned)}", flush=True)
        except RampError as e:
            outcome = [str(e)]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RampError(str(outcome[0]))


def build_trainer(r, d, schedule, table, extra_callbacks=()):
    """The trainer with ramp's standard callbacks, in the order they must run."""
    from launcher.callbacks.checkpointing import Checkpointing
    from launcher.callbacks.loss_spikes import LossSpikes
    from launcher.callbacks.lr_schedule import LRSchedule
    from launcher.callbacks.metrics import Metrics
    from launcher.callbacks.plotting import Plots
    from launcher.trainer import Trainer

    run_dir = r.run_dir
    if torch.distributed.get_rank() == 0:
        r.dump(run_dir / "config.yaml")
        (run_dir / "mup_table.json").write_text(table.to_json())
    callbacks = [
        LRSchedule(schedule),
        *extra_callbacks,
        LossSpikes(r.resilience.spike_window, r.resilience.spike_zscore),
        Metrics(
            run_dir,
            r.training.log_interval,
            d.train_steps,
            r.logging.tensorboard,
            r.logging.wandb,
            r.name,
            r.to_dict(),
        ),
        Checkpointing(r.checkpoint.interval, r.checkpoint.save_at_exit),
    ]
    if r.logging.plots:
        callbacks.append(Plots(run_dir))
    return Trainer(r, d, table, callbacks)


if __name__ == "__main__":
    sys.exit(main())
