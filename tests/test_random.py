"""The seeded-and-restored global RNG of :mod:`gradmon._random`."""

import torch
from torch import nn

from gradmon._random import forked_rng, reseed


def test_draws_under_a_reseeded_fork_repeat_and_leave_the_global_rng_as_it_was():
    layer = nn.Linear(2, 2)
    state = torch.get_rng_state()
    draws = []
    for _ in range(2):
        with forked_rng(layer) as cuda_devices:
            assert cuda_devices == []  # a CPU module: only the CPU generator is forked
            reseed(7, cuda_devices)
            draws.append(torch.randn(5))
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0], torch.randn(5, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(torch.get_rng_state(), state)
