"""megatron's RNG streams as ramp seeds them: every rank that must draw its own weights gets its own."""

from __future__ import annotations

import torch

from launcher import layout


def test_rng_streams_differ_across_stages_and_expert_ranks(monkeypatch):
    """moe-30b-a3b's PP4 x EP8 grid through megatron's own model_parallel_cuda_manual_seed, with its
    tracker replaced by one that records each stream's seed. Seeded as Megatron-LM does (seed + 100 x
    stage), megatron's expert stream (seed + 1024 + 100 x EP rank) repeats across stages: 11 of 32
    distinct; without the stage offset every stream repeats across stages."""
    from megatron.core.tensor_parallel import random as mrandom

    seen: dict[str, int] = {}

    class Recorder:
        def reset(self) -> None:
            seen.clear()

        def add(self, name: str, seed: int) -> None:
            seen[name] = seed

    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER", Recorder())
    monkeypatch.setattr(mrandom, "initialize_rng_tracker", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: None)
    streams = {}
    for pp in range(4):
        for ep in range(8):
            layout.seed_streams(1234, pp_rank=pp, tp_rank=0, ep_rank=ep, ep_size=8)
            streams[pp, ep] = dict(seen)
    expert = {s[mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME] for s in streams.values()}
    assert len(expert) == 32
    for name in (mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        assert len({streams[pp, 0][name] for pp in range(4)}) == 4, name
        assert len({streams[0, ep][name] for ep in range(8)}) == 1, name  # EP ranks share these streams
