"""The memory model (launcher/laws/memory.py) against hand counts, a CPU run's tensors, and the recipes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ramp_run import ROOT

from launcher import layout, pretrain, recipe
from launcher.laws.memory import (
    Kernels,
    Layout,
    RecomputeConfig,
    in_flight,
    layer_activation_bytes,
    plan_memory,
)
from launcher.recipe import ModelConfig

GPU_RECIPES = ["moe-1b-a0.2b", "moe-7b-a1b", "moe-30b-a3b"]

# h=64, 4 query heads in 2 groups of head dim 16, 4 experts of width 32, top-2, 2 MoE layers.
SMALL = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=16,
    num_experts=4,
    moe_ffn_hidden_size=32,
    moe_router_topk=2,
    seq_length=8,
    vocab_size=128,
    tie_embeddings=False,
)
TE_FUSED = Kernels(transformer_engine=True, fused_swiglu=True, fused_cross_entropy=True)


def test_parameters_by_hand():
    # per layer: QKV 64*(4+2*2)*16 = 8192, out 4*16*64 = 4096, two norms 128, router 4*64 = 256,
    # experts 4 * 3*64*32 = 24576 -> 37248; embedding and output 128*64 = 8192 each; final norm 64.
    n = 2 * 37248 + 8192 + 8192 + 64
    plan = plan_memory(SMALL, 128, Layout(), micro_batch=1, num_microbatches=1, precision="bf16")
    s = plan.stages[0]
    assert s.params == 2 * n and s.grads == 4 * n and s.optimizer == 12 * n  # bf16 weights, fp32 grads/Adam
    # EP2 halves the experts; the distributed optimizer shards dense state over dp=4 and the experts over
    # tp*dp/ep = 2 ranks.
    lay = Layout(ep=2, dp=4, distributed_optimizer=True)
    s = plan_memory(SMALL, 128, lay, micro_batch=1, num_microbatches=1, precision="bf16").stages[0]
    dense, expert = n - 2 * 24576, 2 * 12288
    assert s.params == 2 * (dense + expert)
    assert s.optimizer == pytest.approx(12 * (dense / 4 + expert / 2))
    # fp32: the weights are their own main copy, Adam keeps two moments
    s = plan_memory(SMALL, 128, Layout(), micro_batch=1, num_microbatches=1, precision="fp32").stages[0]
    assert (s.params, s.grads, s.optimizer) == (4 * n, 4 * n, 8 * n)


def test_pipeline_places_embedding_and_head():
    plan = plan_memory(SMALL, 128, Layout(pp=2), micro_batch=1, num_microbatches=4, precision="fp32")
    first, last = (s.params / 4 for s in plan.stages)
    assert first == 37248 + 8192 and last == 37248 + 8192 + 64
    assert plan.stages[0].logits == 0 and plan.stages[1].logits > 0


def test_one_layer_activations_by_hand():
    # bf16 (2 bytes), TE fused kernels, per token:
    # attention: norm input 64*2+4 = 132, norm output 128, QKV (4+2*2)*16*2 = 256, rotated q,k (4+2)*16*2
    #   = 192, context 4*16*2 = 128, softmax statistics 4*4 = 16                      -> 852
    # MoE: norm 132, norm output 128, router 64*4 + 3*4*4 = 304, routed input 2*64*2 = 256,
    #   experts 2 * (2*32*2 + 32*2) = 384                                             -> 1204
    per_token = 852 + 1204
    got = layer_activation_bytes(SMALL, Layout(), 2, 8, "bf16", RecomputeConfig(), TE_FUSED, moe=True)
    assert got == per_token * 8 * 2
    # TP2 with sequence parallelism halves it
    got = layer_activation_bytes(SMALL, Layout(tp=2), 2, 8, "bf16", RecomputeConfig(), TE_FUSED, moe=True)
    assert got == per_token * 8 * 2 / 2
    # recomputing the experts' activation drops 2 routed copies of 32*2 bytes; layernorm drops the MoE
    # norm's output (128) only: under TE the attention norm is fused into the QKV projection (megatron's
    # IdentityOp in its place is not recomputed), and so is a dense layer's pre-MLP norm
    rc = RecomputeConfig(granularity="selective", modules=["moe_act", "layernorm"])
    got = layer_activation_bytes(SMALL, Layout(), 2, 8, "bf16", rc, TE_FUSED, moe=True)
    assert got == (per_token - 2 * 64 - 128) * 8 * 2
    dense = layer_activation_bytes(SMALL, Layout(), 2, 8, "bf16", RecomputeConfig(), TE_FUSED, moe=False)
    rc = RecomputeConfig(granularity="selective", modules=["layernorm"])
    assert layer_activation_bytes(SMALL, Layout(), 2, 8, "bf16", rc, TE_FUSED, moe=False) == dense
    # the local spec's norms are modules: both outputs and torch's normalised inputs go (4 x 128)
    local = Kernels(transformer_engine=False, fused_swiglu=True, fused_cross_entropy=True)
    keep = layer_activation_bytes(SMALL, Layout(), 2, 8, "bf16", RecomputeConfig(), local, moe=True)
    got = layer_activation_bytes(SMALL, Layout(), 2, 8, "bf16", rc, local, moe=True)
    assert got == keep - 4 * 128 * 8 * 2
    # without TE: the s x s probabilities (fp32 softmax + bf16 copy: 4 heads * 8 * 6 bytes) replace the
    # statistics; the torch norms keep their normalised input (+128 each); GQA repeats k and v (+(8-2)*16*2)
    got = layer_activation_bytes(SMALL, Layout(), 2, 8, "bf16", RecomputeConfig(), local, moe=True)
    assert got == (per_token - 16 + 4 * 8 * 6 + 2 * 128 + 6 * 16 * 2) * 8 * 2


def test_full_recompute_keeps_layer_inputs():
    rc = RecomputeConfig(granularity="full", num_layers=1)
    plan = plan_memory(SMALL, 128, Layout(), micro_batch=2, num_microbatches=1, recompute=rc)
    assert plan.stages[0].activations == 2 * (2 * 8 * 64 * 2)  # 2 layers x one bf16 h-wide input


def test_in_flight_micro_batches():
    # 1F1B: stage r holds pp - r; interleaved: 2(pp-r-1) + (vpp-1)pp + 1 chunks of 1/vpp stage
    assert [in_flight(Layout(pp=4), r, 8) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight(Layout(pp=4), r, 2) for r in range(4)] == [2, 2, 2, 1]
    assert [in_flight(Layout(pp=4, vpp=2), r, 8) for r in range(4)] == [11 / 2, 9 / 2, 7 / 2, 5 / 2]
    assert in_flight(Layout(), 0, 8) == 1


@pytest.mark.parametrize(
    "sets",
    [
        [],
        ["parallel.distributed_optimizer=true", "model.qk_layernorm=true", "model.num_query_groups=2"],
    ],
    ids=["moe-tiny", "distopt-qknorm-gqa"],
)
def test_model_matches_a_cpu_run(sets):
    """Parameters, gradient buffers and Adam state of the built trainer, and the tensors autograd saves."""
    argv = ["--json", "--set", "training.micro_batch_size=2", "--set", "training.global_batch_size=2"]
    for s in sets:
        argv += ["--set", s]
    out = subprocess.run(
        [sys.executable, "-m", "tools.memory_probe", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # on CPU megatron's local spec: unfused attention, experts in a loop
    assert res["built"]["attention"] == "DotProductAttention" and res["built"]["experts"] == "SequentialMLP"
    m, p = res["measured"], res["predicted"]
    for key in ("params", "grads", "optimizer"):
        assert m[key] == pytest.approx(p[key], rel=0.01), key  # buffer padding only
    # saved activations: the router's small index tensors are not modelled
    assert m["saved_activations"] == pytest.approx(p["saved_activations"], rel=0.05)


def _dry_run_json(name: str, sets: list[str], capsys, monkeypatch) -> dict:
    for var in ("WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    argv = ["--recipe", name, "--dry-run", "--json"]
    for s in sets:
        argv += ["--set", s]
    assert pretrain.main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_every_gpu_recipe_fits_its_cluster_with_headroom(name, capsys, monkeypatch):
    plan = _dry_run_json(name, [], capsys, monkeypatch)
    r = recipe.load(name)
    assert plan["gpu_memory_gb"] == r.cluster.gpu_memory_gb
    assert set(plan["memory_gb"]) == {str(i) for i in range(r.parallel.pp)}
    assert plan["derived"]["world_size"] == r.cluster.world_size and plan["derived"]["precision"] == "bf16"
    assert max(plan["memory_gb"].values()) <= 0.85 * r.cluster.gpu_memory_gb  # >= 15% headroom


def test_a_recipe_that_cannot_fit_is_refused_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--recipe", "moe-7b-a1b", "--dry-run", "--set", "training.micro_batch_size=16"]
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ramp: error: memory plan: pipeline stage 0")
    assert "cluster.gpu_memory_gb=80" in err and "recompute" in err


def test_recompute_and_local_spec_change_the_plan(capsys, monkeypatch):
    base = _dry_run_json("moe-7b-a1b", [], capsys, monkeypatch)["memory_gb"]["0"]
    full = _dry_run_json("moe-7b-a1b", ["recompute.granularity=full"], capsys, monkeypatch)["memory_gb"]["0"]
    assert full < base / 2
    # megatron's local spec keeps 16 heads x 4096^2 attention probabilities per micro-batch and layer
    # (fp32 softmax + bf16 copy: 6.4 GB at micro-batch 4): moe-7b-a1b cannot run without TE
    argv = ["--recipe", "moe-7b-a1b", "--dry-run", "--set", "gpu.transformer_engine=local"]
    assert pretrain.main(argv) == 2
    assert "moe_act needs TransformerEngine's grouped GEMM" in capsys.readouterr().err
    assert pretrain.main([*argv, "--set", "recompute.granularity=none"]) == 2
    assert "memory plan: pipeline stage 0 needs" in capsys.readouterr().err


def test_slurm_step_sets_the_world():
    env = layout.Env.from_environ(
        {
            "SLURM_PROCID": "9",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "1",
            "SLURM_TASKS_PER_NODE": "8(x2)",
            "SLURM_STEP_ID": "0",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 16, 1, 8)
    assert env.from_launcher
    # torch's variables win (deepspeed/torchrun inside an srun step); the batch script alone is no launcher
    env = layout.Env.from_environ({"WORLD_SIZE": "4", "RANK": "2", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"})
    assert (env.rank, env.world_size) == (2, 4)
    assert layout.Env.from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}).world_size == 1


def test_gpu_smoke_without_cuda_is_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "tools.gpu_smoke"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip() == "gpu_smoke: error: no CUDA device visible (torch.cuda.is_available() is False)"
    )


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_smoke_slice_holds_what_one_gpu_of_the_layout_holds(name):
    """EP1 over the local experts with the same top-k routes as many tokens per GPU as balanced EP: the
    slice's layers keep the same activations (the router's logits over fewer experts aside) and expert
    weights as one GPU of the full layout."""
    from launcher.laws.memory import activation_terms, layer_params
    from tools import gpu_smoke

    full = recipe.load(name)
    cut = recipe.load(name, gpu_smoke.slice_sets(name))
    for moe in (True, False):
        args = (full.model.seq_length, "bf16", RecomputeConfig(), TE_FUSED, moe)
        a, b = activation_terms(full.model, *args), activation_terms(cut.model, *args)
        a.pop("moe.router", None), b.pop("moe.router", None)
        assert a == b
    p = full.parallel
    lay_full = Layout(tp=p.tp, pp=p.pp, ep=p.ep, dp=8)
    assert layer_params(full.model, lay_full, True).expert == layer_params(cut.model, Layout(), True).expert
    assert cut.model.num_layers == full.model.num_layers // p.pp


def test_gpu_smoke_peak_flops_by_board():
    """Dense bf16 peaks from NVIDIA's data sheets (half the sparse figures): the PCIe and NVL boards are not
    read as the SXM part whose name they contain."""
    from tools.gpu_smoke import peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H100 NVL") == 835e12
    assert peak_bf16_flops("NVIDIA H200 NVL") == 835e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA GeForce RTX 4090") is None


def test_local_spec_softmax_fusion_needs_apex_kernels(monkeypatch):
    """megatron's local attention imports Apex's masked-softmax kernels inside its forward when the fusion
    is on: on a machine without them the plan turns the fusion off with a note instead."""
    from launcher import gpu

    r = recipe.load("moe-1b-a0.2b", ["gpu.transformer_engine=local"])
    monkeypatch.setattr(gpu, "have_apex_softmax_kernels", lambda: False)
    probed = gpu.resolve(r, "cuda", probe=True)
    assert probed.settings["masked_softmax_fusion"] is False
    assert any(n.startswith("gpu.masked_softmax_fusion off: Apex") for n in probed.notes)
    assert gpu.resolve(r, "cuda", probe=False).settings["masked_softmax_fusion"] is True  # planned elsewhere
    monkeypatch.setattr(gpu, "have_apex_softmax_kernels", lambda: True)
    assert gpu.resolve(r, "cuda", probe=True).settings["masked_softmax_fusion"] is True


def test_gpu_smoke_overrides_reach_every_slice_and_the_slice_keys_win():
    """``--set`` applies to every slice (how a machine without TE ran it: the local spec), before the keys
    that cut the recipe to one GPU, which must still hold."""
    from tools import gpu_smoke

    extra = ("gpu.transformer_engine=local", "recompute.granularity=none", "parallel.ep=8")
    cut = recipe.load("moe-7b-a1b", gpu_smoke.slice_sets("moe-7b-a1b", 2, extra=extra))
    assert cut.gpu.transformer_engine == "local"
    assert cut.recompute.granularity == "none"
    assert (cut.parallel.ep, cut.model.num_experts, cut.training.micro_batch_size) == (1, 8, 2)


def test_gpu_smoke_names_a_synchronising_line_by_its_file():
    from tools import gpu_smoke

    assert gpu_smoke._where(str(ROOT / "launcher" / "trainer.py"), 431) == "launcher/trainer.py:431"
    site = "/opt/venv/lib/python3.12/site-packages/megatron/core/utils.py"
    assert gpu_smoke._where(site, 1206) == "megatron/core/utils.py:1206"
    in_tree = str(ROOT / ".venv/lib/python3.11/site-packages/megatron/core/utils.py")  # a venv in the tree
    assert gpu_smoke._where(in_tree, 7) == "megatron/core/utils.py:7"


def test_gpu_smoke_charges_a_synchronising_call_to_the_ramp_line_above_it(monkeypatch):
    """torch names the line that made the call (a library's, here); the count also names the line of ramp's
    code that called into the library, so a sync that ramp causes inside megatron is not megatron's alone."""
    import torch

    from tools import gpu_smoke

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)  # CPU: warn by hand below
    library: dict = {}
    source = "import warnings\ndef read():\n    warnings.warn('called a synchronizing CUDA operation')\n"
    exec(compile(source, "/venv/lib/python3.12/site-packages/megatron/core/utils.py", "exec"), library)
    ramp = {"read": library["read"]}
    exec(compile("def step():\n    read()\n    read()\n", str(ROOT / "launcher" / "fake.py"), "exec"), ramp)
    assert gpu_smoke.sync_sites(ramp["step"]) == {
        "megatron/core/utils.py:3 <- launcher/fake.py:2": 1,
        "megatron/core/utils.py:3 <- launcher/fake.py:3": 1,
    }
    # torch's own warnings come from C++ (TORCH_WARN), as the sync-debug ones do: the line that called in
    ramp = {"torch": torch}
    exec(
        compile("def step():\n    torch.tensor(torch.tensor(1.0))\n", str(ROOT / "tools/x.py"), "exec"), ramp
    )
    assert gpu_smoke.sync_sites(ramp["step"], match="copy construct") == {"tools/x.py:2 <- tools/x.py:2": 1}


def test_cuda_env_is_set_only_with_cuda_and_never_over_the_users(monkeypatch):
    import os

    import torch

    from launcher import gpu

    monkeypatch.setattr(os, "environ", {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.set_cuda_env_here() == {}
    assert os.environ == {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    added = gpu.set_cuda_env_here()
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in added
