import copy
import math

import pytest
import torch
from torch import nn

import gradmon.init
from gradmon import init_schemes, init_spec
from gradmon.init import compute_fans, initialize, resolve_types, select_layers

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


@pytest.mark.parametrize(
    ("scheme", "arguments", "message"),
    [
        ("glorot", {}, "scheme='glorot'.*xavier_uniform"),
        ("normal", {"sigma": 1.0}, "sigma=1.0.*'normal' accepts: mean, std"),
        ("constant", {}, "'constant'.*'val'"),
        ("normal", {"std": -1.0}, "'normal'.*std=-1.0"),
        ("kaiming_normal", {"mode": "fan_avg"}, "'kaiming_normal'.*mode='fan_avg'.*'fan_in'"),
        ("xavier_uniform", {"nonlinearity": "gelu"}, "nonlinearity='gelu'.*'tanh'"),
        ("xavier_uniform", {"gain": 2.0, "nonlinearity": "relu"}, "both given"),
        ("uniform", {"a": 1.0, "b": 0.0}, "b=0.0"),
        ("default", {"std": 1.0}, "std=1.0.*'default' accepts none"),
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
        ({"types": []}, "types=\\[\\]"),
        ({"include": "("}, r"include='\('"),
        ({"bias": "random"}, "bias='random'.*'zeros', 'keep'"),
        ({"bias": float("nan")}, "bias=nan"),
    ],
)
def test_invalid_selection_or_bias_raises(arguments, message):
    with pytest.raises(ValueError, match=message):
        initialize(nn.Linear(4, 4), "zeros", **arguments)


def test_a_type_name_resolves_to_its_torch_nn_class():
    assert resolve_types("Linear") == (nn.Linear,)


def test_init_is_the_entry_point_for_the_schemes_and_their_string_form():
    assert gradmon.init.format_scheme is init_spec.format_scheme
    assert gradmon.init.resolve_scheme is init_spec.resolve_scheme
    assert gradmon.init.SCHEME_NAMES is init_schemes.SCHEME_NAMES
    assert all(getattr(gradmon.init, function.__name__) is function for function in init_schemes.SCHEMES.values())
    assert set(gradmon.init.__all__) <= set(dir(gradmon.init))


# ----------------------------------------------------------------------------------------------------------------
# Names under wrappers, recurrent and attention weights, float32 range, types
# ----------------------------------------------------------------------------------------------------------------


class Wrapped(nn.Module):
    """Holds ``inner`` under ``attribute``, as torch.compile (``_orig_mod``), FSDP1 (``_fsdp_wrapped_module``) and
    activation checkpointing (``_checkpoint_wrapped_module``) do."""

    def __init__(self, inner: nn.Module, attribute: str) -> None:
        super().__init__()
        setattr(self, attribute, inner)


def wrapped_model() -> nn.Module:
    model = nn.Module()
    model.net = Wrapped(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "_orig_mod")
    model.block = Wrapped(Wrapped(nn.Linear(2, 2), "_checkpoint_wrapped_module"), "_fsdp_wrapped_module")
    return model


def test_wrapper_pieces_are_dropped_from_names_for_selection_and_records():
    model = wrapped_model()
    assert [name for name, _ in select_layers(model)] == ["net.0", "net.2", "block"]
    records = initialize(model, "ones", include=r"^(net\.0|block)$")
    assert [record.name for record in records] == ["net.0", "block"]
    assert torch.all(model.net._orig_mod[0].weight == 1) and not torch.all(model.net._orig_mod[2].weight == 1)
    assert torch.all(model.block._fsdp_wrapped_module._checkpoint_wrapped_module.weight == 1)
    assert initialize(model, "zeros", exclude=r"^net\.") and torch.all(model.net._orig_mod[0].weight == 1)


def lstm_reference_draws(lstm: nn.LSTM, init, seed: int) -> dict[str, torch.Tensor]:
    """What drawing ``init`` into each weight matrix in parameter order, one generator throughout, gives."""
    generator = seeded(seed)
    reference = copy.deepcopy(lstm)
    with torch.no_grad():
        for name, tensor in reference.named_parameters():
            if name.startswith("weight_"):
                init(tensor, generator)
    return {name: tensor for name, tensor in reference.named_parameters() if name.startswith("weight_")}


def test_lstm_weights_are_initialised_one_matrix_at_a_time_with_their_own_fans():
    lstm = nn.LSTM(16, 32, num_layers=2, bidirectional=True)
    expected = lstm_reference_draws(lstm, lambda w, g: nn.init.xavier_uniform_(w, generator=g), seed=4)
    records = initialize(lstm, "xavier_uniform", generator=seeded(4))
    assert [record.name for record in records] == list(expected)
    assert list(expected) == [
        f"weight_{kind}_l{layer}{suffix}" for layer in (0, 1) for suffix in ("", "_reverse") for kind in ("ih", "hh")
    ]
    for name, weight in expected.items():
        assert torch.equal(getattr(lstm, name), weight), name
    # Gates stacked: fan_out is 4 * hidden; fan_in is the input (16), twice the hidden (bidirectional) or the hidden.
    assert compute_fans(lstm.weight_ih_l0) == (16, 128) and compute_fans(lstm.weight_ih_l1) == (64, 128)
    assert lstm.weight_ih_l0.abs().max() <= math.sqrt(6 / (16 + 128)) < lstm.weight_hh_l0.abs().max() * 1.2
    assert all(torch.all(p == 0) for name, p in lstm.named_parameters() if name.startswith("bias_"))


def test_xavier_on_input_hidden_and_orthogonal_on_hidden_hidden_with_two_calls():
    model = nn.Sequential(nn.LSTM(8, 16), nn.Linear(16, 4))
    head_before = copy.deepcopy(model[1])
    bias_hh_before = model[0].bias_hh_l0.clone()
    initialize(model, "xavier_uniform", weights="weight_ih", bias=0.5, generator=seeded(0))
    records = initialize(model, "orthogonal", weights="weight_hh", bias="keep", generator=seeded(1))
    assert [record.name for record in records] == ["0.weight_hh_l0"]
    lstm = model[0]
    torch.testing.assert_close(lstm.weight_hh_l0.T @ lstm.weight_hh_l0, torch.eye(16), atol=1e-5, rtol=0)
    assert lstm.weight_ih_l0.abs().max() <= math.sqrt(6 / (8 + 64))
    # Each bias goes with its own weight: bias_ih by the first call, bias_hh by neither, the Linear by neither.
    assert torch.all(lstm.bias_ih_l0 == 0.5) and torch.equal(lstm.bias_hh_l0, bias_hh_before)
    assert torch.equal(model[1].weight, head_before.weight) and torch.equal(model[1].bias, head_before.bias)


@pytest.mark.parametrize(
    "layer",
    [nn.RNN(3, 5, num_layers=2), nn.GRU(3, 5, bidirectional=True), nn.LSTM(3, 6, proj_size=2), nn.GRUCell(3, 5)],
)
def test_every_recurrent_weight_and_bias_is_initialised(layer):
    records = initialize(layer, "constant(val=0.25)", bias=-1.0)
    names = [name for name, _ in layer.named_parameters() if name.startswith("weight_")]
    assert [record.name for record in records] == names and names
    for name, tensor in layer.named_parameters():
        assert torch.all(tensor == (0.25 if name.startswith("weight_") else -1.0)), name


def test_multihead_attention_in_projection_is_initialised_by_default():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(16, 2)
    expected = copy.deepcopy(model.attn)
    generator = seeded(2)
    with torch.no_grad():
        nn.init.xavier_normal_(expected.in_proj_weight, generator=generator)
        nn.init.xavier_normal_(expected.out_proj.weight, generator=generator)
    nn.init.normal_(model.attn.in_proj_bias)
    records = initialize(model, "xavier_normal", generator=seeded(2))
    assert [record.name for record in records] == ["attn.in_proj_weight", "attn.out_proj"]
    assert torch.equal(model.attn.in_proj_weight, expected.in_proj_weight)
    assert torch.equal(model.attn.out_proj.weight, expected.out_proj.weight)
    assert torch.all(model.attn.in_proj_bias == 0)


def test_attention_with_other_key_and_value_sizes_initialises_q_k_v_separately():
    attn = nn.MultiheadAttention(16, 2, kdim=4, vdim=64)
    records = initialize(attn, "xavier_uniform", types="MultiheadAttention", generator=seeded(0))
    assert [record.name for record in records] == ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    for name, fan_in in (("q_proj_weight", 16), ("k_proj_weight", 4), ("v_proj_weight", 64)):
        weight = getattr(attn, name)
        bound = math.sqrt(6 / (fan_in + 16))
        assert bound * 0.9 < weight.abs().max() <= bound, name


def test_default_resets_recurrent_and_attention_layers_with_their_own_rule():
    model = nn.Sequential(nn.LSTM(4, 8), nn.MultiheadAttention(8, 2))
    nn.init.zeros_(model[0].weight_hh_l0)
    nn.init.zeros_(model[1].in_proj_weight)
    records = initialize(model, "default", generator=seeded(0))
    assert [r.name for r in records] == ["0.weight_ih_l0", "0.weight_hh_l0", "1.in_proj_weight", "1.out_proj"]
    assert records[1].std_before == 0 and 0 < model[0].weight_hh_l0.abs().max() <= 1 / math.sqrt(8)
    assert records[2].std_before == 0 and model[1].in_proj_weight.abs().max() <= math.sqrt(6 / (8 + 24))


def test_weights_matching_no_weight_warns_and_is_refused_with_default():
    with pytest.warns(UserWarning, match="weights='weight_hr'"):
        assert initialize(nn.LSTM(2, 2), "zeros", weights="weight_hr") == []
    with pytest.raises(ValueError, match="weights='weight'.*'default'"):
        initialize(nn.Linear(2, 2), "default", weights="weight")
    with pytest.raises(ValueError, match=r"weights='\('"):
        initialize(nn.Linear(2, 2), "zeros", weights="(")


def test_values_beyond_a_half_precision_weight_or_bias_are_refused():
    layer = nn.Linear(4, 4).half()
    with pytest.raises(ValueError, match=r"'0' \(Linear\).*`std=100000.0`.*float16"):
        initialize(nn.Sequential(layer), "normal", std=1e5)
    with pytest.raises(ValueError, match=r"`bias=100000.0`.*float16"):
        initialize(layer, "zeros", bias=1e5)
    with pytest.raises(ValueError, match="bias=1e\\+39"):
        initialize(nn.Linear(4, 4), "zeros", bias=1e39)


class UserBlock(nn.Module):
    """A user's own layer: accepted as a type although nothing can be known about its weights before fit."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, 3))


@pytest.mark.parametrize(
    "types",
    [
        "LSTM",
        "GRU",
        "RNNCell",
        "MultiheadAttention",
        "Bilinear",
        "ConvTranspose2d",
        "EmbeddingBag",
        "RMSNorm",
        "BatchNorm2d",
        "GroupNorm",
        UserBlock,
        Scaled,
        f"{__name__}.UserBlock",
    ],
)
def test_types_with_known_weights_and_user_classes_are_accepted(types):
    assert len(resolve_types(types)) == 1


@pytest.mark.parametrize(
    ("types", "message"),
    [
        ("ReLU", "torch.nn.modules.activation.ReLU has no weights"),
        ("Sequential", "Sequential has no weights"),
        ("Dropout", "Dropout has no weights"),
        ([nn.Linear, nn.Module], "Module has no weights"),
        ("torch.nn.Identity", "Identity has no weights"),
        (None, "types=None"),
        (3, "types=3"),
        (["Linear", 3], r"types=\['Linear', 3\].*3 is not an nn.Module subclass"),
    ],
)
def test_types_without_weights_or_of_the_wrong_kind_are_refused_naming_what_is_accepted(types, message):
    with pytest.raises(ValueError, match=message) as error:
        resolve_types(types)
    assert "`types=" in str(error.value) and "Linear, Bilinear, Conv1d/2d/3d" in str(error.value)


def test_user_layer_type_is_initialised():
    model = nn.Sequential(UserBlock(), nn.Linear(3, 3))
    assert [r.name for r in initialize(model, "ones", types=UserBlock)] == ["0"]
    assert torch.all(model[0].weight == 1)


# -------------------------------------------------- parametrized layers (torch.nn.utils.parametrize)


def test_a_weight_norm_layer_gets_the_drawn_weight_and_its_record_says_what_the_layer_holds():
    from torch.nn.utils import parametrizations

    plain, wrapped = nn.Linear(FAN_IN, FAN_OUT), parametrizations.weight_norm(nn.Linear(FAN_IN, FAN_OUT))
    initialize(plain, "xavier_normal", generator=seeded())
    before = wrapped.weight.detach().clone()
    [record] = initialize(wrapped, "xavier_normal", generator=seeded(), bias=0.25)
    # The draw went through weight_norm's right_inverse into its g and v: the layer now computes that draw.
    assert not torch.equal(wrapped.weight, before)
    torch.testing.assert_close(wrapped.weight.detach(), plain.weight.detach(), rtol=1e-5, atol=1e-7)
    assert record.std_after == pytest.approx(wrapped.weight.detach().std(correction=0).item(), rel=1e-6)
    assert record.std_after == pytest.approx(math.sqrt(2 / (FAN_IN + FAN_OUT)), rel=0.01)
    assert torch.all(wrapped.bias == 0.25)


def test_an_orthogonal_parametrization_gets_an_orthogonal_weight_made_from_the_draw():
    from torch.nn.utils import parametrizations

    layer = parametrizations.orthogonal(nn.Linear(64, 64))
    before = layer.weight.detach().clone()
    [record] = initialize(layer, "normal", std=0.5, generator=seeded())
    weight = layer.weight.detach()
    assert not torch.equal(weight, before)
    torch.testing.assert_close(weight @ weight.T, torch.eye(64), rtol=0, atol=1e-5)
    # The record tells what the layer computes now (an orthogonal 64x64 matrix: std 1/8), not the 0.5 drawn.
    assert record.std_after == pytest.approx(1 / 8, rel=1e-3)


class Doubled(nn.Module):
    def forward(self, x):
        return 2 * x


def test_a_parametrization_without_right_inverse_is_an_error_naming_the_layer_not_a_silent_no_op():
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    parametrize.register_parametrization(model[1], "weight", Doubled())
    with pytest.raises(ValueError, match=r"'1'.*\(ParametrizedLinear\).*parametrization \(Doubled\).*right_inverse"):
        initialize(model, "xavier_uniform")
    with pytest.raises(ValueError, match=r"'1'.*'weight' is computed by a parametrization.*reset_parameters"):
        initialize(model, "default")
