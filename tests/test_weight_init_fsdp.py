"""FSDP2 shards (DTensor) of recurrent and attention weights get exactly the weights a single process draws.

The model is sharded with ``fully_shard`` over a one-process gloo group inside the test process, so every weight is a
DTensor and goes through the DTensor path of :func:`gradmon.init._draw` (draw the whole tensor, hand out the shards)
without the cost of starting more processes; that each of several ranks gets its own piece of that draw is checked
for Linear layers by ``test_distributed.py``, and the path is the same for every tensor. No Lightning: the DTensor
handling is in :mod:`gradmon.init`, the same under any strategy.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gradmon.init import initialize


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.lstm = nn.LSTM(4, 8, num_layers=2, bidirectional=True)
    model.attn = nn.MultiheadAttention(16, 2)
    model.head = nn.Linear(16, 3)
    return model


def init(model: nn.Module) -> list[str]:
    records = initialize(model, "xavier_uniform", generator=torch.Generator().manual_seed(0))
    records += initialize(
        model, "orthogonal", types="LSTM", weights="weight_hh", bias=0.5, generator=torch.Generator().manual_seed(1)
    )
    return [record.name for record in records]


@pytest.fixture
def one_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_of_lstm_and_attention_weights_get_the_single_process_draw(one_process_group) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = build()
    mesh = init_device_mesh("cpu", (1,))
    for child in model.children():
        fully_shard(child, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    names = init(model)

    reference = build()
    assert names == init(reference)
    assert "lstm.weight_hh_l1_reverse" in names and "attn.in_proj_weight" in names
    for key, expected in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key].full_tensor(), expected, rtol=0, atol=0, msg=key)
    assert torch.all(reference.lstm.bias_hh_l0 == 0.5) and torch.all(reference.lstm.bias_ih_l0 == 0)
    weight_hh = reference.lstm.weight_hh_l0
    torch.testing.assert_close(weight_hh.T @ weight_hh, torch.eye(8), rtol=0, atol=1e-5)
