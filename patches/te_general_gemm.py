"""Upstream bug: ``moe_utils`` names ``te_general_gemm`` even when TransformerEngine is absent.

megatron-core 0.16.x imports ``te_general_gemm`` only inside ``try: import transformer_engine`` but the
router's gating GEMM tests ``te_general_gemm is not None`` unconditionally, so without TE the router
raises NameError. Defining it as None selects the plain matmul, which is what the code intends.
"""

from __future__ import annotations

from patches import Patch


def _needed() -> bool:
    from megatron.core.transformer.moe import moe_utils

    return not hasattr(moe_utils, "te_general_gemm")


def _apply() -> None:
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None


PATCH = Patch(
    name="te_general_gemm",
    fixes="NameError on te_general_gemm in the MoE router when TransformerEngine is not installed",
    versions=">=0.16,<0.20",
    cpu_only=False,
    apply_fn=_apply,
    needed=_needed,
)
