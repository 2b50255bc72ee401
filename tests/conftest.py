"""Shared test plumbing, kept minimal: skip `gpu` tests without CUDA, and a free loopback port."""

from __future__ import annotations

import socket

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch  # only when a gpu test was collected: keeps pure unit runs free of the import

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch sees no GPU on this machine")
    for item in gpu_items:
        item.add_marker(skip)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago; the OS picks it, so parallel runs don't collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
