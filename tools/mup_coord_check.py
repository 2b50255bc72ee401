"""muP coordinate check: per-module activation and update sizes across width, standard vs muP.

    ramp-mup-coord-check --out runs/coord                      # widths 64 128 256 512, 10 steps
    ramp-mup-coord-check --widths 64 128 256 --steps 3 --out /tmp/coord

For each width and parameterisation the tiny MoE (hidden = width, 4 heads, expert hidden = width; the
base shape is the first width) trains a few steps in this one process (trainers are built and torn down
in sequence). For every matrix type of the model (embedding, attention QKV, attention output projection,
expert up and down projections, router, output head) it records, at every step:

* ``act``: RMS of the matrix's output on the step's batch (embedding rows, QKV, the attention output
  projection, expert fc1 and fc2 outputs, router logits, output logits), multipliers included;
* ``update``: RMS of what the step's parameter update does to that output on the same input,
  ``rms(dW x)`` (times the embedding or logit multiplier where one applies), averaged over layers and
  experts. This is the quantity muP keeps width-independent; the raw ``rms(dW)`` of a hidden matrix
  shrinks like 1/width under muP with Adam by design, and is stored as ``param_update``.

The slope of log(RMS) against log(width), of the mean over the second half of the steps, is written per
module: flat (about 0) under muP; under standard parameterisation the logits and the hidden-matrix
updates grow about linearly with width. Under muP the router's logits start smaller at larger width
(output-like init, std ~ 1/width: the initial routing tends to uniform) while its updates stay flat.
Writes ``coord_check.json`` and ``coord_check.png`` into ``--out``. CPU only (gloo, one process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: make the project importable
    sys.path.insert(0, str(ROOT))

MODULES = ("embedding", "attention_qkv", "attention_out", "experts_fc1", "experts_fc2", "router", "output")
PARAMETRISATIONS = ("standard", "mup")
HEADS = 4

# The tiny MoE of the checks, at any width: short sequences and one small micro-batch keep it quick.
BASE_SETS = [
    "model.num_layers=2",
    "model.num_experts=4",
    "model.moe_router_topk=2",
    "model.seq_length=64",
    "training.micro_batch_size=8",
    "training.global_batch_size=8",
    "training.train_tokens=null",
    "training.eval_interval=0",
    "training.log_interval=1",
    "schedule.style=constant",
    "schedule.warmup_frac=null",
    "checkpoint.save_at_exit=false",
    "logging.tensorboard=false",
    "logging.plots=false",
    "logging.wandb.enabled=false",
]


def width_sets(width: int, base_width: int, mup: bool) -> list[str]:
    """Recipe overrides for one width of the family; muP's base shape is the family at ``base_width``."""
    sets = [
        f"model.hidden_size={width}",
        f"model.num_attention_heads={HEADS}",
        f"model.ffn_hidden_size={2 * width}",
        f"model.moe_ffn_hidden_size={width}",
        f"mup.enabled={str(mup).lower()}",
    ]
    if mup:
        sets += [
            f"mup.base_hidden_size={base_width}",
            f"mup.base_moe_ffn_hidden_size={base_width}",
            f"mup.base_head_dim={base_width // HEADS}",
        ]
    return sets


# -- one process, several trainers -------------------------------------------------------------------------
_world_ready = False


def ensure_world(threads: int | None = None) -> None:
    """Patches, threads (default: every core) and a 1-process gloo world, once per process (the patches
    change torch globally)."""
    global _world_ready
    if _world_ready:
        return
    import torch

    import patches
    from launcher import layout

    patches.apply_all(cpu=True)
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    layout.init_world("cpu", layout.Env.from_environ())
    _world_ready = True


@contextmanager
def trainer_for(sets: list[str], run_dir: Path, recipe_name: str = "moe-tiny") -> Iterator[Any]:
    """A Trainer (LR schedule callback only) for ``recipe_name`` + ``sets``; its megatron state is torn down
    on exit so the next one can be built in the same process."""
    from megatron.core.transformer.moe import moe_utils

    from launcher import build, layout, recipe
    from launcher.callbacks.lr_schedule import LRSchedule
    from launcher.trainer import Trainer

    ensure_world()
    r = recipe.load(recipe_name, [*sets, f"logging.run_dir={run_dir}"])
    d = r.derive(1)
    if d.device != "cpu":
        raise SystemExit("this tool runs on CPU (one gloo process)")
    schedule, table = build.schedule_and_table(r, d)
    trainer = Trainer(r, d, table, [LRSchedule(schedule)])
    try:
        yield trainer
    finally:
        # megatron's aux-loss tracker is a module global sized by the first model's layer count: empty it
        # so the next trainer (another depth) starts its own.
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
        layout.destroy_parallel()


# -- measurement -------------------------------------------------------------------------------------------
def _rms(t) -> float:
    return float(t.detach().float().pow(2).mean().sqrt()) if t.numel() else float("nan")


EMBED = "embedding.word_embeddings.weight"


class Recorder:
    """Hooks on one unwrapped GPTModel: module outputs and the inputs of every tracked matrix, per step."""

    def __init__(self, chunk, table) -> None:
        self.table = table
        self.acts: dict[str, list[float]] = defaultdict(list)
        self.inputs: dict[str, list] = defaultdict(list)  # param name -> inputs seen this step
        self.token_ids: list = []
        self.handles: list = []
        self.params = dict(chunk.named_parameters())
        self.tracked: dict[str, str] = {}  # param name -> module whose output its update moves
        modules = dict(chunk.named_modules())
        self._output(chunk.embedding, "embedding", tuple_out=False)
        self.handles.append(chunk.embedding.register_forward_pre_hook(self._ids, with_kwargs=True))
        head = "output_layer.weight" if "output_layer.weight" in self.params else EMBED  # tied: embedding
        self._inputs(chunk.output_layer, "output", head)
        self._output(chunk.output_layer, "output")
        for i, layer in enumerate(chunk.decoder.layers):
            p = f"decoder.layers.{i}"
            for lin, key in (("linear_qkv", "attention_qkv"), ("linear_proj", "attention_out")):
                mod = modules[f"{p}.self_attention.{lin}"]
                self._output(mod, key)
                self._inputs(mod, key, f"{p}.self_attention.{lin}.weight")
            for name, mod in modules.items():
                for lin, key in (("linear_fc1", "experts_fc1"), ("linear_fc2", "experts_fc2")):
                    if name.startswith(f"{p}.mlp.experts.") and name.endswith(lin):
                        self._output(mod, key)
                        self._inputs(mod, key, f"{name}.weight")
            self._inputs(layer.mlp.router, "router", f"{p}.mlp.router.weight")
            self.handles.append(layer.mlp.router.register_forward_pre_hook(self._router_logits))

    def _output(self, module, key: str, tuple_out: bool = True) -> None:
        def hook(mod, args, output):
            if mod.training and (output[0] if tuple_out else output).numel():  # an expert given no tokens
                self.acts[key].append(_rms(output[0] if tuple_out else output))

        self.handles.append(module.register_forward_hook(hook))

    def _ids(self, mod, args, kwargs) -> None:
        if mod.training:
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            self.token_ids.append(ids.detach().reshape(-1).clone())

    def _router_logits(self, mod, args) -> None:
        import torch.nn.functional as F

        if mod.training:
            self.acts["router"].append(_rms(F.linear(args[0].float(), mod.weight.float())))

    def _inputs(self, module, key: str, param: str) -> None:
        self.tracked[param] = key

        def hook(mod, args):
            if mod.training and args[0].numel():
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                self.inputs[param].append(x[:256].float().clone())

        self.handles.append(module.register_forward_pre_hook(hook))

    def snapshot(self) -> dict:
        return {n: self.params[n].detach().float().clone() for n in {*self.tracked, EMBED}}

    def step_stats(self, before: dict) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """Activation RMS per module, update effect rms(dW x) per module, raw rms(dW) per muP group."""
        import torch.nn.functional as F

        from launcher.laws.mup import group_of

        t = self.table
        delta = {n: self.params[n].detach().float() - w for n, w in before.items()}
        upd: dict[str, list[float]] = defaultdict(list)
        raw: dict[str, list[float]] = defaultdict(list)
        for name, module in self.tracked.items():
            raw[group_of(name)].append(_rms(delta[name]))
            mult = t.output_logit_mult if module == "output" else 1.0
            upd[module] += [_rms(F.linear(x, delta[name])) * mult for x in self.inputs[name]]
        upd["embedding"] = [_rms(delta[EMBED][ids]) * t.embedding_mult for ids in self.token_ids]
        raw.setdefault("embedding", [_rms(delta[EMBED])])
        stats = (
            {k: _mean(self.acts.get(k, [])) for k in MODULES},
            {k: _mean(upd.get(k, [])) for k in MODULES},
            {k: _mean(v) for k, v in raw.items()},
        )
        self.acts.clear()
        self.inputs.clear()
        self.token_ids.clear()
        return stats

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _mean(values: list[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def measure(
    parametrisation: str, width: int, base_width: int, steps: int, sets: list[str], work: Path
) -> dict:
    """Train ``steps`` steps at one width; per-step activation, update and raw-update RMS."""
    run_dir = work / f"{parametrisation}-w{width}"
    family = width_sets(width, base_width, parametrisation == "mup")
    with trainer_for([*BASE_SETS, *family, f"training.train_steps={steps}", *sets], run_dir) as trainer:
        chunk = trainer.chunks[0].module  # the GPTModel inside megatron's DDP
        rec = Recorder(chunk, trainer.table)
        out: dict[str, list] = {"act": [], "update": [], "param_update": [], "loss": []}
        try:
            for _ in range(steps):
                before = rec.snapshot()
                trainer.emit("on_step_start")
                metrics = trainer.train_step()
                act, upd, raw = rec.step_stats(before)
                out["act"].append(act)
                out["update"].append(upd)
                out["param_update"].append(raw)
                out["loss"].append(metrics["lm_loss"])
        finally:
            rec.remove()
    return out


def slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(width)."""
    pts = [(math.log(w), math.log(v)) for w, v in zip(widths, values) if v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        return math.nan
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def late_mean(per_step: list[dict[str, float]], module: str) -> float:
    """Mean over the second half of the steps: one step's update is noisy (a router's swings 3x)."""
    tail = per_step[len(per_step) // 2 :]
    return _mean([s[module] for s in tail])


def summarise(results: dict, widths: list[int]) -> dict:
    """Slope across width of the late-steps mean, per parameterisation, quantity and module."""
    out: dict = {}
    for par, by_width in results.items():
        out[par] = {}
        for qty in ("act", "update"):
            out[par][qty] = {
                m: slope(widths, [late_mean(by_width[str(w)][qty], m) for w in widths]) for m in MODULES
            }
    return out


def plot(results: dict, widths: list[int], steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (("act", "activation RMS"), ("update", "update effect RMS  rms(dW x)"))
    fig, axes = plt.subplots(len(rows), len(MODULES), figsize=(3.3 * len(MODULES), 6.4), squeeze=False)
    colors = {"standard": "tab:red", "mup": "tab:blue"}
    for r, (qty, label) in enumerate(rows):
        for c, module in enumerate(MODULES):
            ax = axes[r][c]
            for par in results:
                for t in range(steps):
                    ys = [results[par][str(w)][qty][t][module] for w in widths]
                    last = t == steps - 1
                    ax.plot(
                        widths,
                        ys,
                        "o-" if last else "-",
                        color=colors.get(par, "k"),
                        alpha=1.0 if last else 0.15 + 0.5 * t / max(steps - 1, 1),
                        lw=1.6 if last else 0.8,
                        ms=3,
                        label=f"{par} (step {t + 1})" if last else None,
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{module}" if r == 0 else "")
            ax.set_xlabel("width" if r == len(rows) - 1 else "")
            if c == 0:
                ax.set_ylabel(label)
            lo, hi = ax.get_ylim()
            if hi / lo < 10:  # at least a decade, so a flat line looks flat
                mid = math.sqrt(lo * hi)
                ax.set_ylim(mid / math.sqrt(10), mid * math.sqrt(10))
            ax.grid(alpha=0.3, which="both")
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"muP coordinate check: tiny MoE, steps 1..{steps} (faint: earlier steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ramp-mup-coord-check", description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--steps", type=int, default=10, help="training steps per run")
    ap.add_argument("--out", type=Path, required=True, help="directory for coord_check.json and .png")
    ap.add_argument("--parametrisations", nargs="+", choices=PARAMETRISATIONS, default=list(PARAMETRISATIONS))
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra recipe override (e.g. optimizer.lr=0.01)",
    )
    args = ap.parse_args(argv)
    widths = sorted(args.widths)
    if len(widths) < 2 or any(w % HEADS or w < HEADS for w in widths):
        ap.error(f"give at least two widths, each a multiple of {HEADS}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="ramp-coord-") as tmp:
        for par in args.parametrisations:
            results[par] = {}
            for w in widths:
                res = measure(par, w, widths[0], args.steps, args.sets, Path(tmp))
                results[par][str(w)] = res
                last_a, last_u = res["act"][-1], res["update"][-1]
                print(
                    f"{par:<8} width {w:>4}: loss {res['loss'][-1]:.4f} | act "
                    + " ".join(f"{m} {last_a[m]:.3g}" for m in MODULES)
                    + " | update "
                    + " ".join(f"{m} {last_u[m]:.3g}" for m in MODULES),
                    flush=True,
                )
    slopes = summarise(results, widths)
    print(
        f"\nlog-log slope across width of the mean over steps {args.steps // 2 + 1}-{args.steps} (0 = flat):"
    )
    print(f"{'':<10}{'':<8}" + "".join(f"{m:>14}" for m in MODULES))
    for par, by_qty in slopes.items():
        for qty, by_mod in by_qty.items():
            print(f"{par:<10}{qty:<8}" + "".join(f"{by_mod[m]:>14.3f}" for m in MODULES))
    payload = {
        "widths": widths,
        "steps": args.steps,
        "base_width": widths[0],
        "heads": HEADS,
        "overrides": [*BASE_SETS, *args.sets],
        "modules": list(MODULES),
        "slopes": slopes,
        "results": results,
        "command": " ".join(["ramp-mup-coord-check", *(argv if argv is not None else sys.argv[1:])]),
    }
    (args.out / "coord_check.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(results, widths, args.steps, args.out / "coord_check.png")
    print(f"wrote {args.out / 'coord_check.json'} and {args.out / 'coord_check.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
