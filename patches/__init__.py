"""Patches to megatron-core and torch that let ramp train on CPU (gloo) and fix upstream bugs.

Each patch is one module exposing ``PATCH``: what it fixes, the megatron-core versions it targets, when
it is needed (CPU only, or always), and an idempotent ``apply``. ``apply_all`` is called once by the
entry point before megatron-core builds anything. Versions outside a patch's range are left alone, so
a megatron-core release that fixed the problem is not patched twice.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from packaging.specifiers import SpecifierSet
from packaging.version import Version

log = logging.getLogger(__name__)

_MODULES = (
    "cuda_stubs",
    "device_mode",
    "rng",
    "te_general_gemm",
    "tensor_type",
    "torch_norm_sp",
    "moe_split_sizes",
    "distopt_checkpoint",
    "async_save_queue",
)


@dataclass
class Patch:
    name: str
    fixes: str
    versions: str  # PEP 440 specifier of megatron-core versions that need it
    cpu_only: bool  # True: needed only without a GPU; False: an upstream bug fixed on every device
    apply_fn: Callable[[], None]
    needed: Callable[[], bool] = lambda: True
    applied: bool = field(default=False, init=False)

    def targets(self, mcore_version: str) -> bool:
        return Version(mcore_version) in SpecifierSet(self.versions)

    def apply(self) -> bool:
        if not self.applied:
            self.apply_fn()
            self.applied = True
        return True


def megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def all_patches() -> list[Patch]:
    return [importlib.import_module(f"patches.{m}").PATCH for m in _MODULES]


def apply_all(cpu: bool) -> list[str]:
    """Apply every patch this device and megatron-core version need; returns their names."""
    version = megatron_version()
    done = []
    for p in all_patches():
        if p.cpu_only and not cpu:
            continue
        if not p.targets(version):
            log.info("patch %s skipped: megatron-core %s is outside %s", p.name, version, p.versions)
            continue
        if p.needed():
            p.apply()
            done.append(p.name)
    return done
