"""The scheme functions of :mod:`gradmon.init_schemes`, called directly on a tensor."""

import inspect

import pytest
import torch

from gradmon.init_schemes import (
    RANDOM_SCHEMES,
    SCHEMES,
    apply_scheme,
    constant_,
    normal_,
    ones_,
    trunc_normal_,
    uniform_,
    xavier_uniform_,
    zeros_,
)


@pytest.mark.parametrize(
    ("function", "arguments", "name"),
    [
        (normal_, {"std": 1e39}, "std"),
        (normal_, {"std": 3e38}, "std"),  # finite itself, but the draws overflow float32
        (uniform_, {"a": -3e38, "b": 3e38}, "b"),  # torch would raise a RuntimeError about to - from
        (constant_, {"val": 1e39}, "val"),
        (xavier_uniform_, {"gain": 1e39}, "gain"),
        (trunc_normal_, {"std": 1e39}, "std"),
    ],
)
def test_pure_scheme_functions_refuse_values_that_become_inf(function, arguments, name):
    with pytest.raises(ValueError, match=f"`{name}="):
        function(torch.empty(8, 8), **arguments)


@pytest.mark.parametrize("function", [constant_, zeros_, ones_])
def test_schemes_that_draw_nothing_take_no_generator(function):
    assert "generator" not in inspect.signature(function).parameters


def test_every_other_scheme_draws_from_the_generator_it_is_given():
    assert set(SCHEMES) - RANDOM_SCHEMES == {"constant", "zeros", "ones"}
    for name in sorted(RANDOM_SCHEMES):
        first, second = torch.empty(8, 8), torch.empty(8, 8)
        arguments = {"std": 0.5} if name == "trunc_normal" else {}
        state = torch.get_rng_state()
        apply_scheme(name, first, arguments, torch.Generator().manual_seed(3))
        apply_scheme(name, second, arguments, torch.Generator().manual_seed(3))
        assert torch.equal(first, second), name
        assert torch.equal(torch.get_rng_state(), state), name


@pytest.mark.parametrize(("name", "arguments", "value"), [("constant", {"val": 0.5}, 0.5), ("zeros", {}, 0.0)])
def test_a_generator_handed_to_a_scheme_that_draws_nothing_is_left_alone(name, arguments, value):
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert torch.all(apply_scheme(name, torch.empty(4, 4), arguments, generator) == value)
    assert torch.equal(generator.get_state(), state)
