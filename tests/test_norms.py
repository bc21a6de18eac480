"""gradmon.norms without a Trainer: layer names, layouts, fused per-layer norms against torch.linalg.vector_norm."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradmon.naming import layer_name
from gradmon.norms import (
    GradientNorms,
    NormOrder,
    Norms,
    ParamLayout,
    WeightSnapshot,
    compute_norms,
    layer_norms,
    snapshot_weights,
    transfer,
)

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


def hand_norm(tensors: list[torch.Tensor], p: float) -> float:
    """The p-norm of all elements of ``tensors`` together, in float64."""
    return torch.linalg.vector_norm(torch.cat([t.detach().double().reshape(-1) for t in tensors]), p).item()


class Tied(nn.Module):
    """``decoder.weight`` is ``encoder.weight``; ``scale`` sits on the root module."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight
        self.scale = nn.Parameter(torch.randn(4))


def named_with_duplicates(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters(remove_duplicate=False))


@pytest.mark.parametrize(
    ("param_name", "layer"),
    [("net.0.weight", "net.0"), ("net.0.bias", "net.0"), ("encoder.block.3.attn.bias", "encoder.block.3.attn"),
     ("scale", "scale"), ("net.0.parametrizations.weight.original0", "net.0"),
     ("net.0.parametrizations.weight.original", "net.0"), ("parametrizations.weight.original", "weight"),
     ("parametrizations.scale", "parametrizations")],
)
def test_layer_name_is_the_owning_module_and_a_root_parameter_is_its_own_layer(param_name: str, layer: str) -> None:
    assert layer_name(param_name) == layer
    assert layer_name(param_name, "layer") == layer


def test_layer_name_by_parameter_keeps_the_full_name() -> None:
    assert layer_name("net.0.weight", "parameter") == "net.0.weight"
    assert layer_name("scale", "parameter") == "scale"


def test_layout_groups_parameters_by_owning_module_in_registration_order() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    layout = ParamLayout.from_named_parameters(net.named_parameters())
    assert layout.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert layout.layer_names == ["0", "2"]
    assert layout.layer_of_param == [0, 0, 1, 1]
    assert layout.groups == [[0, 1, 2, 3]]
    assert len(layout) == 4 and not layout.sharded


def test_layout_by_parameter_gives_one_layer_per_parameter() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    layout = ParamLayout.from_named_parameters(net.named_parameters(), group_by="parameter")
    assert layout.layer_names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert layout.layer_of_param == [0, 1, 2, 3]


def test_layout_counts_tied_weights_once_under_their_first_name() -> None:
    model = Tied()
    named = named_with_duplicates(model)
    assert [n for n, _ in named].count("decoder.weight") == 1  # the duplicate really is offered to the layout
    layout = ParamLayout.from_named_parameters(named)
    # A module's own parameters come before its children's in named_parameters(): ``scale`` is first.
    assert layout.param_names == ["scale", "encoder.weight", "encoder.bias", "decoder.bias"]
    assert layout.param_layers == ["scale", "encoder", "encoder", "decoder"]
    assert layout.layer_names == ["scale", "encoder", "decoder"]
    assert layout.params[1] is model.encoder.weight


def test_layout_subset_keeps_names_and_layers_of_the_kept_parameters() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    sub = ParamLayout.from_named_parameters(net.named_parameters()).subset([1, 2])
    assert sub.param_names == ["0.bias", "1.weight"]
    assert sub.layer_names == ["0", "1"]
    assert sub.params[0] is net[0].bias


def mixed_dtype_params(low: torch.dtype) -> tuple[list[str], list[torch.Tensor]]:
    """float32, ``low``, float32, ``low``: two (device, dtype) groups whose concatenation is out of parameter order."""
    torch.manual_seed(0)
    names = ["a.weight", "a.bias", "b.weight", "b.bias"]
    params = [torch.randn(5, 3), torch.randn(5).to(low), torch.randn(2, 5), torch.randn(2).to(low)]
    return names, params


@pytest.mark.parametrize("p", NORM_TYPES)
def test_mixed_float32_and_bfloat16_give_two_groups_and_norms_in_parameter_order(p: float) -> None:
    names, params = mixed_dtype_params(torch.bfloat16)
    layout = ParamLayout.from_named_parameters(zip(names, params))
    assert layout.groups == [[0, 2], [1, 3]]
    norms = compute_norms(layout, params, p)
    assert norms.device_values.dtype == torch.float32
    assert norms.host() == pytest.approx([hand_norm([t], p) for t in params], rel=1e-5)


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_mixed_float32_and_float64_give_two_groups_and_norms_in_parameter_order(p: float) -> None:
    names, params = mixed_dtype_params(torch.float64)
    layout = ParamLayout.from_named_parameters(zip(names, params))
    assert layout.groups == [[0, 2], [1, 3]]
    norms = compute_norms(layout, params, p)
    assert norms.host() == pytest.approx([hand_norm([t], p) for t in params], rel=1e-6)
    layers, total = norms.per_layer()
    assert layers == pytest.approx({"a": hand_norm(params[:2], p), "b": hand_norm(params[2:], p)}, rel=1e-6)
    assert total == pytest.approx(hand_norm(params, p), rel=1e-6)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_compute_norms_per_layer_and_total_equal_hand_norms(p: float) -> None:
    model = Tied()
    layout = ParamLayout.from_named_parameters(named_with_duplicates(model))
    tensors = [torch.randn_like(t) for t in layout.params]
    layers, total = compute_norms(layout, tensors, p).per_layer()
    assert list(layers) == ["scale", "encoder", "decoder"]
    assert layers["scale"] == pytest.approx(hand_norm(tensors[:1], p), rel=1e-5)
    assert layers["encoder"] == pytest.approx(hand_norm(tensors[1:3], p), rel=1e-5)
    assert layers["decoder"] == pytest.approx(hand_norm(tensors[3:], p), rel=1e-5)
    assert total == pytest.approx(hand_norm(tensors, p), rel=1e-5)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_compute_norms_by_parameter_gives_each_parameter_its_norm(p: float) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    layout = ParamLayout.from_named_parameters(net.named_parameters(), group_by="parameter")
    layers, total = compute_norms(layout, layout.params, p).per_layer()
    assert layers == pytest.approx({n: hand_norm([t], p) for n, t in net.named_parameters()}, rel=1e-5)
    assert total == pytest.approx(hand_norm(list(net.parameters()), p), rel=1e-5)


def test_compute_norms_does_not_transfer_to_the_host_until_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two dtypes: two kernels whose results are stacked into one vector, read on the host once, when asked.
    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or original(self))
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    layout = ParamLayout.from_named_parameters(net.named_parameters())
    norms = compute_norms(layout, layout.params, 2.0)
    assert calls == [] and not norms.on_host
    layers, _ = norms.per_layer()
    norms.per_layer()
    assert len(calls) == 1
    assert layers["1"] == pytest.approx(torch.cat([t.detach().reshape(-1) for t in net[1].parameters()]).norm().item())


def test_norms_of_whole_tensors_of_one_dtype_in_host_memory_are_floats_at_once() -> None:
    net = nn.Linear(3, 4)
    layout = ParamLayout.from_named_parameters(net.named_parameters())
    norms = compute_norms(layout, [p.detach() for p in layout.params], 2.0)
    assert norms.on_host
    assert norms.host() == [p.detach().norm().item() for p in net.parameters()]
    assert norms.device_values.tolist() == pytest.approx(norms.host())  # the vector, when asked for one


@pytest.mark.parametrize("p", NORM_TYPES)
def test_weight_snapshot_gives_the_norms_of_the_weights_before_and_of_the_update(p: float) -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 4)
    layout = ParamLayout.from_named_parameters(net.named_parameters())
    snapshot = WeightSnapshot(layout, p)
    before = [t.detach().clone() for t in layout.params]
    with torch.no_grad():
        for t in layout.params:
            t.mul_(3.0)  # the update is -2 w
    weights, update = snapshot.finish()
    assert weights.host() == pytest.approx([hand_norm([t], p) for t in before], rel=1e-6)
    assert update.host() == pytest.approx([2 * v for v in weights.host()], rel=1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_combine_sums_pth_powers_per_group_and_takes_the_root(p: float) -> None:
    norms = [3.0, 4.0, 1.0, 2.0]
    groups = [0, 0, 1, 0]
    per_group, total = NormOrder(p).combine(norms, groups, 2)
    assert per_group == pytest.approx([(3.0**p + 4.0**p + 2.0**p) ** (1 / p), 1.0])
    assert total == pytest.approx(sum(v**p for v in norms) ** (1 / p))


def test_combine_inf_takes_maxima_and_propagates_nan() -> None:
    assert NormOrder(math.inf).combine([3.0, 4.0, 1.0], [0, 0, 1], 2) == ([4.0, 1.0], 4.0)
    per_group, total = NormOrder(math.inf).combine([1.0, 2.0, math.nan, 0.5], [0, 0, 1, 1], 2)
    assert per_group[0] == 2.0 and math.isnan(per_group[1]) and math.isnan(total)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_combine_overflows_to_inf_rather_than_raising(p: float) -> None:
    per_group, total = NormOrder(p).combine([1e200, 1.0], [0, 1], 2)
    assert per_group == [math.inf, 1.0] and total == math.inf


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize(
    "values", [[3.0, 4.0, 1.0, 2.0, 0.5], [math.inf, math.nan, 1.0, 2.0, 0.5], [math.inf, 1.0, 1.0, 2.0, 0.5],
               [1e200, 1.0, 1.0, 2.0, 0.0]]
)
def test_device_layer_norms_equal_the_host_layers_and_total(p: float, values: list[float]) -> None:
    layout = ParamLayout([torch.zeros(1)] * 5, ["a.w", "a.b", "b.w", "c.w", "b.b"], ["a", "a", "b", "c", "b"])
    norms = Norms(layout, torch.tensor(values, dtype=torch.float64), p)
    layers, total = norms.per_layer()
    want = [*layers.values(), total]
    assert norms.device_layer_norms().tolist() == pytest.approx(want, rel=1e-12, nan_ok=True)


def test_transfer_brings_several_norms_to_the_host_in_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    # Two dtypes each: vectors that stay where they were taken until asked for (one dtype in host memory is read at
    # once, with nothing left to transfer).
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    tail = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1).double())
    layout = ParamLayout.from_named_parameters(net.named_parameters())
    small = ParamLayout.from_named_parameters(tail.named_parameters())
    grads = compute_norms(layout, [torch.randn_like(t) for t in layout.params], 2.0)
    weights = compute_norms(layout, layout.params, 2.0)
    other = compute_norms(small, small.params, 1.0)
    done = compute_norms(small, small.params, 2.0)
    done_values = done.host()
    want = [grads.device_values.tolist(), weights.device_values.tolist(), other.device_values.tolist()]

    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(self.numel()) or original(self))
    transfer([grads, weights, done, other])
    assert calls == [4 + 4 + 4]  # one transfer, and ``done`` was left out of it
    assert [grads.host(), weights.host(), other.host()] == [pytest.approx(w) for w in want]
    assert done.host() is done_values
    assert len(calls) == 1
    transfer([grads, done])
    assert len(calls) == 1


# --- the plain-loop entry points -------------------------------------------------------------------------------


def docs_snippet(page: str, section: str) -> str:
    """The first python code block after ``section`` in ``docs/<page>``, exactly as written."""
    text = (Path(__file__).resolve().parent.parent / "docs" / page).read_text()
    after = text[text.index(section):]
    return after[after.index("```python\n") + len("```python\n"):].split("```", 1)[0]


def test_the_documented_plain_loop_runs_as_written_with_frozen_and_unused_layers(capsys) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.Linear(4, 8).requires_grad_(False)
            self.body = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)  # has no gradient: never in the forward
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(self.frozen(x))))

    torch.manual_seed(0)
    model = Net()
    loader = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
    namespace = {"model": model, "loader": loader, "loss_fn": nn.functional.cross_entropy,
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    exec(docs_snippet("plain_pytorch.md", "## Gradient norms and health in a loop"), namespace)
    assert list(namespace["per_layer"]) == ["body", "head"]
    assert set(namespace["ratios"]) == {"body", "head", "unused"}  # trainable; unused did not move
    assert namespace["ratios"]["unused"] == 0.0 and namespace["ratios"]["body"] > 0
    assert capsys.readouterr().out == ""  # a healthy net: no event


def test_layer_norms_equal_hand_norms_and_the_total_torchs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    model(torch.randn(9, 5)).square().sum().backward()
    per_layer, total = layer_norms(model)
    assert per_layer["0"] == pytest.approx(
        float(torch.cat([model[0].weight.grad.reshape(-1), model[0].bias.grad]).norm()), rel=1e-6
    )
    assert total == pytest.approx(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])), rel=1e-6)
    inf_layers, inf_total = layer_norms(model, "inf")
    assert inf_total == pytest.approx(max(float(p.grad.abs().max()) for p in model.parameters()))
    assert set(layer_norms(model, group_by="parameter")[0]) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_layer_norms_without_gradients_and_with_bad_arguments() -> None:
    model = nn.Linear(3, 3)
    assert layer_norms(model) == ({}, 0.0)
    with pytest.raises(ValueError, match="`norm_type=0`"):
        layer_norms(model, 0)
    with pytest.raises(ValueError, match="`group_by='module'`"):
        layer_norms(model, group_by="module")


def test_update_ratios_of_sgd_are_lr_times_grad_over_weight() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 4, bias=False)
    model(torch.randn(3, 6)).sum().backward()
    snapshot = snapshot_weights(model)
    weight, grad = model.weight.detach().clone(), model.weight.grad.clone()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    ratios = snapshot.update_ratios()
    assert ratios == {"weight": pytest.approx(0.01 * float(grad.norm()) / float(weight.norm()), rel=1e-5)}


# ------------------------------------------------------------------------------------------ the per-step path


def _mixed_model() -> nn.Module:
    """Large and small float32 tensors, a float64 layer between them, and a float32 layer after it: two (device,
    dtype) groups whose concatenation is out of parameter order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 160), nn.Linear(160, 128), nn.Linear(128, 4).double(), nn.Linear(4, 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


@pytest.mark.parametrize("p", NORM_TYPES)
def test_gradient_norms_of_mixed_dtypes_equal_torchs_norms_in_parameter_order(p: float) -> None:
    model = _mixed_model()
    layout = ParamLayout.from_named_parameters(model.named_parameters())
    assert len(layout.groups) == 2  # float32 and float64: one fused kernel each
    norms = GradientNorms(layout, p).compute()
    assert norms is not None and not norms.on_host  # nothing read before it is asked for
    grads = [q.grad for q in layout.params]
    assert norms.device_values.dtype == torch.float64
    assert norms.host() == pytest.approx([float(torch.linalg.vector_norm(g, p)) for g in grads], rel=1e-6)
    want = [hand_norm([q.grad for q in m.parameters()], p) for m in model]
    layers, total = norms.per_layer()
    assert list(layers.values()) == pytest.approx(want, rel=1e-5)
    assert total == pytest.approx(float(torch.nn.utils.get_total_norm([g.double() for g in grads], p)), rel=1e-5)


def _floats_model() -> nn.Module:
    """Small and large float32 layers, a bfloat16 and a float64 layer between them, so that the layout's groups are
    out of parameter order."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(160, 128), nn.Linear(8, 8).to(torch.bfloat16),
        nn.Linear(8, 8), nn.Linear(8, 8).double(), nn.Linear(5, 3), nn.Linear(8, 8),
    )
    for q in model.parameters():
        q.grad = torch.randn_like(q) * 10.0 ** torch.randint(-3, 3, ()).item()
    return model


@pytest.mark.parametrize("p", NORM_TYPES)
def test_norms_of_float32_bfloat16_and_float64_come_in_parameter_order(p: float) -> None:
    model = _floats_model()
    layout = ParamLayout.from_named_parameters(model.named_parameters())
    assert [len(indices) for indices in layout.groups] == [12, 2, 2]  # float32, bfloat16, float64
    grads = [q.grad for q in layout.params]
    norms = GradientNorms(layout, p).compute()
    assert norms is not None
    assert norms.host() == pytest.approx([hand_norm([g], p) for g in grads], rel=1e-5)
    assert norms.device_values.tolist() == norms.host()


def test_norms_read_as_floats_keep_nan_and_inf_to_their_own_tensor() -> None:
    model = _floats_model()
    model[1].bias.grad[3] = math.nan
    model[4].bias.grad[0] = math.inf
    layout = ParamLayout.from_named_parameters(model.named_parameters())
    values = dict(zip(layout.param_names, GradientNorms(layout).compute().host()))
    assert math.isnan(values["1.bias"]) and values["4.bias"] == math.inf
    for name in ("0.bias", "7.bias", "0.weight", "2.weight"):
        assert values[name] == pytest.approx(float(model.get_parameter(name).grad.norm()), rel=1e-6)


def test_norms_read_as_floats_of_an_empty_tensor_are_zero() -> None:
    params = [torch.zeros(0), torch.ones(4), torch.ones(4), torch.ones(4)]
    layout = ParamLayout(params, ["e", "a", "b", "c"], ["e", "a", "b", "c"])
    assert GradientNorms(layout).compute() is None  # no gradients yet
    for q in params:
        q.grad = q.clone()
    assert GradientNorms(layout).compute().host() == [0.0, 2.0, 2.0, 2.0]


def test_gradient_norms_leave_out_missing_gradients() -> None:
    model = _mixed_model()
    model[1].weight.grad = None
    model[3].bias.grad = None
    norms = GradientNorms(ParamLayout.from_named_parameters(model.named_parameters())).compute()
    assert norms is not None and norms.layout.param_names == ["0.weight", "0.bias", "1.bias", "2.weight", "2.bias",
                                                             "3.weight"]
    layers, _ = norms.per_layer()
    assert layers["1"] == pytest.approx(model[1].bias.grad.norm().item(), rel=1e-6)
    assert layers["3"] == pytest.approx(model[3].weight.grad.norm().item(), rel=1e-6)


def test_per_layer_2_norm_is_nan_for_a_layer_holding_nan_beside_inf_and_inf_for_inf_alone() -> None:
    names = ["a.w", "a.b", "b.w", "b.b", "c.w", "c.b"]
    layout = ParamLayout([torch.zeros(1)] * 6, names, [n[0] for n in names])
    norms = Norms(layout, torch.tensor([math.inf, math.nan, math.inf, 1.0, 3.0, 4.0]), 2.0)
    layers, total = norms.per_layer()
    assert math.isnan(layers["a"]) and layers["b"] == math.inf and layers["c"] == 5.0
    assert math.isnan(total)
    layers, total = Norms(layout, torch.tensor([3.0, 4.0, math.inf, 1.0, 0.0, 0.0]), 2.0).per_layer()
    assert (layers, total) == ({"a": 5.0, "b": math.inf, "c": 0.0}, math.inf)


def test_per_layer_combines_layers_whose_parameters_are_not_side_by_side() -> None:
    layout = ParamLayout([torch.zeros(1)] * 3, ["a.w", "b.w", "a.b"], ["a", "b", "a"])
    layers, total = Norms(layout, torch.tensor([3.0, 12.0, 4.0]), 2.0).per_layer()
    assert layers == {"a": 5.0, "b": 12.0} and total == 13.0


@pytest.mark.parametrize("sizes", [(1, 1, 1), (2, 2, 2), (3, 3), (2, 1, 3)])
def test_per_layer_2_norm_is_the_same_whatever_the_number_of_parameters_per_layer(sizes: tuple[int, ...]) -> None:
    layers = [name for name, k in zip("abc", sizes) for _ in range(k)]
    values = [0.5 * (i + 1) for i in range(len(layers))]
    layout = ParamLayout([torch.zeros(1)] * len(layers), [f"{n}.{i}" for i, n in enumerate(layers)], layers)
    got, total = Norms(layout, torch.tensor(values, dtype=torch.float64), 2.0).per_layer()
    want = {n: math.sqrt(sum(v * v for v, m in zip(values, layers) if m == n)) for n in dict.fromkeys(layers)}
    assert got == pytest.approx(want, rel=1e-15) and list(got) == list(want)
    assert total == pytest.approx(math.sqrt(sum(v * v for v in values)), rel=1e-15)
