"""Shared fixtures for the model tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and a 2-thread OpenMP pool slows ~50x when other
    processes share the 2 cores; the caller's thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
