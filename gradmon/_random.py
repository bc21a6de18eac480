"""Running code on a seeded global RNG and leaving the global RNG as it was.

Used where gradmon must call code that draws from the global generators (a layer's ``reset_parameters``, a user's
loss) reproducibly, without changing the random stream of the run around it. Pure torch: never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def forked_rng(module: nn.Module) -> Iterator[list[int]]:
    """Fork the global CPU generator and the CUDA generators of the devices holding ``module``'s parameters
    (:func:`torch.random.fork_rng`): their states are restored on exit. Yields those CUDA device indices, for
    :func:`reseed`."""
    cuda_devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        yield cuda_devices


def reseed(seed: int, cuda_devices: Sequence[int]) -> None:
    """Seed only the generators :func:`forked_rng` restores: the CPU one and those of ``cuda_devices``."""
    torch.default_generator.manual_seed(seed)
    for index in cuda_devices:
        torch.cuda.default_generators[index].manual_seed(seed)
