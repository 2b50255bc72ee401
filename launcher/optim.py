"""AdamW through megatron-core's optimizer, with one param group per LR multiplier.

Per-module learning rates (muP multipliers, recipe overrides) become megatron-core param-group overrides:
each group's ``max_lr`` is the peak LR times its multiplier, and ``lr_mult`` carries the multiplier as
the group's identity (megatron matches groups by it when loading a checkpoint). The LR schedule then sets
``lr = max_lr * factor(tokens)`` for every group each step.

Weight decay is per group too: ``weight_decay = optimizer.weight_decay * wd_mult`` (0 for norms and biases,
the muP rule for matrices). megatron-core writes that key only inside its ``OptimizerParamScheduler.step``,
which ramp does not use, and its param groups carry no ``weight_decay`` of their own, so without
:func:`apply_schedule` torch's AdamW would decay every group with the constructor's value. It is set at build
and again every step, because loading optimizer state restores the saved groups' hyper-parameters.
"""

from __future__ import annotations

import torch

from launcher.laws.mup import MupTable
from launcher.recipe import Derived, Recipe


def build_optimizer(recipe: Recipe, derived: Derived, chunks: list[torch.nn.Module], table: MupTable):
    """megatron-core's optimizer with one param-group override per row of the multiplier table."""
    from megatron.core.optimizer import (
        OptimizerConfig,
        ParamKey,
        get_megatron_optimizer,
        get_standard_config_overrides,
    )

    o, s = recipe.optimizer, recipe.schedule
    bf16 = derived.precision == "bf16"
    config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.lr * s.min_lr_ratio,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=recipe.parallel.distributed_optimizer,
        decoupled_weight_decay=True,
    )
    overrides = get_standard_config_overrides(config)
    for globs, override in table.param_group_overrides(config.lr, config.min_lr, config.adam_eps):
        overrides[ParamKey(name=tuple(globs))] = override
    optimizer = get_megatron_optimizer(config, chunks, config_overrides=overrides)
    apply_schedule(optimizer, lr_factor=0.0, weight_decay=o.weight_decay)
    return optimizer


def apply_schedule(optimizer, lr_factor: float, weight_decay: float) -> None:
    """Every group at its own peak LR times the schedule's factor, and its own weight decay
    (``weight_decay`` x the group's ``wd_mult``), as megatron's ``OptimizerParamScheduler.step`` does."""
    for group in optimizer.param_groups:
        group["lr"] = group["max_lr"] * lr_factor
        group["weight_decay"] = weight_decay * group["wd_mult"]


def group_lrs(optimizer) -> dict[str, float]:
    """Distinct LRs keyed by multiplier, for logging (``lr`` is the unit-multiplier group)."""
    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        mult = float(group.get("lr_mult", 1.0))
        out["lr" if mult == 1.0 else f"lr/x{mult:g}"] = float(group["lr"])
    return out


@torch.no_grad()
def step_with_grad_norm(optimizer, grad_norm: float) -> bool:
    """megatron's ``optimizer.step()`` after ``prepare_grads()``, with the global gradient norm already known
    (the bad-step guard's): clip every sub-optimizer's gradients by that norm, as megatron's step does with
    the norm it would compute again, then update. One norm per step instead of two: a pass over the
    gradients, a model-parallel all-reduce and a host read fewer. Returns megatron's success flag."""
    from megatron.core.optimizer import clip_grads

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        config = sub.config
        if getattr(sub, "is_stub_optimizer", False) or config.clip_grad <= 0.0:
            continue
        params = sub.get_parameters()
        if params:
            clip_grads.clip_grad_by_total_norm_fp32(
                params,
                max_norm=config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return optimizer.step_with_ready_grads()
