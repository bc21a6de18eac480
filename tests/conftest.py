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
    """The norm type of every gradient-norm computation (``gradmon.norms.GradientNorms.compute`` call that found
    gradients) the test makes."""
    computed: list[float] = []
    compute = gradmon.norms.GradientNorms.compute

    def counted(self):
        norms = compute(self)
        if norms is not None:
            computed.append(self.norm_type)
        return norms

    monkeypatch.setattr(gradmon.norms.GradientNorms, "compute", counted)
    return computed
