"""muP wired into training: init scales, multiplier hooks, softmax scale and per-group LRs.

* At the base shape (every ratio 1) muP trains exactly the standard run: the parameterisation adds
  nothing there, so any stray rescale, hook or scale would show as a different loss.
* With muP at 2x width the per-group LRs in metrics.jsonl are the table's and the table sits beside the run.
* An inspection process checks what ``launcher.parametrization`` did to a 4x-width model: every matrix has its
  group's init std, and the model with hooks computes exactly the model without hooks whose weights
  carry the same multipliers (attention/expert output projections x residual, embedding x embedding
  multiplier, head x logit multiplier): the hooks scale the right outputs, once.
* ``dist``: the hooks act the same in layouts that split the model (TP+SP, PP+VPP with a tied head, EP):
  from a muP checkpoint each layout trains the single-process losses.

Runs happen in subprocesses (ramp's entry point, or this file as the inspection): the CPU patches change
torch globally.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ramp_run import ROOT, TINY, assert_continues, ramp_env, run_ramp, step_checkpoint

# TINY is hidden 64, 4 heads (head dim 16), expert hidden 64: the base shape below is TINY itself.
MUP_BASE = [
    "mup.enabled=true",
    "mup.base_hidden_size=64",
    "mup.base_moe_ffn_hidden_size=64",
    "mup.base_head_dim=16",
]
# 2x width and depth scaling (4 layers on a base of 2) and non-unit embedding/logit multipliers, so
# every hook and every kind of LR multiplier is in play.
MUP_2X = [
    *MUP_BASE,
    "model.hidden_size=128",
    "model.moe_ffn_hidden_size=128",
    "mup.base_num_layers=2",
    "mup.embedding_mult=2.0",
    "mup.output_mult=3.0",
]


def test_base_shape_trains_exactly_like_standard(tmp_path):
    steps = ["training.train_steps=4"]
    std = run_ramp(tmp_path / "standard", steps).check()
    mup = run_ramp(tmp_path / "mup", [*steps, *MUP_BASE]).check()
    table = json.loads((tmp_path / "mup" / "mup_table.json").read_text())
    assert table["enabled"] is True and table["width_mult"] == 1.0
    assert sorted(std.series("loss")) == [1, 2, 3, 4]
    assert mup.series("loss") == std.series("loss")
    assert mup.series("grad_norm") == std.series("grad_norm")


def test_mup_lrs_logged_are_the_tables(tmp_path):
    sets = ["training.train_steps=2", *MUP_2X, "optimizer.lr_mult.router=0.5"]  # an explicit override too
    run = run_ramp(tmp_path, sets).check()
    table_path = tmp_path / "mup_table.json"
    assert table_path.exists(), "the multiplier table must be saved beside the run"
    table = json.loads(table_path.read_text())

    # The saved table is the one laws/mup derives for this recipe.
    from launcher.laws.mup import multiplier_table
    from launcher.recipe import load

    r = load("moe-tiny", [*TINY, f"logging.run_dir={tmp_path}", *sets])
    derived = multiplier_table(r.model, r.mup, r.optimizer.lr_mult, r.optimizer.weight_decay)
    assert table == json.loads(derived.to_json())

    lr = yaml.safe_load((tmp_path / "config.yaml").read_text())["optimizer"]["lr"]
    assert table["groups"]["router"]["lr_mult"] == 0.5
    mults = {g["lr_mult"] for g in table["groups"].values()}
    assert len(mults) == 3, f"expected base, hidden-matrix and router multipliers, got {mults}"
    expected = {("lr" if m == 1.0 else f"lr/x{m:g}"): lr * m for m in mults}
    assert run.train, "no training records"
    for rec in run.train:  # constant schedule: every group at its peak
        logged = {k: v for k, v in rec.items() if k == "lr" or k.startswith("lr/")}
        assert logged.keys() == expected.keys(), f"step {rec['step']}: {sorted(logged)}"
        for k, v in expected.items():
            assert logged[k] == pytest.approx(v, rel=1e-9), f"{k} at step {rec['step']}"


# -- the inspection: init stds and hook equivalence, in a fresh process ---------------------------------
INSPECT_SETS = [
    *TINY,
    *MUP_BASE,
    "model.hidden_size=256",
    "model.moe_ffn_hidden_size=256",
    "model.tie_embeddings=false",  # head and embedding separate, so each multiplier maps to one weight
    "mup.base_num_layers=2",
    "mup.embedding_mult=2.0",
    "mup.output_mult=3.0",
    "training.train_steps=1",
]


def _inspect(run_dir: str, out: str) -> None:
    import torch

    import patches
    from launcher import data, layout, parametrization, recipe
    from launcher.laws.mup import group_of, multiplier_table
    from launcher.trainer import Trainer

    patches.apply_all(cpu=True)
    layout.init_world("cpu", layout.Env.from_environ())
    r = recipe.load("moe-tiny", [*INSPECT_SETS, f"logging.run_dir={run_dir}"])
    d = r.derive(1)
    table = multiplier_table(r.model, r.mup, r.optimizer.lr_mult, r.optimizer.weight_decay)
    trainer = Trainer(r, d, table, [])
    chunk = trainer.chunks[0].module
    stds = table.init_stds()
    init = {
        name: {"group": group_of(name), "std": float(p.detach().float().std()), "want": stds[group_of(name)]}
        for name, p in chunk.named_parameters()
        if group_of(name) in stds
    }

    mbs = r.training.micro_batch_size
    (batch,) = data.microbatches(trainer.bundle.train, 0, mbs, mbs, 0, 1)  # one micro-batch, every field
    chunk.eval()

    @torch.no_grad()
    def loss() -> float:
        out = chunk(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return float(out.float().mean())

    with_hooks = loss()
    removed = 0
    for module in chunk.modules():
        for key, fn in list(module._forward_hooks.items()):
            if getattr(fn, "__module__", "") == parametrization.__name__:
                del module._forward_hooks[key]
                removed += 1
    without_hooks = loss()
    with torch.no_grad():
        for name, p in chunk.named_parameters():
            g = group_of(name)
            if g in ("attention_out", "experts.fc2", "shared_experts.fc2", "dense_mlp.fc2"):
                p.mul_(table.residual_mult)
            elif g == "embedding":
                p.mul_(table.embedding_mult)
            elif g == "output":
                p.mul_(table.output_logit_mult)
    as_weights = loss()
    Path(out).write_text(
        json.dumps(
            {
                "init": init,
                "hooks_removed": removed,
                "with_hooks": with_hooks,
                "without_hooks": without_hooks,
                "as_weights": as_weights,
                "softmax_scale": trainer.config.softmax_scale,
                "table": {
                    "residual": table.residual_mult,
                    "embedding": table.embedding_mult,
                    "logits": table.output_logit_mult,
                    "softmax_scale": table.softmax_scale,
                },
            }
        )
    )
    layout.shutdown()


def test_init_stds_and_hooks_match_the_table(tmp_path):
    out = tmp_path / "inspect.json"
    env = ramp_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])  # this file imports ramp_run
    p = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "run"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, f"inspection failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    res = json.loads(out.read_text())
    t = res["table"]
    assert t["residual"] != 1.0 and t["embedding"] != 1.0 and t["logits"] != 1.0

    groups = {v["group"] for v in res["init"].values()}
    assert {
        "embedding",
        "attention_qkv",
        "attention_out",
        "experts.fc1",
        "experts.fc2",
        "router",
        "output",
    } <= (groups)
    for name, v in res["init"].items():
        # sampling error of a std over >= 1024 entries is < 3%
        assert v["std"] == pytest.approx(v["want"], rel=0.1), f"{name} ({v['group']}): init std"

    # The model with hooks is the model without hooks with the multipliers moved into the weights.
    # 2 residual hooks per layer (attention, MoE) + embedding + logits.
    assert res["hooks_removed"] == 2 * 4 + 2
    assert res["with_hooks"] == pytest.approx(res["as_weights"], rel=1e-5)
    assert abs(res["with_hooks"] - res["without_hooks"]) > 1e-3, "the hooks change nothing"
    # muP attention scale with head dim 64 on a base of 16: sqrt(16)/64, not 1/sqrt(64)
    assert res["softmax_scale"] == pytest.approx(t["softmax_scale"]) == pytest.approx(4.0 / 64)


# -- layouts: the hooks act the same when the model is split ------------------------------------------------
STEPS, RESUME_AT = 5, 2
LAYOUTS = {
    "tp2_sp": ["parallel.tp=2"],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"],  # chunks without embedding or head; tied head on PP
    "ep2": ["parallel.ep=2"],
}


@pytest.fixture(scope="module")
def mup_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mup-ref")
    sets = [
        *MUP_2X,
        f"training.train_steps={STEPS}",
        f"checkpoint.interval={RESUME_AT}",
        "checkpoint.keep_last=5",
    ]
    run = run_ramp(run_dir, sets).check()
    assert sorted(run.series("loss")) == list(range(1, STEPS + 1))
    return run


@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mup_layout_matches_single_process(layout, mup_reference, tmp_path):
    sets = [
        *MUP_2X,
        *LAYOUTS[layout],
        f"training.train_steps={STEPS}",
        f"checkpoint.load={step_checkpoint(mup_reference, RESUME_AT)}",
        "checkpoint.save_at_exit=false",
    ]
    run = run_ramp(tmp_path, sets, nproc=2).check()
    assert_continues(run, mup_reference, RESUME_AT + 1, STEPS)


if __name__ == "__main__":  # the inspection, in its own process
    _inspect(sys.argv[1], sys.argv[2])
