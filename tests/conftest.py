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


@pytest.fixture
def device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layouts built during the test take their norms the way they are taken on a GPU (kernels' results left on the
    device, stacked and read in one transfer when asked) instead of as Python floats in host memory: the CPU then
    runs the path a GPU runs, so that tests of that path (no transfer before it is asked for, no blocking read in
    sync-free mode) can fail here."""
    monkeypatch.setattr(gradmon.norms, "_FLOATS_AT_ONCE_ON_CPU", False)
