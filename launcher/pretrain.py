"""Entry point: recipe -> checks -> distributed init -> Trainer.fit().

Launch with ``deepspeed``, ``torchrun``, ``srun`` or plain ``python`` (one process)::

    python -m launcher.pretrain --recipe moe-tiny --set training.train_steps=50
    deepspeed --num_gpus 8 launcher/pretrain.py --recipe moe-7b-a1b

Every check that can fail on user input runs before any process-group work and fails with one line and
exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the plan (sizes, schedule, memory per pipeline stage), then exit; without a "
        "launcher it plans for the recipe's cluster",
    )
    ap.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON only")
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
    r.data = r.data.absolute()  # the run records where its data is, readable from any directory
    env = layout.Env.from_environ()
    d = r.derive(*world_and_cuda(args, r, env))
    schedule, table = schedule_and_table(r, d)
    if r.checkpoint.load is not None:
        checkpoint.resolve(r.checkpoint.load, r.checkpoint_dir)
    return r, d, env, schedule, table


def planning_for_cluster(args: argparse.Namespace, r, env: layout.Env) -> bool:
    """A dry run started by hand (no launcher set a world size) plans for the recipe's cluster."""
    return bool(args.dry_run and r.cluster is not None and not env.from_launcher)


def world_and_cuda(args: argparse.Namespace, r, env: layout.Env) -> tuple[int, bool]:
    if planning_for_cluster(args, r, env):
        return r.cluster.world_size, True
    return env.world_size, torch.cuda.is_available()


def gpu_plan(args: argparse.Namespace, r, d, env: layout.Env):
    """The GPU settings in force and the memory plan; refuses what cannot fit, before any process starts."""
    from launcher import gpu

    probe = not planning_for_cluster(args, r, env)
    resolved = gpu.resolve(r, d.device, probe=probe)
    mem = gpu.memory_plan(r, d, resolved) if (d.device == "cuda" or args.dry_run) else None
    if mem is not None and d.device == "cuda":
        gpu.require_fits(mem)
    return resolved, mem


def set_threads(recipe, env: layout.Env) -> None:
    if recipe.training.threads:
        n = recipe.training.threads
    else:
        n = max(1, layout.available_cores() // max(env.local_world_size, 1))
    torch.set_num_threads(n)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        r, d, env, schedule, table = plan(args)
        resolved, mem = gpu_plan(args, r, d, env)
    except RampError as e:
        print(f"ramp: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run and args.json:
        print(json.dumps(dry_run_json(r, d, resolved, mem), indent=1))
        return 0
    if env.rank == 0:
        print(f"ramp: {r.name}: " + " ".join(d.lines()), flush=True)
        print(f"ramp: lr schedule: {schedule.describe()}", flush=True)
        print(
            f"ramp: parameter groups ({'muP' if r.mup.enabled else 'standard'}):\n{table.format_table()}",
            flush=True,
        )
        for note in resolved.notes:
            print(f"ramp: {note}", flush=True)
        if mem is not None:
            print(f"ramp: memory per pipeline stage (GB, busiest device):\n{mem.format_table()}", flush=True)
    if args.dry_run:
        return 0

    import patches
    from launcher import gpu, resilience, runlock

    if d.device == "cuda":
        gpu.set_cuda_env(os.environ)
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
        if env.rank == 0 and d.device == "cuda":
            built = ", ".join(f"{k} {v}" for k, v in gpu.built_classes(trainer.chunks).items())
            print(f"ramp: built: {built}", flush=True)
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


def dry_run_json(r, d, resolved, mem) -> dict:
    return {
        "recipe": r.name,
        "derived": dataclasses.asdict(d),
        "memory_gb": mem.memory_gb if mem else None,
        "gpu_memory_gb": mem.gpu_memory_gb if mem else None,
        "headroom": round(mem.headroom, 4) if mem and mem.headroom is not None else None,
        "stages": [s.as_gb() for s in mem.stages] if mem else None,
        "gpu": dict(resolved.settings),
    }


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
    from launcher import gpu
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
    settings = gpu.resolve(r, d.device)
    if settings.manual_gc:
        callbacks.append(ManualGC(int(settings.manual_gc_interval)))
    trainer = Trainer(r, d, table, callbacks)
    if torch.distributed.get_rank() == 0:  # the run directory keeps its tokenizer (ramp-convert reads it)
        trainer.bundle.tokenizer.save(run_dir / TOKENIZER_FILE)
    return trainer


if __name__ == "__main__":
    sys.exit(main())
