"""Shared test plumbing, kept minimal: skip `gpu` tests without CUDA, `slurm` tests unless selected, and a
free loopback port fixture."""

from __future__ import annotations

import pytest
from ramp_run import free_port


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A slurm test starts daemons as root and trains for minutes: only `make test-slurm` (-m slurm) runs it.
    if "slurm" not in (config.getoption("markexpr") or ""):
        skip = pytest.mark.skip(reason="starts a Slurm cluster on this machine: run `make test-slurm`")
        for item in items:
            if item.get_closest_marker("slurm"):
                item.add_marker(skip)
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch  # only when a gpu test was collected: keeps pure unit runs free of the import

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch sees no GPU on this machine")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def port() -> int:
    return free_port()
