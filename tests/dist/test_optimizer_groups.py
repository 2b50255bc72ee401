"""The optimizer that trains: every param group's LR, weight decay and eps, read off the built megatron
optimizer, the decay a step actually applies to the tensors, and the gradient clipping it updates with.

megatron-core writes ``weight_decay`` into its param groups only inside its ``OptimizerParamScheduler``, which
ramp replaces; without ramp setting it, torch's AdamW decays every group with the constructor's value (norms
included). These tests read the real objects, against values worked out by hand below, not from the table
code under test.

The model: the tiny MoE at 2x width (hidden 128 on a muP base of 64; expert hidden 128 on 64), 4 layers on a
base of 2 (Depth-muP, alpha 1/2), qk-norm (more norm gains), a dense first layer and a shared expert, so every
kind of group exists. Hand values, with m = 2 (width), m_L = 2 (depth), peak LR 1e-3, weight decay 0.1,
Adam eps 1e-8, independent decay (lr x wd fixed per group):

* hidden matrices (qkv, attention out, dense and expert and shared fc1/fc2):
  LR x 1/m x m_L^(-1/2) = 1/(2 sqrt 2),
  weight decay 0.1 x 2 sqrt 2, eps x 1/m x m_L^(-1/2);
* router (output-like init): LR x 1/(2 sqrt 2), weight decay 0.1 x 2 sqrt 2, eps x 1/(2 sqrt 2);
* embedding (tied head): LR x 1, weight decay 0.1, eps x 1/m;
* norm gains: weight decay 0, LR x 1, eps x 1.

Runs in a subprocess (this file is the probe): the CPU patches change torch globally.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ramp_run import ROOT, TINY, ramp_env

LR, WD, EPS = 1e-3, 0.1, 1e-8
CLIP = 1e-3  # far below the first step's gradient norm: every gradient is scaled down
BETA1 = 0.9  # optimizer.adam_beta1's default
SETS = [
    *TINY,
    "model.hidden_size=128",
    "model.moe_ffn_hidden_size=128",
    "model.ffn_hidden_size=256",
    "model.first_k_dense=1",
    "model.moe_shared_expert_hidden_size=128",
    "model.qk_layernorm=true",
    "mup.enabled=true",
    "mup.base_hidden_size=64",
    "mup.base_moe_ffn_hidden_size=64",
    "mup.base_ffn_hidden_size=128",
    "mup.base_shared_expert_hidden_size=64",
    "mup.base_head_dim=16",
    "mup.base_num_layers=2",
    f"optimizer.lr={LR}",
    f"optimizer.adam_eps={EPS}",
    "training.train_steps=1",
]
R2 = 2 * math.sqrt(2)  # 1 / (width ratio x depth ratio^-1/2)
# group -> (LR multiplier, weight decay, eps multiplier): by hand, see the module docstring.
EXPECTED = {
    "attention_qkv": (1 / R2, WD * R2, 1 / R2),
    "attention_out": (1 / R2, WD * R2, 1 / R2),
    "dense_mlp.fc1": (1 / R2, WD * R2, 1 / R2),
    "dense_mlp.fc2": (1 / R2, WD * R2, 1 / R2),
    "experts.fc1": (1 / R2, WD * R2, 1 / R2),
    "experts.fc2": (1 / R2, WD * R2, 1 / R2),
    "shared_experts.fc1": (1 / R2, WD * R2, 1 / R2),
    "shared_experts.fc2": (1 / R2, WD * R2, 1 / R2),
    "router": (1 / R2, WD * R2, 1 / R2),
    "embedding": (1.0, WD, 1 / 2),
    "norms": (1.0, 0.0, 1.0),
}


def _probe(work: str, out: str) -> None:
    import torch

    from launcher.laws.mup import group_of
    from tools.mup_coord_check import trainer_for

    def one_step(weight_decay: float) -> tuple[dict, dict, dict]:
        sets = [*SETS, f"optimizer.weight_decay={weight_decay}"]
        with trainer_for(sets, Path(work) / f"wd{weight_decay}") as trainer:
            chunk = trainer.chunks[0].module
            names = {id(p): n for n, p in chunk.named_parameters()}
            trainer.emit("on_step_start")  # the LR callback: LR and weight decay for step 1
            groups = {}
            for g in trainer.optimizer.param_groups:
                for p in g["params"]:
                    groups[names[id(p)]] = {k: float(g[k]) for k in ("lr", "weight_decay", "eps")}
            before = {n: p.detach().clone() for n, p in chunk.named_parameters()}
            trainer.train_step()
            after = {n: p.detach().clone() for n, p in chunk.named_parameters()}
        return groups, before, after

    def one_clipped_step() -> dict:
        """Count megatron's global-norm computations in one step and read the gradients it updated with."""
        from megatron.core.optimizer import clip_grads
        from megatron.core.optimizer import optimizer as megatron_optimizer

        real, calls = clip_grads.get_grad_norm_fp32, []

        def counting(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        modules = (megatron_optimizer, clip_grads)  # the name megatron's optimizers call, and its home
        with trainer_for([*SETS, f"optimizer.clip_grad={CLIP}"], Path(work) / "clip") as trainer:
            trainer.emit("on_step_start")
            for m in modules:
                m.get_grad_norm_fp32 = counting
            try:
                reported = trainer.train_step()["grad_norm"]
                in_a_step = len(calls)
                trainer.optimizer.get_grad_norm()
                in_one_norm = len(calls) - in_a_step  # one per sub-optimizer here (dense, experts)
            finally:
                for m in modules:
                    m.get_grad_norm_fp32 = real
            # the gradients the update used (clipped in place) and Adam's first moment after that update
            grad_sq = moment_sq = 0.0
            for sub in trainer.optimizer.chained_optimizers:
                for p in sub.get_parameters():
                    grad_sq += float(p.grad.double().pow(2).sum())
                    moment_sq += float(sub.optimizer.state[p]["exp_avg"].double().pow(2).sum())
        return {
            "norm_calls_in_a_step": in_a_step,
            "norm_calls_in_one_norm": in_one_norm,
            "reported": reported,
            "clipped_grad_norm": math.sqrt(grad_sq),
            "exp_avg_norm": math.sqrt(moment_sq),
        }

    groups, w0, decayed = one_step(WD)
    _, w0_again, undecayed = one_step(0.0)
    res: dict = {"groups": {n: {**v, "group": group_of(n)} for n, v in groups.items()}, "decay": {}}
    res["clip"] = one_clipped_step()
    for name in w0:
        assert torch.equal(w0[name], w0_again[name]), f"{name}: the two runs start from different weights"
        diff = (undecayed[name] - decayed[name]).double()  # = lr x wd x W0 exactly, up to rounding
        w = w0[name].double()
        res["decay"][name] = {
            "group": group_of(name),
            "identical": bool(torch.equal(decayed[name], undecayed[name])),
            # least-squares lr x wd from diff = lr wd W0 over every entry
            "lr_wd": float((diff * w).sum() / (w * w).sum()) if float((w * w).sum()) > 0 else 0.0,
            "lr": groups[name]["lr"],
        }
    Path(out).write_text(json.dumps(res))


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("optimizer-groups")
    out = work / "probe.json"
    env = ramp_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])  # this file imports ramp_run
    p = subprocess.run(
        [sys.executable, __file__, str(work), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, f"probe failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_every_param_group_has_its_own_lr_weight_decay_and_eps(probe):
    groups = probe["groups"]
    seen = {v["group"] for v in groups.values()}
    assert seen == set(EXPECTED), f"groups in the model: {sorted(seen)}"
    assert any("q_layernorm" in n for n in groups) and any("k_layernorm" in n for n in groups)
    for name, g in groups.items():
        lr_mult, wd, eps_mult = EXPECTED[g["group"]]
        # constant schedule, no warmup: the first step runs at the peak
        assert g["lr"] == pytest.approx(LR * lr_mult, rel=1e-9), f"{name}: lr"
        assert g["weight_decay"] == pytest.approx(wd, rel=1e-9, abs=0.0), f"{name}: weight_decay"
        assert g["eps"] == pytest.approx(EPS * eps_mult, rel=1e-9), f"{name}: eps"


def test_a_step_decays_matrices_by_their_group_and_never_norm_gains(probe):
    decay = probe["decay"]
    for name, d in decay.items():
        lr_mult, wd, _ = EXPECTED[d["group"]]
        if d["group"] == "norms":
            # weight decay 0.1 against 0: the gains come out bitwise the same
            assert d["identical"], f"{name}: a norm gain was decayed"
        else:
            assert not d["identical"], f"{name}: weight decay did nothing"
            assert d["lr_wd"] == pytest.approx(LR * lr_mult * wd, rel=1e-3), f"{name}: lr x wd applied"


def test_one_gradient_norm_per_step_and_the_update_clipped_by_it(probe):
    """The bad-step guard's norm is the one the update clips by: megatron computes the global norm once per
    step (it was twice: the guard's, then the optimizer step's own), the gradients are scaled by
    ``optimizer.clip_grad / (norm + 1e-6)`` (megatron's rule), and Adam's first step took them clipped:
    its first moment is (1 - beta1) x the clipped gradient (it would be the unclipped one, ~600x larger,
    were the clip applied after the update)."""
    clip = probe["clip"]
    assert clip["norm_calls_in_one_norm"] >= 1
    assert clip["norm_calls_in_a_step"] == clip["norm_calls_in_one_norm"]
    norm = clip["reported"]  # the norm before clipping is what the step reports
    assert norm > 10 * CLIP
    # megatron's fp32 norm on CPU is ~1e-4 from a float64 one here: the clipped norm to 1e-3
    assert clip["clipped_grad_norm"] == pytest.approx(CLIP * norm / (norm + 1e-6), rel=1e-3)
    assert clip["exp_avg_norm"] == pytest.approx((1 - BETA1) * clip["clipped_grad_norm"], rel=1e-5)


if __name__ == "__main__":  # the probe, in its own process
    _probe(sys.argv[1], sys.argv[2])
