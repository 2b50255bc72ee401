"""megatron-core GPTModel with MoE layers, built from the recipe for the current parallel layout."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from launcher import gpu
from launcher.laws.memory import padded_vocab_size
from launcher.laws.mup import MupTable
from launcher.recipe import Derived, Recipe

__all__ = ["build_chunks", "padded_vocab_size", "transformer_config", "wrap_ddp"]


def recompute_kwargs(recipe: Recipe, device: str) -> dict:
    """megatron-core's recompute fields from the recipe's ``recompute`` section (CUDA only: megatron-core
    0.16's recompute paths build CUDA masks and reach for TransformerEngine's FP8 state)."""
    rc = recipe.recompute
    if rc.granularity == "none" or device != "cuda":
        return {}
    if rc.granularity == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(rc.modules))
    return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=rc.num_layers)


def transformer_config(recipe: Recipe, derived: Derived, table: MupTable):
    """The megatron-core TransformerConfig for this recipe, layout and parameter-group table."""
    from megatron.core.transformer import TransformerConfig

    m, p = recipe.model, recipe.parallel
    # muP attention scale (laws/mup.py); None keeps megatron's 1/sqrt(head_dim) and is also used when
    # the table's scale equals it (muP at the base head dim), so the base shape is the standard model.
    softmax_scale = table.softmax_scale if table.enabled else None
    if softmax_scale is not None and math.isclose(softmax_scale, 1.0 / math.sqrt(m.head_dim), rel_tol=1e-9):
        softmax_scale = None
    bf16 = derived.precision == "bf16"
    g = gpu.resolve(recipe, derived.device)  # on CPU: every fast path off
    te = g.te
    moe = {}
    if m.is_moe:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_router_topk=m.moe_router_topk,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_z_loss_coeff=m.moe_z_loss_coeff,
            moe_router_pre_softmax=m.moe_router_pre_softmax,
            moe_token_dispatcher_type=m.moe_token_dispatcher,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_hidden_size,
            moe_layer_freq=[0] * m.first_k_dense + [1] * (m.num_layers - m.first_k_dense),
            moe_grouped_gemm=te,
            moe_permute_fusion=g.moe_permute_fusion,
            moe_router_fusion=g.moe_router_fusion,
            moe_router_dtype="fp32",
        )
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        qk_layernorm=m.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        softmax_scale=softmax_scale,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.vpp and p.vpp > 1 else None,
        sequence_parallel=bool(p.sequence_parallel),
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=1,
        # Interleaved PP with batched p2p on one peer pair mixes activation and gradient tensors of
        # equal shape (silently wrong grads); Megatron-LM turns it off for VPP too (it overlaps p2p
        # there, and refuses VPP with pp=2 only when batching). Overlap needs it off as well.
        batch_p2p_comm=not (p.vpp and p.vpp > 1) and not g.overlap_p2p_comm,
        overlap_p2p_comm=g.overlap_p2p_comm,
        deallocate_pipeline_outputs=g.deallocate_pipeline_outputs,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        use_cpu_initialization=derived.device == "cpu",
        perform_initialization=True,
        bias_dropout_fusion=g.bias_dropout_fusion,
        bias_activation_fusion=g.bias_activation_fusion,
        apply_rope_fusion=g.apply_rope_fusion,
        masked_softmax_fusion=te or g.masked_softmax_fusion,
        gradient_accumulation_fusion=g.gradient_accumulation_fusion,
        cross_entropy_loss_fusion=g.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=g.cross_entropy_fusion_impl,
        persist_layer_norm=False,
        **recompute_kwargs(recipe, derived.device),
        **moe,
    )


def build_chunks(recipe: Recipe, derived: Derived, config, vocab_size: int) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage held by this rank (one chunk without VPP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    m = recipe.model
    te = gpu.resolve(recipe, derived.device).te
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for stage in range(vpp):
        vp_stage = stage if vpp > 1 else None
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=te, normalization="RMSNorm", vp_stage=vp_stage
        )
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            max_sequence_length=m.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=m.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(m.rotary_base),
            vp_stage=vp_stage,
        )
        if config.bf16:
            # Every weight in bf16, as Megatron-LM's Float16Module casts them: torch's and Apex's norms (CPU,
            # local spec) are built in fp32 whatever params_dtype says, and megatron's non-distributed bf16
            # optimizer maps its fp32 copies to the bf16 weights by position (its checkpoint save failed).
            for param in model.parameters():
                if param.dtype == torch.float32:
                    param.data = param.data.to(torch.bfloat16)
        # Mark experts expert-parallel even at EP=1, so the optimizer (and its checkpoint) has the same
        # structure in every layout and optimizer state reshards across EP=1 <-> EP>1.
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.allreduce = False
        if derived.device == "cuda":
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def wrap_ddp(
    recipe: Recipe, derived: Derived, config, chunks: list[torch.nn.Module]
) -> list[torch.nn.Module]:
    """megatron-core DDP: grad buffers, DP (and expert-DP) reduction, distributed-optimizer sharding.

    On GPU the gradient reduce-scatter and the parameter all-gather overlap with compute (the recipe's
    gpu.overlap_*), and the schedules get the sync functions Megatron-LM gives them.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    g = gpu.resolve(recipe, derived.device)
    interleaved = len(chunks) > 1
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=g.overlap_grad_reduce,
        overlap_param_gather=g.overlap_param_gather,
        align_param_gather=g.overlap_param_gather and interleaved,
        use_distributed_optimizer=recipe.parallel.distributed_optimizer,
        # Not megatron's check (it raises, from inside the backward pass, before the bad-step guard can
        # skip the update, and syncs the host once per bucket): the guard checks the reduced grad norm.
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk may skip bucketing, as Megatron-LM does for VPP.
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    one = (lambda fs: fs[0]) if not interleaved else (lambda fs: fs)
    if g.overlap_grad_reduce:
        config.grad_sync_func = one([c.start_grad_sync for c in wrapped])
    if g.overlap_param_gather and interleaved:
        config.param_sync_func = one([c.start_param_sync for c in wrapped])
    return wrapped
