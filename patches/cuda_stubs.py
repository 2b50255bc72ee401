"""CPU stand-ins for the torch.cuda calls megatron-core makes unconditionally.

megatron-core 0.16 asks torch.cuda for the current device, streams, events, RNG state and
synchronisation all over its training path; without a GPU each of those raises. On CPU the device is the
CPU, streams and events are no-ops and the "CUDA" RNG is the CPU generator.
"""

from __future__ import annotations

import contextlib

import torch

from patches import Patch


class _Stream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def record_event(self, *args, **kwargs) -> _Event:
        return _Event()

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc) -> None:
        return None


class _Event:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _noop():
    # A fresh function per attribute: torch.compile's trace rules refuse one object under two names.
    return lambda *args, **kwargs: None


def _apply() -> None:
    c = torch.cuda
    c.current_device = lambda: torch.device("cpu")
    c.Stream = _Stream
    c.Event = _Event
    c.stream = lambda *a, **k: contextlib.nullcontext()
    c.current_stream = lambda *a, **k: _Stream()
    c.default_stream = lambda *a, **k: _Stream()
    c.synchronize = _noop()
    c.empty_cache = _noop()
    c.set_device = _noop()
    c.get_rng_state = lambda *a, **k: torch.get_rng_state()
    c.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    c.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    c.manual_seed_all = _noop()
    c.random.get_rng_state = c.get_rng_state
    c.random.set_rng_state = c.set_rng_state
    c.nvtx.range_push = _noop()
    c.nvtx.range_pop = _noop()
    c.memory_allocated = lambda *a, **k: 0
    c.max_memory_allocated = lambda *a, **k: 0
    c.reset_peak_memory_stats = _noop()
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.record_stream = lambda self, *a, **k: None


PATCH = Patch(
    name="cuda_stubs",
    fixes="torch.cuda calls (current_device, streams, events, RNG, synchronize) raise without a GPU",
    versions=">=0.16,<0.20",
    cpu_only=True,
    apply_fn=_apply,
)
