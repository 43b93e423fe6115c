"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def hash_cache(tmp_path_factory):
    """The file hashes' cache (imagine.loading.hashes) in a folder of the test session, not the user's."""
    import os

    before = os.environ.get("IMAGINE_CACHE_DIR")
    os.environ["IMAGINE_CACHE_DIR"] = str(tmp_path_factory.mktemp("imagine-cache"))
    yield
    if before is None:
        os.environ.pop("IMAGINE_CACHE_DIR", None)
    else:
        os.environ["IMAGINE_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, loaded 2-core machine OpenMP's
    barriers make two threads many times slower than one. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _set_bf16(monkeypatch, value: str):
    from imagine import hardware

    monkeypatch.setenv(hardware.BF16_ENV, value)
    hardware.native_bf16.cache_clear()


@pytest.fixture
def bf16_mode(monkeypatch):
    """Run as on a CPU with native bfloat16 (AMX / AVX512-BF16), whatever this one has."""
    from imagine import hardware

    _set_bf16(monkeypatch, "1")
    yield
    monkeypatch.undo()
    hardware.native_bf16.cache_clear()


@pytest.fixture
def no_bf16_mode(monkeypatch):
    """Run as on a CPU without native bfloat16 (AVX2 only), whatever this one has."""
    from imagine import hardware

    _set_bf16(monkeypatch, "0")
    yield
    monkeypatch.undo()
    hardware.native_bf16.cache_clear()
