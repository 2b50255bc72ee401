"""Distributed-optimizer checkpoint fixes for plain ``torch.optim.Adam`` (no Apex/TransformerEngine).

Without Apex or TE, megatron-core's DistributedOptimizer wraps torch's Adam and three of its checkpoint
paths break:

* ``state_dict`` asserts that all parameters share one Adam ``step``; a fresh optimizer (building the
  sharded state dict in order to *load*) has no state at all and fails. Fix: give every parameter zero
  Adam state first, which is exactly what Adam's first step would create.
* ``_set_main_param_and_optimizer_states`` loops over the destination keys, which include torch Adam's
  per-parameter ``step`` missing from the checkpoint tensors (KeyError with ``fully_reshardable``), and
  copies into leaf fp32 main params outside ``no_grad`` (RuntimeError with ``dp_reshardable``). Fix:
  copy the checkpoint's keys, under ``no_grad``.
* ``load_state_dict`` gives every parameter the *same* ``step`` tensor; torch Adam then increments it
  once per parameter per step, so bias correction after a resume is silently wrong. Fix: one ``step``
  tensor per parameter.

These are upstream bugs: the patch applies on every device, whenever the inner optimizer is torch's.
"""

from __future__ import annotations

import torch

from patches import Patch


def _needed() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _fill_empty_adam_state(inner: torch.optim.Optimizer) -> None:
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _apply() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    orig_state_dict = DistributedOptimizer.state_dict
    orig_load_state_dict = DistributedOptimizer.load_state_dict
    orig_set = DistributedOptimizer._set_main_param_and_optimizer_states

    def state_dict(self):
        _fill_empty_adam_state(self.optimizer)
        return orig_state_dict(self)

    def load_state_dict(self, state_dict):
        orig_load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].detach().clone()

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return orig_set(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, value in tensors.items():
                if key in dst:
                    dst[key].copy_(value)
                else:
                    self.optimizer.state[main_param][key] = value.detach().clone()
        return None

    DistributedOptimizer.state_dict = state_dict
    DistributedOptimizer.load_state_dict = load_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


PATCH = Patch(
    name="distopt_checkpoint",
    fixes="distributed optimizer over torch Adam: state_dict of a fresh optimizer, reshard load, shared step",
    versions=">=0.16,<0.20",
    cpu_only=False,
    apply_fn=_apply,
    needed=_needed,
)
