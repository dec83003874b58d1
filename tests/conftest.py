"""Shared test settings and fixtures."""

from pathlib import Path

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


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data cache of the test's own (``CLAFUSE_CACHE``), so tests never share or see a user's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLAFUSE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory):
    """One private data cache for all tests of a module (they decode the same sets)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAFUSE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
