"""Route megatron-core's model-parallel RNG tracker to the CPU generator.

``tensor_parallel.random`` reads and writes CUDA RNG state through private helpers when it forks the
model-parallel / expert-parallel RNG streams. On CPU the "CUDA" RNG is the CPU generator, so the helpers
read and write that; the warning it then prints on every fork ("CPU RNG state changed within GPU RNG
context") is expected and silenced.
"""

from __future__ import annotations

import logging

import torch

from patches import Patch


def _apply() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)


PATCH = Patch(
    name="rng",
    fixes="model-parallel RNG tracker reads/writes CUDA RNG state",
    versions=">=0.16,<0.20",
    cpu_only=True,
    apply_fn=_apply,
)
