"""Shared test settings."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tests use small tensors: on a shared 2-core machine one intra-op thread is much faster
    than two (which mostly wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
