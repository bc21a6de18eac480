"""The string form of a scheme (:mod:`gradmon.init_spec`): read, written and checked against the scheme."""

import pytest

from gradmon.init_schemes import SCHEME_NAMES
from gradmon.init_spec import format_scheme, parse_scheme, resolve_scheme, scheme_keywords


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


def test_every_scheme_name_resolves():
    arguments = {"constant": {"val": 1.0}}
    for name in SCHEME_NAMES:
        assert resolve_scheme(name, arguments.get(name))[0] == name


def test_scheme_keywords_are_the_schemes_arguments_without_tensor_or_generator():
    assert scheme_keywords("normal") == ("mean", "std")
    assert scheme_keywords("constant") == ("val",)
    assert scheme_keywords("zeros") == ()
    assert scheme_keywords("default") == ()


@pytest.mark.parametrize(
    ("scheme", "name"),
    [
        ("normal(std=1e39)", "std"),
        ("normal(mean=-1e39)", "mean"),
        ("uniform(a=-1e39)", "a"),
        ("uniform(b=1e39)", "b"),
        ("constant(val=1e39)", "val"),
        ("xavier_uniform(gain=1e39)", "gain"),
        ("xavier_normal(nonlinearity='leaky_relu', param=-1e39)", "param"),
        ("kaiming_normal(a=1e39)", "a"),
        ("orthogonal(gain=3.5e38)", "gain"),
        ("trunc_normal(std=1e39)", "std"),
        ("trunc_normal(mean=1e39)", "mean"),
        ("trunc_normal(b=1e39)", "b"),
    ],
)
def test_scheme_values_beyond_float32_are_refused_naming_the_argument(scheme, name):
    with pytest.raises(ValueError, match=f"`{name}=-?3.5e\\+38|`{name}=-?1e\\+39"):
        resolve_scheme(scheme)
