"""Test-session settings shared by every test module."""

from __future__ import annotations

import pytest
import torch

import gradmon.norms


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests' models are tiny: a second intra-op thread buys nothing, and on a busy two-core machine its
    spin-waiting made training runs many times slower. The thread count is given back at the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def norm_computations(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The norm type of every gradient-norm computation (``gradmon.norms.compute_norms`` call) the test makes."""
    computed: list[float] = []
    compute_norms = gradmon.norms.compute_norms

    def counted(layout, tensors, norm_type):
        computed.append(norm_type)
        return compute_norms(layout, tensors, norm_type)

    monkeypatch.setattr(gradmon.norms, "compute_norms", counted)
    return computed
