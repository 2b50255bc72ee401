"""AdamW through megatron-core's optimizer, with one param group per LR multiplier.

Per-module learning rates (muP multipliers, recipe overrides) become megatron-core param-group overrides:
each group's ``max_lr`` is the peak LR times its multiplier, and ``lr_mult`` carries the multiplier as
the group's identity (megatron matches groups by it when loading a checkpoint). The LR schedule then sets
``lr = max_lr * factor(tokens)`` for every group each step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from launcher.recipe import Derived, Recipe


def build_optimizer(
    recipe: Recipe,
    derived: Derived,
    chunks: list[torch.nn.Module],
    lr_mults: dict[str, float] | None = None,
    module_of: Callable[[str], str] | None = None,
    wd_mults: dict[str, float] | None = None,
):
    """``lr_mults`` maps module names (as ``module_of`` names parameters) to LR multipliers."""
    from megatron.core.optimizer import (
        OptimizerConfig,
        ParamKey,
        get_megatron_optimizer,
        get_standard_config_overrides,
    )
    from megatron.core.optimizer.optimizer_config import ParamWithNamePredicate

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
    modules = sorted(set(lr_mults or {}) | set(wd_mults or {}))
    for module in modules:
        mult = (lr_mults or {}).get(module, 1.0)
        wd = (wd_mults or {}).get(module, 1.0)
        if mult == 1.0 and wd == 1.0:
            continue
        assert module_of is not None, "module_of is needed to place parameters in per-module groups"
        key = ParamKey(
            with_name_predicate=ParamWithNamePredicate(
                name=f"module={module}", fn=lambda p, n, m=module: module_of(_strip_wrappers(n)) == m
            )
        )
        override = {"max_lr": o.lr * mult, "min_lr": o.lr * s.min_lr_ratio * mult, "lr_mult": mult}
        if wd != 1.0:
            override["wd_mult"] = wd
        overrides[key] = override
    return get_megatron_optimizer(config, chunks, config_overrides=overrides)


def _strip_wrappers(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def set_lr(optimizer, factor: float) -> None:
    """Every group at its own peak times the schedule's factor."""
    for group in optimizer.param_groups:
        group["lr"] = group["max_lr"] * factor


def group_lrs(optimizer) -> dict[str, float]:
    """Distinct LRs keyed by multiplier, for logging (``lr`` is the unit-multiplier group)."""
    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        mult = float(group.get("lr_mult", 1.0))
        out["lr" if mult == 1.0 else f"lr/x{mult:g}"] = float(group["lr"])
    return out
