import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from gradmon.init import (
    SCHEME_NAMES,
    compute_fans,
    format_scheme,
    initialize,
    parse_scheme,
    resolve_scheme,
    resolve_types,
)

# A wide layer, so fan_in (1024) and fan_out (512) differ and a formula using the wrong one fails.
FAN_IN, FAN_OUT = 1024, 512


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def wide_weight(scheme: str, **arguments) -> torch.Tensor:
    layer = nn.Linear(FAN_IN, FAN_OUT)
    initialize(layer, scheme, generator=seeded(), **arguments)
    return layer.weight.detach()


def assert_close(actual: float, expected: float, rel: float = 0.01) -> None:
    assert actual == pytest.approx(expected, rel=rel)


def assert_uniform(weight: torch.Tensor, low: float, high: float) -> None:
    assert weight.min() >= low and weight.max() <= high
    width = high - low
    assert weight.min() < low + 0.001 * width and weight.max() > high - 0.001 * width
    assert_close(weight.std().item(), width / math.sqrt(12))


def test_init_does_not_import_lightning():
    code = "import sys, gradmon.init; sys.exit(any(m.startswith('lightning') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_normal_has_the_requested_mean_and_std():
    weight = wide_weight("normal", mean=0.5, std=0.02)
    assert_close(weight.mean().item(), 0.5)
    assert_close(weight.std().item(), 0.02)


def test_uniform_fills_the_interval():
    assert_uniform(wide_weight("uniform(a=-0.3, b=0.1)"), -0.3, 0.1)


@pytest.mark.parametrize(("scheme", "value"), [("constant(val=0.3)", 0.3), ("zeros", 0.0), ("ones", 1.0)])
def test_constant_schemes_fill_every_entry(scheme, value):
    assert torch.all(wide_weight(scheme) == value)


def test_xavier_uniform_bound_uses_both_fans():
    bound = math.sqrt(6 / (FAN_IN + FAN_OUT))
    assert_uniform(wide_weight("xavier_uniform"), -bound, bound)


def test_xavier_gain_comes_from_the_nonlinearity():
    bound = 5 / 3 * math.sqrt(6 / (FAN_IN + FAN_OUT))
    assert_uniform(wide_weight("xavier_uniform", nonlinearity="tanh"), -bound, bound)


def test_xavier_normal_std_uses_both_fans():
    assert_close(wide_weight("xavier_normal", gain=2.0).std().item(), 2.0 * math.sqrt(2 / (FAN_IN + FAN_OUT)))


@pytest.mark.parametrize(("mode", "fan"), [("fan_in", FAN_IN), ("fan_out", FAN_OUT)])
def test_kaiming_normal_std_is_gain_over_root_fan(mode, fan):
    weight = wide_weight("kaiming_normal", nonlinearity="relu", mode=mode)
    assert_close(weight.std().item(), math.sqrt(2 / fan))


def test_kaiming_uniform_with_leaky_relu_slope():
    bound = math.sqrt(2 / (1 + 0.2**2)) * math.sqrt(3 / FAN_IN)
    assert_uniform(wide_weight("kaiming_uniform", a=0.2), -bound, bound)


def test_kaiming_fan_of_a_convolution_includes_the_kernel():
    conv = nn.Conv2d(64, 128, kernel_size=3)
    initialize(conv, "kaiming_normal", nonlinearity="relu", generator=seeded())
    assert compute_fans(conv.weight) == (64 * 9, 128 * 9)
    assert_close(conv.weight.std().item(), math.sqrt(2 / (64 * 9)), rel=0.02)


def test_lecun_normal_has_variance_one_over_fan_in():
    assert_close(wide_weight("lecun_normal").std().item(), 1 / math.sqrt(FAN_IN))


def test_lecun_uniform_bound_is_root_three_over_fan_in():
    bound = math.sqrt(3 / FAN_IN)
    assert_uniform(wide_weight("lecun_uniform"), -bound, bound)


def test_orthogonal_rows_are_orthonormal_times_gain():
    weight = wide_weight("orthogonal", gain=2.0)
    torch.testing.assert_close(weight @ weight.T, 4.0 * torch.eye(FAN_OUT), atol=1e-4, rtol=0)


def test_trunc_normal_is_cut_at_two_std_by_default():
    weight = wide_weight("trunc_normal", std=0.02)
    assert weight.abs().max() <= 0.04
    # The standard deviation of N(0, 1) restricted to [-2, 2].
    assert_close(weight.std().item(), 0.8796 * 0.02)


@pytest.mark.parametrize(
    ("scheme", "arguments", "torch_init"),
    [
        ("normal", {"std": 0.3}, lambda w, g: nn.init.normal_(w, 0.0, 0.3, generator=g)),
        ("xavier_uniform", {"nonlinearity": "tanh"}, lambda w, g: nn.init.xavier_uniform_(w, 5 / 3, generator=g)),
        ("xavier_normal", {}, lambda w, g: nn.init.xavier_normal_(w, generator=g)),
        ("kaiming_uniform", {"a": 0.1}, lambda w, g: nn.init.kaiming_uniform_(w, a=0.1, generator=g)),
        (
            "kaiming_normal",
            {"mode": "fan_out", "nonlinearity": "relu"},
            lambda w, g: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=g),
        ),
        ("orthogonal", {}, lambda w, g: nn.init.orthogonal_(w, generator=g)),
        ("trunc_normal", {"std": 0.5}, lambda w, g: nn.init.trunc_normal_(w, 0.0, 0.5, -1.0, 1.0, generator=g)),
    ],
)
def test_schemes_draw_the_same_numbers_as_torch_nn_init(scheme, arguments, torch_init):
    ours, theirs = nn.Conv1d(6, 10, 3), nn.Conv1d(6, 10, 3)
    initialize(ours, scheme, generator=seeded(7), **arguments)
    with torch.no_grad():
        torch_init(theirs.weight, seeded(7))
    assert torch.equal(ours.weight, theirs.weight)


def test_default_is_the_layers_reset_parameters_with_the_same_seed():
    ours, theirs = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)
    torch.manual_seed(5)
    initialize(ours, "default", bias="keep")
    torch.manual_seed(5)
    theirs.reset_parameters()
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)


def test_default_with_a_generator_is_reproducible_and_spares_the_global_rng():
    first, second = nn.Linear(64, 32), nn.Linear(64, 32)
    state = torch.get_rng_state()
    initialize(first, "default", generator=seeded(1))
    initialize(second, "default", generator=seeded(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.weight, second.weight)
    assert first.weight.abs().max() <= 1 / math.sqrt(64)


def test_same_seed_gives_identical_weights_and_leaves_the_global_rng_alone():
    layers = [nn.Linear(FAN_IN, FAN_OUT) for _ in range(3)]
    state = torch.get_rng_state()
    for layer, seed in zip(layers, (0, 0, 1)):
        initialize(layer, "kaiming_uniform", generator=seeded(seed))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(layers[0].weight, layers[1].weight)
    assert not torch.equal(layers[0].weight, layers[2].weight)


def test_without_a_generator_the_global_rng_is_used():
    layers = [nn.Linear(16, 16) for _ in range(2)]
    for layer in layers:
        torch.manual_seed(3)
        initialize(layer, "normal")
    assert torch.equal(layers[0].weight, layers[1].weight)


class Scaled(nn.Linear):
    pass


def small_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Embedding(10, 8),
        Scaled(8, 8),
        nn.LayerNorm(8),
        nn.Sequential(nn.Conv1d(8, 8, 1), nn.Linear(8, 2)),
    )


def test_subclasses_of_linear_are_initialised_but_not_norms_or_embeddings():
    model = small_model()
    untouched = {name: model[i].weight.clone() for i, name in [(0, "embedding"), (2, "norm")]}
    records = initialize(model, "constant(val=0.5)")
    assert [record.layer for record in records] == ["1", "3.0", "3.1"]
    assert torch.all(model[1].weight == 0.5)
    assert torch.equal(model[0].weight, untouched["embedding"]) and torch.equal(model[2].weight, untouched["norm"])


@pytest.mark.parametrize("types", [(nn.Embedding,), ("Embedding",), "torch.nn.Embedding"])
def test_norms_and_embeddings_are_initialised_when_selected_by_class_or_name(types):
    model = small_model()
    records = initialize(model, "zeros", types=types)
    assert [record.layer for record in records] == ["0"]
    assert torch.all(model[0].weight == 0)


def test_include_and_exclude_filter_qualified_names():
    model = small_model()
    records = initialize(model, "ones", include=r"^3\.", exclude=r"\.1$")
    assert [record.layer for record in records] == ["3.0"]
    assert torch.all(model[3][0].weight == 1) and not torch.all(model[3][1].weight == 1)


@pytest.mark.parametrize(("argument", "pattern"), [("include", "decoder"), ("exclude", "^2$")])
def test_a_pattern_matching_no_layer_warns(argument, pattern):
    with pytest.warns(UserWarning, match=argument):
        initialize(small_model(), "zeros", **{argument: pattern})


def test_selecting_no_layer_warns():
    with pytest.warns(UserWarning, match="No layer is selected"):
        assert initialize(nn.Sequential(nn.ReLU()), "zeros") == []


@pytest.mark.parametrize(("bias", "expected"), [("zeros", 0.0), (0.25, 0.25)])
def test_bias_is_zeroed_or_set_to_a_constant(bias, expected):
    layer = nn.Linear(8, 8)
    initialize(layer, "normal", bias=bias)
    assert torch.all(layer.bias == expected)


def test_bias_keep_leaves_it_untouched():
    layer = nn.Linear(8, 8)
    before = layer.bias.clone()
    initialize(layer, "normal", bias="keep")
    assert torch.equal(layer.bias, before)


def test_records_hold_the_weight_std_before_and_after():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    before = [layer.weight.std(correction=0).item() for layer in model]
    records = initialize(model, "normal", std=0.1, generator=seeded())
    assert [(r.layer, r.scheme, r.arguments) for r in records] == [(name, "normal", {"std": 0.1}) for name in "01"]
    assert [r.std_before for r in records] == pytest.approx(before)
    assert [r.std_after for r in records] == pytest.approx([0.1, 0.1], rel=0.02)


def test_a_scheme_that_cannot_apply_names_the_scheme_and_the_layer():
    model = small_model()
    with pytest.raises(ValueError, match=r"'orthogonal'.*'2' \(LayerNorm\).*2 dimensions"):
        initialize(model, "orthogonal", types=("LayerNorm",))


def test_string_form_round_trips():
    assert parse_scheme("kaiming_normal(nonlinearity='relu', a=0.1)") == (
        "kaiming_normal",
        {"nonlinearity": "relu", "a": 0.1},
    )
    assert parse_scheme(format_scheme("normal", {"std": 0.01, "mean": -1.0})) == (
        "normal",
        {"std": 0.01, "mean": -1.0},
    )
    assert resolve_scheme("normal(std=0.01)", {"mean": 1.0}) == ("normal", {"std": 0.01, "mean": 1.0})


@pytest.mark.parametrize(
    ("scheme", "arguments", "message"),
    [
        ("glorot", {}, "scheme='glorot'.*xavier_uniform"),
        ("normal", {"sigma": 1.0}, "'normal'.*sigma.*accepts mean, std"),
        ("constant", {}, "'constant'.*'val'"),
        ("normal", {"std": -1.0}, "'normal'.*std=-1.0"),
        ("kaiming_normal", {"mode": "fan_avg"}, "'kaiming_normal'.*mode='fan_avg'.*'fan_in'"),
        ("xavier_uniform", {"nonlinearity": "gelu"}, "nonlinearity='gelu'.*'tanh'"),
        ("xavier_uniform", {"gain": 2.0, "nonlinearity": "relu"}, "both given"),
        ("uniform", {"a": 1.0, "b": 0.0}, "b=0.0"),
        ("default", {"std": 1.0}, "'default' takes no arguments"),
        ("normal(std=0.1)", {"std": 0.2}, "`std` is given both"),
        ("normal(0.1)", {}, "literal keyword arguments"),
        ("normal(std=0.1, std=0.2)", {}, "literal keyword arguments"),
        ("normal(std=__import__('os'))", {}, "literal keyword arguments"),
        ("normal(", {}, "literal keyword arguments"),
        ("torch.nn.init.normal_", {}, "literal keyword arguments"),
    ],
)
def test_invalid_schemes_raise_before_touching_any_layer(scheme, arguments, message):
    layer = nn.Linear(4, 4)
    before = layer.weight.clone()
    with pytest.raises(ValueError, match=message):
        initialize(layer, scheme, **arguments)
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"types": ["Lnear"]}, "'Lnear'"),
        ({"types": [int]}, "nn.Module subclass"),
        ({"types": []}, "types=()"),
        ({"include": "("}, r"include='\('"),
        ({"bias": "random"}, "bias='random'.*'zeros', 'keep'"),
        ({"bias": float("nan")}, "bias=nan"),
    ],
)
def test_invalid_selection_or_bias_raises(arguments, message):
    with pytest.raises(ValueError, match=message):
        initialize(nn.Linear(4, 4), "zeros", **arguments)


def test_every_scheme_name_resolves():
    arguments = {"constant": {"val": 1.0}}
    for name in SCHEME_NAMES:
        assert resolve_scheme(name, arguments.get(name))[0] == name
    assert resolve_types("Linear") == (nn.Linear,)

