import sys
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from helpers import ScaleGrad, WrongLinear
from torch import nn

from gradmon.naming import clean_name
from gradmon.numerical import (
    apply_to_tensors,
    check_gradients,
    float64_copy,
    judge,
    layer_parameters,
    max_retries,
    numerical_gradient,
    relative_error,
)


def mlp(width=16, wrong_scale=None, dropout=0.0, batchnorm=False):
    middle = nn.Linear(width, width) if wrong_scale is None else WrongLinear(width, width, scale=wrong_scale)
    norm = [nn.BatchNorm1d(width)] if batchnorm else []
    return nn.Sequential(
        nn.Linear(8, width), *norm, nn.ReLU(), nn.Dropout(dropout), middle, nn.ReLU(), nn.Linear(width, 3)
    )


def cross_entropy(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def batch(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def test_numerical_gradient_matches_analytic_gradient_of_known_function():
    x = torch.randn(4, 5, dtype=torch.float64)
    numerical = numerical_gradient(lambda t: (t.sin() * t**2).sum(), x)
    analytic = x.cos() * x**2 + 2 * x * x.sin()
    assert numerical.shape == x.shape
    torch.testing.assert_close(numerical, analytic, rtol=1e-8, atol=1e-8)


def test_numerical_gradient_of_selected_indices_returns_them_in_order_and_leaves_input_alone():
    x = torch.randn(3, 4, dtype=torch.float64).t()  # not contiguous: flat indices follow x.reshape(-1)
    before = x.clone()
    numerical = numerical_gradient(lambda t: (t**3).sum(), x, indices=[7, 0, 5])
    torch.testing.assert_close(numerical, 3 * x.reshape(-1)[[7, 0, 5]] ** 2, rtol=1e-8, atol=1e-8)
    assert torch.equal(x, before)


def test_relative_error_is_zero_for_equal_numbers_and_two_for_a_sign_flip():
    assert relative_error(0.0, 0.0) == 0.0
    assert relative_error(1.5, 1.5) == 0.0
    assert relative_error(1.0, -1.0) == 2.0
    assert relative_error(10.0, 1.0) == pytest.approx(0.9)
    assert relative_error(1e-12, -1e-12, floor=1e-6) == pytest.approx(2e-6)


def test_judge_reads_relative_errors_with_the_usual_thresholds():
    assert judge(1e-9) == "good"
    assert judge(1e-4) == "acceptable"
    assert judge(0.5) == "wrong"
    assert judge(float("nan")) == "wrong"


def test_layers_are_owning_modules_with_tied_parameters_once_and_root_parameters_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    model[1].bias.requires_grad_(False)
    model.register_parameter("scale", nn.Parameter(torch.ones(())))
    layers = layer_parameters(model)
    assert list(layers) == ["scale", "0", "1", "2"]
    assert [len(params) for params in layers.values()] == [1, 2, 1, 1]
    assert layers["2"][0] is model[2].bias


@pytest.mark.parametrize("seed", range(3))
def test_correct_mlps_with_relu_dropout_and_batchnorm_pass(seed):
    torch.manual_seed(seed)
    model = mlp(dropout=0.5, batchnorm=True)
    records = check_gradients(model, cross_entropy, batch(seed=seed), num_directions=3, seed=seed)
    assert [r.layer for r in records] == ["0", "1", "4", "6"]
    assert all(r.passed for r in records), records


def test_a_check_outside_a_run_has_no_step():
    torch.manual_seed(0)
    records = check_gradients(mlp(), cross_entropy, batch())
    assert records and all(r.step is None for r in records)


@pytest.mark.parametrize("scale", [10.0, -1.0])
def test_a_wrong_backward_fails_only_its_own_layer(scale):
    torch.manual_seed(0)
    records = {r.layer: r for r in check_gradients(mlp(wrong_scale=scale), cross_entropy, batch())}
    assert not records["3"].passed
    assert records["3"].rel_error > 0.5
    assert all(records[layer].passed for layer in ["0", "5"])


def test_a_tenfold_error_in_a_64_element_bias_of_a_large_layer_is_caught():
    class WrongBias(nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight, ScaleGrad.apply(self.bias, 10.0))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), WrongBias(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    records = {r.layer: r for r in check_gradients(model, cross_entropy, (x, y))}
    assert [layer for layer, r in records.items() if not r.passed] == ["2"]


def test_a_direction_across_a_kink_is_retried_with_smaller_eps():
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor([1e-7]))  # eps=1e-6 crosses the ReLU kink at 0, eps=1e-7 does not

    def loss(m, _):
        return F.relu(m.w).sum()

    assert not check_gradients(model, loss, None, retries=0)[0].passed
    (record,) = check_gradients(model, loss, None, retries=2)
    assert record.passed
    assert record.eps < 1e-6


def test_randomness_inside_the_loss_is_the_same_in_every_evaluation():
    torch.manual_seed(0)
    model = mlp()

    def noisy_loss(m, b):
        x, y = b
        return F.cross_entropy(F.dropout(m(x), p=0.5, training=True), y)

    assert all(r.passed for r in check_gradients(model, noisy_loss, batch()))


def test_check_leaves_model_gradients_buffers_modes_and_rng_untouched():
    torch.manual_seed(0)
    model = mlp(dropout=0.5, batchnorm=True)
    model[3].eval()
    cross_entropy(model, batch()).backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    check_gradients(model, cross_entropy, batch(seed=1))

    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_float64_copy_keeps_modes_but_turns_dropout_off():
    model = mlp(dropout=0.5, batchnorm=True)
    model[1].eval()
    replica = float64_copy(model)
    assert replica[0].weight.dtype == torch.float64
    assert torch.equal(replica[0].weight, model[0].weight.double())
    assert [m.training for m in replica.modules()] == [True, True, False, True, False, True, True, True]
    assert model[3].training


def test_hooks_of_the_model_do_not_see_the_check():
    model = mlp()
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append("forward"))
    model[0].register_full_backward_hook(lambda *args: calls.append("backward"))
    model[0].weight.register_post_accumulate_grad_hook(lambda p: calls.append("grad"))
    check_gradients(model, cross_entropy, batch())
    assert calls == []


def test_apply_to_tensors_reaches_every_tensor_in_nested_containers():
    Pair = namedtuple("Pair", "a b")
    nested = {"x": [torch.ones(2), (torch.zeros(3), "label")], "pair": Pair(torch.ones(1), 7)}
    doubled = apply_to_tensors(nested, lambda t: t + 1)
    assert torch.equal(doubled["x"][0], torch.full((2,), 2.0))
    assert torch.equal(doubled["x"][1][0], torch.ones(3))
    assert doubled["x"][1][1] == "label"
    assert isinstance(doubled["pair"], Pair) and doubled["pair"].b == 7


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_directions": 0}, "num_directions"),
        ({"eps": 0.0}, "eps"),
        ({"eps": 10**400}, "eps"),
        ({"retries": -1}, "retries"),
        ({"retries": 400}, "retries"),  # 1e-6 / 10**400 is no float64 step
        ({"fail_above": 0.0}, "fail_above"),  # was ZeroDivisionError
        ({"fail_above": float("nan")}, "fail_above"),  # was every layer of a correct model "wrong"
        ({"fail_above": -1.0}, "fail_above"),
        ({"fail_above": 2.0}, "fail_above"),  # a relative error never exceeds 2: nothing could fail
        ({"fail_above": None}, "fail_above"),
        ({"good_below": None}, "good_below"),
        ({"good_below": 0.5, "fail_above": 0.1}, "good_below"),
        ({"seed": None}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_check_gradients_rejects_invalid_arguments_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}="):
        check_gradients(mlp(), cross_entropy, batch(), **kwargs)


def test_check_gradients_accepts_the_largest_seed_and_the_edges_of_its_thresholds():
    torch.manual_seed(0)
    records = check_gradients(mlp(), cross_entropy, batch(), seed=2**64 - 1, fail_above=1.999, good_below=1e-300)
    assert [r.layer for r in records] == ["0", "3", "5"]
    assert all(r.status == "acceptable" for r in records)


def test_many_retries_divide_the_step_without_overflowing():
    # The loss is finite only while |weight| < 1 and curved enough that a step of 0.1 fails fail_above=1e-4, so from
    # eps=1e307 the weight's check needs more than 308 tenfold reductions: past the point where `eps / 10**attempt`
    # could no longer convert 10**attempt to a float.
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.2, 0.1]]))

    def loss(m, x):
        return m(x).square().mean() + (1 - m.weight.square().sum()).log()

    assert max_retries(1e307) >= 400
    weight, bias = check_gradients(model, loss, torch.randn(4, 3), eps=1e307, retries=400, fail_above=1e-4)
    assert weight.layer == "weight" and weight.passed and weight.eps < 0.05
    assert bias.layer == "bias" and bias.passed


def test_max_retries_keeps_the_last_step_a_normal_float():
    for eps in (1e-6, 1.0, 1e300, 1e-300):
        smallest = eps
        for _ in range(max_retries(eps)):
            smallest /= 10.0
        assert smallest >= sys.float_info.min
        assert smallest / 10.0 < sys.float_info.min


class Wrapped(nn.Module):
    """``mlp(wrong_scale=10.0)`` under ``net``: layers ``net.0``, ``net.3`` (the wrong one) and ``net.5``."""

    def __init__(self):
        super().__init__()
        self.net = mlp(wrong_scale=10.0)

    def forward(self, x):
        return self.net(x)


def compile_submodule(model):
    model.net = torch.compile(model.net, backend="eager")
    return model


def compile_root(model):
    return torch.compile(model, backend="eager")


def compile_forward_attribute(model):
    # What Lightning's trainer.fit(torch.compile(model)) does to a LightningModule's forward and training_step.
    model.forward = torch.compile(model.forward, backend="eager")
    return model


def compile_in_place(model):
    model.compile(backend="eager")
    return model


@pytest.mark.parametrize("compile_", [compile_submodule, compile_root, compile_forward_attribute, compile_in_place])
def test_a_compiled_model_is_checked_uncompiled_in_float64_under_the_users_layer_names(compile_):
    torch.manual_seed(0)
    model = compile_(Wrapped())
    model(batch()[0])  # compiled for float32, as in a run
    replica = float64_copy(model)
    assert type(replica) is Wrapped and type(replica.net) is nn.Sequential
    compiled = [(name, key) for name, m in replica.named_modules() for key, value in vars(m).items()
                if hasattr(value, "_torchdynamo_orig_callable")]
    assert compiled == []
    weights = {clean_name(name): p for name, p in model.named_parameters()}
    assert replica.net[0].weight.dtype == torch.float64
    assert torch.equal(replica.net[0].weight, weights["net.0.weight"].double())

    records = {r.layer: r for r in check_gradients(model, cross_entropy, batch())}
    assert list(records) == ["net.0", "net.3", "net.5"]
    assert [layer for layer, r in records.items() if not r.passed] == ["net.3"]
    assert records["net.3"].rel_error > 0.5
    assert records["net.0"].rel_error < 1e-3 and records["net.5"].rel_error < 1e-3


class DoubledGrad(nn.Module):
    """A tanh layer whose backward doubles the gradient flowing into the layer before it: a planted bug."""

    def forward(self, x):
        return ScaleGrad.apply(torch.tanh(x), 2.0)


@pytest.mark.parametrize("retries", [10, 30, max_retries(1e-6)])
def test_many_retries_do_not_pass_a_wrong_gradient_at_steps_too_small_to_measure_it(retries):
    # Each retry divides the step by ten; by 1e-12 the loss's rounding explains any difference, and such a step used
    # to pass the doubled gradient of layer "0" as acceptable.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), DoubledGrad(), nn.Linear(4, 1))
    x = torch.randn(8, 4)
    records = {r.layer: r for r in check_gradients(model, lambda m, inputs: m(inputs).pow(2).mean(), x,
                                                   retries=retries)}
    assert not records["0"].passed and records["0"].status == "wrong"
    assert records["2"].passed


def test_a_layer_with_no_gradient_along_any_direction_still_passes_however_many_retries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every unit dead: layer 0's gradient is exactly zero
    records = {r.layer: r for r in check_gradients(model, lambda m, inputs: m(inputs).pow(2).mean(),
                                                   torch.randn(8, 4), retries=10)}
    assert records["0"].passed and records["0"].analytic == 0.0
    assert records["2"].passed
