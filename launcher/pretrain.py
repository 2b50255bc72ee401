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

from launcher import build, layout
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


def plan(args: argparse.Namespace) -> build.RunPlan:
    """Everything decided before processes talk to each other: recipe, derived sizes, schedule, muP."""
    from launcher import recipe

    env = layout.Env.from_environ()
    r = recipe.load(args.recipe, args.set)
    world, cuda = world_and_cuda(args, r, env)
    return build.plan_run(r, world, cuda, env)


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
    if not (d.device == "cuda" or args.dry_run):
        return resolved, None
    plans = []  # every batch phase's layout must fit; the fullest is the one shown
    for i, ph in enumerate(d.phases):
        phase_d = dataclasses.replace(d, dp=ph.dp, num_microbatches=ph.num_microbatches)
        mem = gpu.memory_plan(r.with_layout(ph.parallel, ph.micro_batch_size), phase_d, resolved)
        if d.device == "cuda":
            where = f"batch phase {i} ({ph.batch} sequences, {ph.describe_layout()}): " if i else ""
            gpu.require_fits(mem, where)
        plans.append(mem)
    return resolved, max(plans, key=lambda m: m.peak_gb)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from launcher import gpu

    gpu.set_cuda_env_here()
    try:
        p = plan(args)
        r, d, env, schedule, table = p.recipe, p.derived, p.env, p.schedule, p.table
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
        print(f"ramp: batch phases:\n{d.format_phases()}", flush=True)
        if len(d.phases) > 1:
            print(f"ramp: layout cost model, per phase:\n{phase_costs(r, d)}", flush=True)
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

    heartbeat = resilience.Heartbeat(
        r.resilience.heartbeat_s, connect_timeout_s=r.resilience.collective_timeout_s
    )
    heartbeat.fork_beater(env.rank, env.world_size)  # first: no Python thread runs in this process yet
    lock = runlock.RunLock(r.run_dir)
    try:  # from here on every way out ends the beater (a rank that fails to start must not look alive)
        if "LOCAL_RANK" in os.environ or args.local_rank is not None:
            runlock.die_with_parent()  # a killed launcher never leaves workers training
        applied = patches.apply_all(cpu=d.device == "cpu")
        layout.set_threads(r.training.threads, env)
        layout.init_world(d.device, env, timeout_min=r.resilience.collective_timeout_s / 60)
        if env.rank == 0:
            print(f"ramp: patches applied: {', '.join(applied) or 'none'}", flush=True)
        heartbeat.start()
        _take_run_dir(lock, r, env.rank)
        from launcher.trainer import find_checkpoint, resume_tokens

        resume = find_checkpoint(r)
        trainer = build.build_trainer(r, d, schedule, table, start_tokens=resume_tokens(resume))
        if env.rank == 0 and d.device == "cuda":
            built = ", ".join(f"{k} {v}" for k, v in gpu.built_classes(trainer.chunks).items())
            print(f"ramp: built: {built}", flush=True)
        if resume is not None:
            trainer.load_checkpoint(resume)
        if env.rank == 0 and r.checkpoint.load is not None:
            where = "no checkpoint: fresh start"
            if resume is not None:
                where = f"resumed from {resume} at step {trainer.state.step}"
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


def phase_costs(r, d) -> str:
    """The layout cost model's estimate for every batch phase's layout (``laws/layout_cost.py``)."""
    from launcher.laws.layout_cost import LayoutCandidate, PlanRow, format_plan, step_cost

    vocab = r.planned_vocab_size() or 0
    if not vocab:
        return "  (needs model.vocab_size)"
    hardware = r.hardware(d.device, d.world_size)
    rows = []
    for i, ph in enumerate(d.phases):
        p = ph.parallel
        c = LayoutCandidate(p.tp, p.pp, p.vpp or 1, p.ep, ph.dp, ph.micro_batch_size, ph.num_microbatches)
        cost = step_cost(
            r.model,
            c,
            r.model.seq_length,
            hardware,
            vocab_size=vocab,
            distributed_optimizer=p.distributed_optimizer,
        )
        rows.append(PlanRow(i, ph.start_tokens, ph.batch, c, cost))
    return f"  on {hardware.name}\n{format_plan(rows)}"


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


if __name__ == "__main__":
    sys.exit(main())
