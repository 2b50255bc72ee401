"""Layout cost model: hand-computed step costs, the layout a small batch forces, memory filtering, ties."""

from __future__ import annotations

import random

import pytest

from launcher.errors import RampError
from launcher.laws.layout_cost import (
    CostBreakdown,
    Hardware,
    LayoutCandidate,
    PlanRow,
    best_layout,
    enumerate_candidates,
    format_plan,
    rank_layouts,
    step_cost,
)
from launcher.recipe import ModelConfig

# moe-tiny's shape. By hand, per layer: attention 128*(4+2*4)*32 + 4*32*128 = 65536, router 8*128 = 1024,
# one expert 3*128*256 = 98304 (2 active, 8 in all); embedding 4096*128 = 524288 (tied).
MODEL = ModelConfig(
    num_layers=4,
    hidden_size=128,
    num_attention_heads=4,
    ffn_hidden_size=512,
    num_experts=8,
    moe_ffn_hidden_size=256,
    moe_router_topk=2,
    seq_length=256,
    vocab_size=4096,
)
N_FLOPS = 4 * (65536 + 1024 + 2 * 98304) + 524288  # 1,576,960: active matrices + the output projection
DENSE = 524288 + 4 * 65536 + 4 * 1024  # 790,528
EXPERTS = 4 * 8 * 98304  # 3,145,728
HW = Hardware(
    "hand", flops=1e9, intra_node_bw=1e9, inter_node_bw=1e8, devices_per_node=2, memory_bytes=None,
    latency_s=1e-4, precision="fp32",
)  # fmt: skip


def test_hand_case_pipeline_bubble_and_dp_allreduce():
    c = LayoutCandidate(tp=1, pp=2, vpp=1, ep=1, dp=2, micro_batch_size=1, num_microbatches=4)
    cost = step_cost(MODEL, c, 256, HW)
    compute = 6 * 1_576_960 * 8 * 256 / (4 * 1e9)
    assert N_FLOPS == 1_576_960 and compute == pytest.approx(4.84442112)
    assert cost.compute == pytest.approx(4.84442112)
    assert cost.bubble == pytest.approx(4.84442112 / 4)  # (pp - 1) / nmb
    assert (cost.tp_comm, cost.ep_comm) == (0.0, 0.0)
    # DP group of 2 in one node: 2 x (1/2 x bytes / 1e9 + 1e-4), dense 4*790528/2 B, experts 4*3145728/2 B.
    assert DENSE == 790_528 and EXPERTS == 3_145_728
    assert cost.dp_comm == pytest.approx(2 * (0.000790528 + 1e-4) + 2 * (0.003145728 + 1e-4))
    # Interleaving halves the bubble.
    v2 = step_cost(MODEL, LayoutCandidate(1, 2, 2, 1, 2, 1, 4), 256, HW)
    assert v2.bubble == pytest.approx(4.84442112 / 8)


def test_hand_case_tp_and_ep_communication_across_nodes():
    c = LayoutCandidate(tp=2, pp=1, vpp=1, ep=2, dp=2, micro_batch_size=2, num_microbatches=2)
    cost = step_cost(MODEL, c, 256, HW)
    assert cost.bubble == 0.0
    # SP: 8 collectives per layer per micro-batch over 2*256*128*4 = 262144 B, TP group inside a node.
    assert cost.tp_comm == pytest.approx(8 * 2 * 4 * (0.5 * 262144 / 1e9 + 1e-4))  # 0.014788608
    # EP spans tp*ep = 4 ranks > 2 per node: inter-node. Tokens per rank 2*256/2, x top-2 x 128 x 4 B.
    assert cost.ep_comm == pytest.approx(4 * 2 * 4 * (0.5 * 262144 / 1e8 + 1e-4))  # 0.04514304
    # DP spans tp*dp = 4 ranks: inter-node. Dense 4*790528/tp B over dp=2; experts 4*3145728/ep B over
    # tp*dp/ep = 2 ranks; each moves half its bytes twice.
    assert cost.dp_comm == pytest.approx(2 * (0.00790528 + 1e-4) + 2 * (0.03145728 + 1e-4))
    assert cost.total == pytest.approx(cost.compute + 0.014788608 + 0.04514304 + 0.07912512)


def test_enumeration_rules():
    cands = enumerate_candidates(MODEL, 4, 8, micro_batch_sizes=(1, 2, 4, 8))
    for c in cands:
        assert c.world_size == 4 and c.batch == 8
        assert MODEL.num_attention_heads % c.tp == 0 and MODEL.num_layers % (c.pp * c.vpp) == 0
        assert MODEL.num_experts % c.ep == 0 and (c.tp * c.dp) % c.ep == 0
        assert c.vpp == 1 or (c.pp > 1 and c.num_microbatches % c.pp == 0)
    assert LayoutCandidate(1, 1, 1, 4, 4, 2, 1) in cands and LayoutCandidate(4, 1, 1, 1, 1, 8, 1) in cands
    assert all(c.dp * c.micro_batch_size <= 8 for c in cands)
    # is_valid is applied to every candidate.
    only_tp1 = enumerate_candidates(MODEL, 4, 8, is_valid=lambda c: c.tp == 1)
    assert only_tp1 and all(c.tp == 1 for c in only_tp1)


def test_a_batch_with_no_room_for_dp_forces_tp_or_pp():
    # Micro-batch 8 and batch 8 on 2 devices: DP2 would need 16 sequences, so TP2 or PP2.
    c, _ = best_layout(MODEL, 2, 8, 256, Hardware.cpu_gloo(2), micro_batch_sizes=(8,))
    assert c.dp == 1 and c.tp * c.pp == 2
    # At 16 sequences DP2 is possible and wins (no TP communication, no bubble).
    c, _ = best_layout(MODEL, 2, 16, 256, Hardware.cpu_gloo(2), micro_batch_sizes=(8,))
    assert (c.dp, c.tp, c.pp) == (2, 1, 1)


def test_memory_rules_out_dp_only():
    rows = rank_layouts(MODEL, 2, 16, 256, Hardware.cpu_gloo(2), micro_batch_sizes=(8,))
    assert rows[0][0].dp == 2  # without a limit DP2 is the fastest
    dp_only = min(cost.memory_bytes for c, cost in rows if c.dp == 2)
    split = min(cost.memory_bytes for c, cost in rows if c.dp == 1)
    assert split < dp_only  # precondition: TP/PP splits the weights and activations
    hw = Hardware.cpu_gloo(2, memory_bytes=dp_only - 1)
    c, cost = best_layout(MODEL, 2, 16, 256, hw, micro_batch_sizes=(8,))
    assert c.dp == 1 and cost.memory_bytes <= dp_only - 1
    with pytest.raises(RampError, match="no layout of 2 devices runs batch 16 within"):
        best_layout(MODEL, 2, 16, 256, Hardware.cpu_gloo(2, memory_bytes=split - 1), micro_batch_sizes=(8,))


def test_ties_are_broken_deterministically():
    # No communication cost at all: DP2 and TP2 (and EP1/EP2) take the same time; more DP wins, then fewer EP.
    free = Hardware("free", 1e9, float("inf"), float("inf"), 2, None, 0.0, "fp32")
    cands = enumerate_candidates(MODEL, 2, 16, micro_batch_sizes=(8,))
    ranked = rank_layouts(MODEL, 2, 16, 256, free, candidates=cands)
    first, second = ranked[0][1], ranked[1][1]
    assert first.total == second.total and ranked[0][0] == LayoutCandidate(1, 1, 1, 1, 2, 8, 1)
    for seed in range(5):
        shuffled = cands[:]
        random.Random(seed).shuffle(shuffled)
        assert rank_layouts(MODEL, 2, 16, 256, free, candidates=shuffled) == ranked


def test_format_plan_and_presets():
    cost = CostBreakdown(compute=1.0, bubble=0.25, tp_comm=0.25, ep_comm=0.0, dp_comm=0.0, memory_bytes=2e9)
    text = format_plan([PlanRow(0, 1_200_000, 16, LayoutCandidate(2, 1, 1, 1, 1, 8, 2), cost)])
    assert "1.2M" in text and "TP2 PP1 EP1 DP1" in text and "16.7%" in text and "2.00" in text
    from launcher.laws.memory import ClusterConfig

    gpu = Hardware.from_cluster(
        ClusterConfig(gpus_per_node=8, nodes=2, gpu_memory_gb=80, runtime_reserve_gb=3)
    )
    assert gpu.memory_bytes == pytest.approx(77e9) and gpu.bandwidth(8) > gpu.bandwidth(16)
