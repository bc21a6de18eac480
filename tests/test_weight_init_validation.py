"""Property tests: every argument of ``WeightInit(...)`` and ``gradmon.init.initialize(...)`` is checked where it is
written. An invalid value raises ValueError or TypeError whose message names the argument (`name=...`); a valid
one constructs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradmon import WeightInit
from gradmon.init import initialize
from gradmon.init_schemes import NONLINEARITIES, SCHEME_NAMES
from gradmon.init_spec import format_scheme, scheme_keywords

FLOAT32_MAX = 3.4028234663852886e38
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def construct(target: str, scheme: object = "zeros", **kwargs: object) -> object:
    """Build a WeightInit, or run initialize on a small Linear, with these arguments."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "matches no layer" and truncation warnings are not what is tested
        if target == "callback":
            return WeightInit(scheme, **kwargs)
        kwargs.pop("seed", None)
        return initialize(nn.Sequential(nn.Linear(3, 2)), scheme, **kwargs)


def assert_refused(target: str, names: tuple[str, ...], scheme: object = "zeros", **kwargs: object) -> None:
    with pytest.raises((ValueError, TypeError)) as error:
        construct(target, scheme, **kwargs)
    assert any(f"`{name}=" in str(error.value) for name in names), (names, str(error.value))


TARGETS = st.sampled_from(["callback", "initialize"])

# Values no number-valued argument takes: not numbers, bools, NaN, infinities, beyond float32 (1e39 is inf there),
# ints beyond any float.
NOT_A_FINITE_FLOAT32 = st.one_of(
    st.booleans(),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.complex_numbers(max_magnitude=1, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**400), 2**128, 1e39]),
    st.floats(min_value=3.5e38, allow_infinity=False),
    st.floats(max_value=-3.5e38, allow_infinity=False),
)
NUMBER = st.one_of(st.floats(-1e6, 1e6), st.integers(-(10**6), 10**6))
POSITIVE = st.one_of(st.floats(1e-6, 1e6), st.integers(1, 10**6))
NOT_A_NAME = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6))

# (scheme, keyword, keywords it needs beside it, further invalid values, whether None is accepted)
NUMERIC_KEYWORDS = [
    ("normal", "mean", {}, st.nothing(), False),
    ("normal", "std", {}, st.floats(max_value=-1e-6), False),
    ("uniform", "a", {"b": 1e6}, st.floats(min_value=1e6), False),
    ("uniform", "b", {"a": -1e6}, st.floats(max_value=-1e6), False),
    ("constant", "val", {}, st.nothing(), False),
    ("xavier_uniform", "gain", {}, st.floats(max_value=0), True),
    ("xavier_normal", "param", {"nonlinearity": "leaky_relu"}, st.nothing(), True),
    ("kaiming_uniform", "a", {}, st.nothing(), False),
    ("kaiming_normal", "a", {}, st.nothing(), False),
    ("orthogonal", "gain", {}, st.floats(max_value=0), True),
    ("trunc_normal", "mean", {}, st.nothing(), False),
    ("trunc_normal", "std", {}, st.floats(max_value=0), False),
    ("trunc_normal", "a", {"b": 1e6}, st.floats(min_value=1e6), True),
    ("trunc_normal", "b", {"a": -1e6}, st.floats(max_value=-1e6), True),
]
CHOICE_KEYWORDS = [
    ("kaiming_normal", "mode", ("fan_in", "fan_out")),
    ("kaiming_uniform", "nonlinearity", NONLINEARITIES),
    ("xavier_uniform", "nonlinearity", NONLINEARITIES),
]


@st.composite
def invalid_numeric_keyword(draw):
    scheme, keyword, needs, extra, none_ok = draw(st.sampled_from(NUMERIC_KEYWORDS))
    bad = [NOT_A_FINITE_FLOAT32, extra] + ([] if none_ok else [st.none()])
    return scheme, keyword, needs, draw(st.one_of(bad))


@SETTINGS
@given(target=TARGETS, case=invalid_numeric_keyword(), as_string=st.booleans())
def test_invalid_scheme_number_is_refused_naming_it(target, case, as_string):
    scheme, keyword, needs, value = case
    arguments = {**needs, keyword: value}
    if as_string:
        # The string form of a config; a value with no literal spelling (nan) makes the string itself invalid.
        assert_refused(target, (keyword, "scheme"), format_scheme(scheme, arguments))
    else:
        assert_refused(target, (keyword,), scheme, **arguments)


@SETTINGS
@given(target=TARGETS, case=st.sampled_from(CHOICE_KEYWORDS), value=NOT_A_NAME)
def test_invalid_scheme_choice_is_refused_naming_it(target, case, value):
    scheme, keyword, choices = case
    if (value in choices and type(value) is str) or (value is None and scheme.startswith("xavier")):
        return  # a valid value; xavier's nonlinearity is optional
    assert_refused(target, (keyword,), scheme, **{keyword: value})


# Keywords that are arguments of WeightInit / initialize themselves, not of the scheme.
OWN_ARGUMENTS = {"scheme", "types", "include", "exclude", "weights", "bias", "seed", "generator", "module"}


@SETTINGS
@given(
    target=TARGETS,
    scheme=st.one_of(NOT_A_NAME, st.binary(max_size=3)),
    keyword=st.from_regex(r"[a-z]\w{0,6}", fullmatch=True).filter(lambda k: k not in OWN_ARGUMENTS),
)
def test_unknown_scheme_or_keyword_is_refused_naming_it(target, scheme, keyword):
    if scheme not in SCHEME_NAMES:
        assert_refused(target, ("scheme",), scheme)
    name = "normal" if isinstance(scheme, bytes) or scheme not in SCHEME_NAMES else scheme
    if keyword not in scheme_keywords(name):
        assert_refused(target, (keyword,), name, **{keyword: 1.0})


@st.composite
def valid_scheme(draw):
    scheme = draw(st.sampled_from(SCHEME_NAMES))
    gain_options = st.one_of(
        st.just({}),
        st.fixed_dictionaries({"gain": POSITIVE}),
        st.fixed_dictionaries({"nonlinearity": st.sampled_from(NONLINEARITIES)}),
        st.fixed_dictionaries({"nonlinearity": st.just("leaky_relu"), "param": NUMBER}),
    )
    options = {
        "normal": st.fixed_dictionaries({}, optional={"mean": NUMBER, "std": POSITIVE}),
        "uniform": st.fixed_dictionaries({"a": st.floats(-1e6, 0), "b": st.floats(1e-3, 1e6)}),
        "constant": st.fixed_dictionaries({"val": NUMBER}),
        "xavier_uniform": gain_options,
        "xavier_normal": gain_options,
        "orthogonal": gain_options,
        "kaiming_uniform": st.fixed_dictionaries(
            {},
            optional={
                "a": NUMBER,
                "mode": st.sampled_from(["fan_in", "fan_out"]),
                "nonlinearity": st.sampled_from(NONLINEARITIES),
            },
        ),
        "trunc_normal": st.fixed_dictionaries({}, optional={"mean": NUMBER, "std": POSITIVE}),
    }
    options["kaiming_normal"] = options["kaiming_uniform"]
    return scheme, draw(options.get(scheme, st.just({})))


TYPE_NAMES = [
    "Linear",
    "Conv2d",
    "ConvTranspose1d",
    "Bilinear",
    "Embedding",
    "LayerNorm",
    "BatchNorm1d",
    "LSTM",
    "GRU",
    "LSTMCell",
    "MultiheadAttention",
    "torch.nn.Embedding",
    nn.Linear,
    nn.GRU,
]
VALID_TYPES = st.one_of(st.sampled_from(TYPE_NAMES), st.lists(st.sampled_from(TYPE_NAMES), min_size=1, max_size=3))
PLAIN_PATTERN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._^$", max_size=8)


@SETTINGS
@given(
    target=TARGETS,
    scheme=valid_scheme(),
    as_string=st.booleans(),
    types=VALID_TYPES,
    include=st.one_of(st.none(), PLAIN_PATTERN),
    exclude=st.one_of(st.none(), PLAIN_PATTERN),
    weights=st.one_of(st.none(), st.sampled_from(["weight", "weight_hh", "in_proj", "^weight$"])),
    bias=st.one_of(
        st.sampled_from(["zeros", "keep"]), st.floats(-FLOAT32_MAX, FLOAT32_MAX), st.integers(-(10**30), 10**30)
    ),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_valid_arguments_construct(target, scheme, as_string, types, include, exclude, weights, bias, seed):
    name, arguments = scheme
    if name == "default":
        weights = None
    spec, keywords = (format_scheme(name, arguments), {}) if as_string else (name, arguments)
    made = construct(
        target, spec, types=types, include=include, exclude=exclude, weights=weights, bias=bias, seed=seed, **keywords
    )
    if target == "callback":
        assert (made.scheme, made.arguments, made.seed) == (name, arguments, seed)


NOT_A_TYPE = st.one_of(
    st.sampled_from(
        [
            "ReLU",
            "Sequential",
            "Dropout",
            "Module",
            "Identity",
            "ModuleList",
            "Tanh",
            "Flatten",
            "torch.nn.ReLU",
            nn.ReLU,
            nn.Sequential,
            nn.Module,
            int,
            "",
            ".",
            "..Linear",
            "torch.nn.",
        ]
    ),
    st.from_regex(r"Zz[A-Za-z0-9_]{0,8}", fullmatch=True),  # no dot: looked up in torch.nn only, never imported
    st.sampled_from([None, 3, 2.5, True, b"Linear", [], (), {}]),
)


@SETTINGS
@given(
    target=TARGETS,
    types=st.one_of(NOT_A_TYPE, st.lists(NOT_A_TYPE, min_size=1, max_size=2).map(lambda t: ["Linear", *t])),
)
def test_invalid_types_are_refused_naming_types_and_what_is_accepted(target, types):
    with pytest.raises(ValueError) as error:
        construct(target, types=types)
    message = str(error.value)
    assert (
        "`types=" in message
        and "Linear, Bilinear" in message
        and "nn.Module subclasses defined outside torch" in message
    )


NOT_A_PATTERN = st.one_of(
    st.sampled_from(["(", "[", "*", "a{99999999999}", "(?P<", "\\", b"net", 3, True, ["net"]]),
    st.integers(),
    st.binary(min_size=1, max_size=3),
)


@SETTINGS
@given(target=TARGETS, argument=st.sampled_from(["include", "exclude", "weights"]), pattern=NOT_A_PATTERN)
def test_invalid_patterns_are_refused_naming_them(target, argument, pattern):
    assert_refused(target, (argument,), "zeros", **{argument: pattern})


@SETTINGS
@given(
    target=TARGETS,
    bias=st.one_of(
        NOT_A_FINITE_FLOAT32.filter(lambda b: b not in ("zeros", "keep")), st.none(), st.sampled_from(["zero", "none"])
    ),
)
def test_invalid_bias_is_refused_naming_it(target, bias):
    assert_refused(target, ("bias",), "zeros", bias=bias)


@SETTINGS
@given(
    seed=st.one_of(
        st.integers(min_value=2**64),
        st.integers(max_value=-1),
        st.sampled_from([10**400, 2**64, True, False, 1.0, math.nan, "0", [0]]),
    )
)
def test_invalid_seed_is_refused_naming_it(seed):
    assert_refused("callback", ("seed",), "zeros", seed=seed)


@SETTINGS
@given(
    module=st.sampled_from([None, 3, "net", [nn.Linear(2, 2)], nn.Linear]),
    generator=st.sampled_from([0, "cpu", torch.device("cpu"), True]),
)
def test_initialize_refuses_a_module_or_generator_of_the_wrong_kind(module, generator):
    with pytest.raises(TypeError, match="`module="):
        initialize(module, "zeros")
    with pytest.raises(TypeError, match="`generator="):
        initialize(nn.Linear(2, 2), "zeros", generator=generator)
