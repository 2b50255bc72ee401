"""Shared test plumbing, kept minimal: skip `gpu` tests without CUDA, `slurm` tests unless selected; a free
loopback port and a 1-process gloo group."""

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


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    """A 1-process gloo group, as the trainer has after init (left alone if one already exists)."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        store = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()
