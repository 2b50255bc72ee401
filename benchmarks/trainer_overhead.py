"""What does ramp's trainer cost on top of megatron-core? Time per step, ramp vs a bare loop.

The same tiny MoE, the same data and the same megatron-core optimizer are stepped two ways in one
process: by ``Trainer.step`` (callbacks: LR schedule, metrics with their reductions and jsonl writes,
checkpoint check, stop agreement) and by a bare loop of ``forward_backward_func`` + ``optimizer.step``.
Blocks of steps alternate between the two (interleaved, so drift in machine load hits both), and the
ratio of median step times is reported. Goal: ratio <= 1.02.

    python benchmarks/trainer_overhead.py [--blocks 8] [--steps-per-block 5] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "trainer_overhead.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8, help="interleaved blocks per variant")
    ap.add_argument("--steps-per-block", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    ap.add_argument("--set", action="append", default=[], help="recipe override")
    args = ap.parse_args()

    import torch

    import patches
    from launcher import build, data, layout, optim, recipe
    from launcher.trainer import forward_step

    run_dir = Path(tempfile.mkdtemp(prefix="ramp-bench-"))
    total_steps = args.warmup * 2 + args.blocks * args.steps_per_block * 2 + 1
    sets = [
        "training.train_tokens=null",
        f"training.train_steps={total_steps}",
        "training.eval_interval=0",
        "training.log_interval=1",
        "logging.wandb.enabled=false",
        "logging.tensorboard=false",
        "logging.plots=false",
        "checkpoint.save_at_exit=false",
        f"logging.run_dir={run_dir}",
        *args.set,
    ]
    r = recipe.load("moe-tiny", sets)
    env = layout.Env.from_environ()
    d = r.derive(env.world_size)
    schedule, table = build.schedule_and_table(r, d)
    patches.apply_all(cpu=True)
    layout.set_threads(r.training.threads, env)
    layout.init_world("cpu", env)
    trainer = build.build_trainer(r, d, schedule, table)
    trainer.emit("on_train_start")

    def ramp_step() -> None:
        trainer.step()

    def bare_step() -> None:
        # What a hand-written megatron-core loop does per step: fetch the micro-batches, run the schedule,
        # step the optimizer (with the LR set directly), advance the data position.
        st = trainer.state
        rank, size = trainer.dp
        batches = data.microbatches(
            trainer.bundle.train,
            st.consumed_samples,
            st.global_batch_size,
            r.training.micro_batch_size,
            rank,
            size,
        )
        for c in trainer.chunks:
            c.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        optim.apply_schedule(
            trainer.optimizer,
            schedule.factor(st.consumed_tokens + st.global_batch_size * r.model.seq_length),
            r.optimizer.weight_decay,
        )
        trainer.forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=trainer.chunks[0],
            num_microbatches=len(batches),
            seq_length=r.model.seq_length,
            micro_batch_size=r.training.micro_batch_size,
            forward_only=False,
        )
        trainer.optimizer.step()
        st.step += 1
        st.consumed_samples += st.global_batch_size
        st.consumed_tokens += st.global_batch_size * r.model.seq_length

    variants = {"ramp": ramp_step, "bare": bare_step}
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for block in range(args.blocks):
        order = list(variants) if block % 2 == 0 else list(reversed(variants))
        for name in order:
            for _ in range(args.steps_per_block):
                t0 = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t0)
    layout.shutdown()

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ramp"] / med["bare"]
    if env.rank == 0:
        print(f"{'variant':<8} {'median s/step':>14} {'mean s/step':>12} {'steps':>6}")
        for k, v in times.items():
            print(f"{k:<8} {med[k]:>14.4f} {statistics.mean(v):>12.4f} {len(v):>6}")
        print(f"ratio (ramp / bare, medians): {ratio:.4f}  (goal <= 1.02)")
        result = {
            "ratio": ratio,
            "median_step_s": med,
            "mean_step_s": {k: statistics.mean(v) for k, v in times.items()},
            "steps_per_variant": {k: len(v) for k, v in times.items()},
            "world_size": env.world_size,
            "torch_threads": torch.get_num_threads(),
            "model": {
                "hidden": r.model.hidden_size,
                "layers": r.model.num_layers,
                "experts": r.model.num_experts,
                "seq": r.model.seq_length,
                "global_batch": r.training.global_batch_size,
            },
            "command": " ".join(sys.argv),
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
