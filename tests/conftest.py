"""Test-session settings shared by every test module."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests' models are tiny: a second intra-op thread buys nothing, and on a busy two-core machine its
    spin-waiting made training runs many times slower. The thread count is given back at the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
