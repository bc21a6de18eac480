"""Property tests: every argument of ``GradCheck`` and every keyword argument of ``check_gradients`` refuses every
invalid value with a ``ValueError`` or ``TypeError`` that names it, and every valid value is accepted."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradmon import GradCheck
from gradmon.numerical import check_gradients, max_retries

FAST = settings(max_examples=50, deadline=None)
MAX_INT = 2**53
MAX_SEED = 2**64 - 1
HUGE_INTS = st.sampled_from([MAX_INT + 1, 2**64, 10**400])

not_a_number = st.one_of(
    st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(), max_size=2), st.just(object())
)


def invalid_counts(minimum):
    """Not an integer in [minimum, 2**53]: bools, floats (1.0 included), other types, too small, too large."""
    return st.one_of(
        not_a_number,
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(max_value=minimum - 1),
        st.integers(min_value=MAX_INT + 1),
        HUGE_INTS,
    )


invalid_seeds = st.one_of(
    not_a_number,
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(max_value=-1),
    st.integers(min_value=MAX_SEED + 1),
    st.sampled_from([2**64, 10**400]),
)


def invalid_positive_floats(above=None):
    """Not a finite number > 0 (and, with ``above``, not below it either)."""
    strategies = [
        not_a_number,
        st.floats(max_value=0.0),
        st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**400), 0, -1]),
        st.integers(max_value=0),
    ]
    if above is not None:
        strategies += [st.floats(min_value=above), st.integers(min_value=math.ceil(above))]
    return st.one_of(*strategies)


valid_fail_above = st.floats(min_value=1e-300, max_value=2.0, exclude_max=True)

GRAD_CHECK_INVALID = {
    "every_n_steps": invalid_counts(1),
    "num_samples": invalid_counts(1),
    "num_directions": invalid_counts(1),
    "burn_in_steps": invalid_counts(0),
    # Below 1e-10 the loss's rounding swamps the central difference (a 10x wrong gradient passed at 1e-13).
    "eps": st.one_of(invalid_positive_floats(above=1.0000001), st.floats(0.0, 1e-10, exclude_max=True)),
    "fail_above": invalid_positive_floats(above=2.0),
    "good_below": invalid_positive_floats(above=1e-2),  # the default fail_above
    "seed": invalid_seeds,
    "retries": st.one_of(invalid_counts(0), st.integers(min_value=max_retries(1e-6) + 1)),
    "on_failure": st.one_of(not_a_number, st.text(max_size=8).filter(lambda s: s not in ("warn", "stop", "raise"))),
}


@pytest.mark.parametrize("name", sorted(GRAD_CHECK_INVALID))
@FAST
@given(data=st.data())
def test_grad_check_callback_refuses_every_invalid_value_naming_the_argument(name, data):
    value = data.draw(GRAD_CHECK_INVALID[name], label=name)
    with pytest.raises((ValueError, TypeError), match=f"`{name}="):
        GradCheck(**{name: value})


@FAST
@given(value=st.one_of(not_a_number.filter(lambda v: not isinstance(v, bool)), st.integers(), st.floats()))
def test_check_at_start_refuses_everything_but_a_bool_with_a_type_error(value):
    with pytest.raises(TypeError, match="`check_at_start="):
        GradCheck(check_at_start=value)


@FAST
@given(
    every_n_steps=st.integers(1, MAX_INT),
    num_samples=st.integers(1, MAX_INT),
    num_directions=st.integers(1, MAX_INT),
    eps=st.one_of(st.floats(min_value=1e-10, max_value=1.0), st.just(1)),
    thresholds=valid_fail_above.flatmap(
        lambda fail: st.tuples(st.just(fail), st.floats(min_value=0.0, max_value=fail, exclude_min=True,
                                                          exclude_max=True))
    ),
    check_at_start=st.booleans(),
    burn_in_steps=st.integers(0, MAX_INT),
    on_failure=st.sampled_from(["warn", "stop", "raise"]),
    seed=st.integers(0, MAX_SEED),
    retries_fraction=st.floats(0.0, 1.0),
)
def test_grad_check_callback_accepts_every_valid_value(
    every_n_steps, num_samples, num_directions, eps, thresholds, check_at_start, burn_in_steps, on_failure, seed,
    retries_fraction,
):
    fail_above, good_below = thresholds
    retries = int(retries_fraction * max_retries(float(eps)))
    check = GradCheck(
        every_n_steps=every_n_steps, num_samples=num_samples, num_directions=num_directions, eps=eps,
        fail_above=fail_above, good_below=good_below, check_at_start=check_at_start, burn_in_steps=burn_in_steps,
        on_failure=on_failure, seed=seed, retries=retries,
    )
    assert check.retries == retries
    assert (check.every_n_steps, check.num_samples, check.num_directions) == (every_n_steps, num_samples,
                                                                              num_directions)
    assert (check.eps, check.fail_above, check.good_below) == (float(eps), fail_above, good_below)
    assert (check.check_at_start, check.burn_in_steps, check.on_failure, check.seed) == (
        check_at_start, burn_in_steps, on_failure, seed
    )


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def mse(model, batch):
    return model(batch).square().mean()


INPUTS = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
MODEL = tiny_model()

CHECK_GRADIENTS_INVALID = {
    "num_directions": invalid_counts(1),
    "eps": invalid_positive_floats(),
    "fail_above": invalid_positive_floats(above=2.0),
    "good_below": invalid_positive_floats(above=1e-2),
    "retries": st.one_of(invalid_counts(0), st.integers(min_value=max_retries(1e-6) + 1)),
    "seed": invalid_seeds,
}


@pytest.mark.parametrize("name", sorted(CHECK_GRADIENTS_INVALID))
@FAST
@given(data=st.data())
def test_check_gradients_refuses_every_invalid_keyword_naming_it(name, data):
    value = data.draw(CHECK_GRADIENTS_INVALID[name], label=name)
    with pytest.raises((ValueError, TypeError), match=f"`{name}="):
        check_gradients(MODEL, mse, INPUTS, **{name: value})


@pytest.mark.parametrize(("model", "loss_fn", "name"), [(None, mse, "model"), (MODEL, "mse", "loss_fn")])
def test_check_gradients_refuses_a_model_or_loss_of_the_wrong_kind(model, loss_fn, name):
    with pytest.raises(TypeError, match=f"`{name}="):
        check_gradients(model, loss_fn, INPUTS)


@settings(max_examples=20, deadline=None)
@given(
    num_directions=st.integers(1, 2),
    eps=st.floats(1e-7, 1e-4),
    thresholds=st.floats(1e-4, 1.99).flatmap(
        lambda fail: st.tuples(st.just(fail), st.floats(min_value=1e-300, max_value=fail, exclude_max=True))
    ),
    retries=st.integers(0, 2),
    seed=st.integers(0, MAX_SEED),
)
def test_check_gradients_accepts_valid_keywords_and_passes_a_correct_model(
    num_directions, eps, thresholds, retries, seed
):
    fail_above, good_below = thresholds
    records = check_gradients(
        MODEL, mse, INPUTS, num_directions=num_directions, eps=eps, fail_above=fail_above, good_below=good_below,
        retries=retries, seed=seed,
    )
    assert [r.layer for r in records] == ["0", "2"]
    assert all(r.passed for r in records), records

