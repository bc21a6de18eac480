"""gradmon.activations without Lightning: each statistic against a hand computation, hooks that live for one batch
only and change nothing, and what is (not) observed inside compiled code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradmon.activations import ActivationRecorder, observed_modules


def all_hooks(model: nn.Module) -> list[object]:
    """Every module hook in ``model``: forward, forward-pre and backward, of every module."""
    return [
        h for m in model.modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
        for h in hooks.values()
    ]


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Tanh(),
                        nn.Linear(4, 2))
    with torch.no_grad():
        net[0].bias[:2] = -50.0  # two units of the ReLU dead for any input of this size
        net[4].weight.mul_(20.0)  # the tanh saturates on some outputs
    return net


def test_statistics_equal_a_hand_computation_on_a_tiny_net():
    net = tiny_net()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    outputs: dict[int, torch.Tensor] = {}

    def keep(i: int):
        def hook(module, args, y):
            y.retain_grad()
            outputs[i] = y

        return hook

    handles = [net[i].register_forward_hook(keep(i)) for i in range(len(net))]
    recorder = ActivationRecorder(net)
    with recorder:
        net(x).square().sum().backward()
    for h in handles:
        h.remove()
    stats = {s.name: s for s in recorder.stats()}
    assert list(stats) == [str(i) for i in range(7)]  # every layer and activation, in forward order

    def rms(t: torch.Tensor) -> float:
        return t.detach().double().square().mean().sqrt().item()

    for i, y in outputs.items():
        assert stats[str(i)].rms == pytest.approx(rms(y), rel=1e-6)
        assert stats[str(i)].grad_rms == pytest.approx(rms(y.grad), rel=1e-6)
    relu = outputs[1]
    assert stats["1"].dead_fraction == pytest.approx((relu == 0).all(dim=0).double().mean().item())
    assert stats["1"].dead_fraction == pytest.approx(0.4)  # the two units with a bias of -50, and no other
    sig, tanh = outputs[3].detach().double(), outputs[5].detach().double()
    assert stats["3"].slope == pytest.approx((sig * (1 - sig)).mean().item(), rel=1e-6)
    assert stats["3"].saturated_fraction == pytest.approx((sig * (1 - sig) < 0.0025).double().mean().item())
    assert stats["5"].saturated_fraction == pytest.approx((1 - tanh**2 < 0.01).double().mean().item())
    assert 0 < stats["5"].saturated_fraction < 1
    assert stats["0"].dead_fraction is None and stats["3"].dead_fraction is None and stats["1"].slope is None


def test_a_dead_unit_is_a_channel_of_a_convolution_and_a_feature_of_a_sequence():
    conv = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU())
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with torch.no_grad():
        for layer in (conv[0], seq[0]):
            layer.weight.fill_(1.0)
            layer.bias.copy_(torch.tensor([-1e3, -1e3, -1e3, 0.0]))  # three of four units (channels) dead
    x_img, x_seq = torch.rand(2, 1, 5, 5) + 0.1, torch.rand(2, 7, 3) + 0.1
    for model, x in ((conv, x_img), (seq, x_seq)):
        recorder = ActivationRecorder(model)
        with recorder:
            model(x)
        assert {s.name: s.dead_fraction for s in recorder.stats()}["1"] == 0.75


def test_no_hook_remains_after_a_batch_and_the_next_batch_is_not_observed():
    net = tiny_net()
    recorder = ActivationRecorder(net)
    with recorder:
        assert len(all_hooks(net)) == len(net)
        loss = net(torch.randn(4, 3)).sum()
    loss.backward()  # after stop: the tensor hooks are gone with the forward hooks
    assert all_hooks(net) == [] and not recorder.active
    assert all(s.grad_rms is None for s in recorder.stats())
    net(torch.randn(4, 3)).sum().backward()
    assert len(recorder.stats()) == len(net)  # still the recorded batch's


def test_recording_changes_neither_outputs_nor_gradients():
    x = torch.randn(8, 3)
    results = []
    for record in (False, True):
        net = tiny_net()
        recorder = ActivationRecorder(net)
        if record:
            recorder.start()
        out = net(x)
        out.square().sum().backward()
        recorder.stop()
        results.append([out.detach()] + [p.grad for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_functional_activation_is_not_observed_but_the_layer_before_it_is():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)))

    net = Net()
    recorder = ActivationRecorder(net)
    with recorder:
        net(torch.randn(5, 3))
    assert [s.name for s in recorder.stats()] == ["fc1", "fc2"]


def test_a_module_called_twice_is_observed_at_its_first_call():
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer)
    recorder = ActivationRecorder(model)
    x = torch.randn(4, 3)
    with recorder:
        first = layer(x)
        layer(first * 100)
    (stats,) = recorder.stats()
    assert stats.rms == pytest.approx(first.detach().square().mean().sqrt().item(), rel=1e-6)


def test_inside_a_compiled_submodule_nothing_is_hooked_and_the_compiled_module_is_observed_under_its_name():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))
    model = nn.Module()
    model.net = torch.compile(inner, backend="eager")
    model.head = nn.Linear(4, 2)
    assert [name for name, _ in observed_modules(model)] == ["net", "head"]
    recorder = ActivationRecorder(model)
    x = torch.randn(5, 3)
    for step in range(3):  # compiled at step 0 with the hooks on, run later with and without them
        observe = step != 1
        if observe:
            recorder.start()
        hidden = model.net(x)
        model.head(hidden).sum().backward()
        if observe:
            stats = {s.name: s for s in recorder.stop().stats()}
            assert list(stats) == ["net", "head"]
            assert stats["net"].rms == pytest.approx(hidden.detach().square().mean().sqrt().item(), rel=1e-6)
            assert stats["net"].grad_rms is not None
        assert all_hooks(model) == []


def test_observed_names_are_the_users_without_wrapper_pieces():
    model = nn.Module()
    model.block = torch.compile(nn.Sequential(nn.Linear(2, 2)), backend="eager")
    model.act = nn.GELU()
    model.norm = nn.LayerNorm(2)
    names = [name for name, _ in observed_modules(model)]
    assert names == ["block", "act", "norm"]
    assert not any("_orig_mod" in n for n in names)


def test_rms_of_half_precision_outputs_is_accumulated_in_float32():
    layer = nn.Linear(4, 4).half()
    recorder = ActivationRecorder(nn.Sequential(layer))
    with recorder, torch.no_grad():
        y = layer(torch.full((2, 4), 300.0, dtype=torch.half))
    (stats,) = recorder.stats()
    expected = y.float().square().mean().sqrt().item()
    assert math.isfinite(stats.rms) and stats.rms == pytest.approx(expected, rel=1e-3)


def test_an_in_place_relu_gives_the_statistics_of_an_out_of_place_one():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    stats = []
    for inplace in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 2))
        recorder = ActivationRecorder(net)
        with recorder:
            net(x).sum().backward()
        stats.append(recorder.stats())
    assert stats[0] == stats[1]  # the Linear's output read before the ReLU overwrote it, forward and backward
