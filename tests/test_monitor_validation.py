"""Property-based: every invalid argument of GradNormMonitor, GradHealthMonitor and HealthRules is refused at
construction with a ValueError or TypeError that names it; valid ones construct."""

from __future__ import annotations

import math
import warnings

import pytest
from helpers import MLP, fit
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradmon import GradHealthMonitor, GradNormMonitor
from gradmon.health import HealthRules
from gradmon.norms import layer_norms

SETTINGS = settings(max_examples=40, deadline=None)

not_a_number = st.one_of(st.text(max_size=5), st.none(), st.lists(st.integers(), max_size=2), st.booleans())
huge_ints = st.one_of(st.integers(min_value=2**53 + 1, max_value=2**70), st.just(10**400), st.just(2**64))


def ints_below(minimum: int) -> st.SearchStrategy:
    return st.integers(max_value=minimum - 1, min_value=-(2**70))


def bad_ints(minimum: int, allow_none: bool = False) -> st.SearchStrategy:
    """Not an integer in [minimum, 2**53]: below it, beyond it, a bool, a float, text (None unless allowed)."""
    options = [ints_below(minimum), huge_ints, st.booleans(), st.floats(allow_nan=True), st.text(max_size=4)]
    if not allow_none:
        options.append(st.none())
    return st.one_of(options)


def bad_floats(minimum: float, inclusive: bool, maximum: float = math.inf, allow_none: bool = False
               ) -> st.SearchStrategy:
    below = st.floats(max_value=minimum, exclude_max=inclusive, allow_nan=False, allow_infinity=True)
    options = [below, st.just(math.nan), st.booleans(), st.text(max_size=4)]
    if maximum < math.inf:
        options.append(st.floats(min_value=maximum, allow_nan=False, allow_infinity=True))
    if not allow_none:
        options.append(st.none())
    return st.one_of(options)


def bools_refused() -> st.SearchStrategy:
    return st.one_of(st.text(max_size=6), st.integers(), st.none(), st.floats())


def assert_refused(factory, argument: str, value) -> None:
    with pytest.raises((ValueError, TypeError), match=f"`{argument}="):
        factory(**{argument: value})


# --- GradNormMonitor ---------------------------------------------------------------------------------------------


@SETTINGS
@given(st.one_of(st.floats(max_value=0.25, exclude_max=True, allow_nan=False), st.just(math.nan), st.booleans(),
                 st.none(), st.just(1e-300), st.just(5e-324), st.just("0.001"),
                 st.text(alphabet="xyz-", min_size=1, max_size=4), st.just(-(10**400))))
def test_grad_norm_monitor_refuses_a_bad_norm_type(value) -> None:
    assert_refused(GradNormMonitor, "norm_type", value)


@SETTINGS
@given(st.sampled_from(["log_every_n_steps", "histogram_every_n_steps"]), bad_ints(1, allow_none=True))
def test_grad_norm_monitor_refuses_bad_intervals(argument: str, value) -> None:
    assert_refused(GradNormMonitor, argument, value)


@SETTINGS
@given(st.sampled_from(["log_weight_norms", "log_update_ratios"]), bools_refused())
def test_grad_norm_monitor_refuses_non_booleans(argument: str, value) -> None:
    assert_refused(GradNormMonitor, argument, value)


@SETTINGS
@given(st.text(max_size=10).filter(lambda s: s not in ("layer", "parameter")))
def test_grad_norm_monitor_refuses_an_unknown_group_by(value: str) -> None:
    assert_refused(GradNormMonitor, "group_by", value)


@SETTINGS
@given(
    norm_type=st.one_of(st.floats(min_value=0.25, max_value=1e3), st.just("inf")),
    every=st.one_of(st.none(), st.integers(1, 2**53)),
    flag=st.booleans(),
)
def test_grad_norm_monitor_accepts_valid_arguments(norm_type, every, flag: bool) -> None:
    monitor = GradNormMonitor(norm_type=norm_type, log_every_n_steps=every, histogram_every_n_steps=every,
                              log_weight_norms=flag, log_update_ratios=not flag)
    assert monitor.log_every_n_steps == every and monitor.log_weight_norms is flag


# --- GradHealthMonitor and HealthRules ---------------------------------------------------------------------------

INT_ARGUMENTS = {
    "warmup_steps": 0,
    "depth_window": 1,
    "vanishing_patience": 1,
    "exploding_patience": 1,
    "warn_every_n_steps": 1,
    "max_events": 0,
}


@SETTINGS
@given(st.data())
def test_grad_health_monitor_refuses_bad_integers(data) -> None:
    argument = data.draw(st.sampled_from(sorted(INT_ARGUMENTS)))
    # The rules' integers are HealthRules' arguments, the monitor's own are its.
    factory = HealthRules if argument in HealthRules.names() else GradHealthMonitor
    assert_refused(factory, argument, data.draw(bad_ints(INT_ARGUMENTS[argument])))


@SETTINGS
@given(st.one_of(bad_ints(1, allow_none=True)))
def test_grad_health_monitor_refuses_a_bad_log_interval(value) -> None:
    assert_refused(GradHealthMonitor, "log_every_n_steps", value)


@SETTINGS
@given(st.one_of(bad_ints(4), st.integers(2, 3)))
def test_depth_min_layers_must_cover_both_windows(value) -> None:
    assert_refused(HealthRules, "depth_min_layers", value)  # at least 2 * depth_window = 4


@SETTINGS
@given(st.data())
def test_grad_health_monitor_refuses_bad_numbers(data) -> None:
    argument, strategy = data.draw(st.sampled_from([
        ("vanishing_threshold", bad_floats(0.0, inclusive=True)),
        ("exploding_threshold", st.one_of(st.floats(max_value=0.0, allow_nan=False), st.just(math.nan),
                                          st.booleans(), st.text(max_size=3), st.none())),
        ("spike_factor", bad_floats(1.0, inclusive=False, allow_none=True)),
        ("history_decay", bad_floats(0.0, inclusive=True, maximum=1.0)),
        ("depth_ratio", bad_floats(0.0, inclusive=False, maximum=1.0, allow_none=True)),
        ("sibling_ratio", bad_floats(0.0, inclusive=False, maximum=1.0, allow_none=True)),
    ]))
    assert_refused(HealthRules, argument, data.draw(strategy))


@SETTINGS
@given(st.sampled_from(["on_vanishing", "on_exploding", "on_nonfinite"]),
       st.one_of(st.text(max_size=8), st.none(), st.booleans(), st.integers()))
def test_grad_health_monitor_refuses_unknown_actions(argument: str, value) -> None:
    if value in ("ignore", "warn", "stop", "raise") or (value == "skip" and argument != "on_vanishing"):
        return
    assert_refused(GradHealthMonitor, argument, value)


def test_vanishing_cannot_be_skipped() -> None:
    assert_refused(GradHealthMonitor, "on_vanishing", "skip")


@SETTINGS
@given(bools_refused())
def test_grad_health_monitor_refuses_a_non_boolean_summary(value) -> None:
    assert_refused(GradHealthMonitor, "summary", value)


@SETTINGS
@given(
    vanishing=st.floats(0.0, 1e-3),
    exploding=st.one_of(st.floats(1.0, 1e30), st.just(math.inf)),
    spike=st.one_of(st.none(), st.floats(1.001, 1e6)),
    decay=st.floats(0.0, 0.999),
    ratio=st.one_of(st.none(), st.floats(1e-9, 0.999)),
    warmup=st.integers(0, 2**53),
    patience=st.integers(1, 2**53),
)
def test_grad_health_monitor_accepts_valid_arguments(vanishing, exploding, spike, decay, ratio, warmup, patience
                                                     ) -> None:
    rules = HealthRules(vanishing_threshold=vanishing, exploding_threshold=exploding, spike_factor=spike,
                        history_decay=decay, depth_ratio=ratio, warmup_steps=warmup, vanishing_patience=patience,
                        exploding_patience=patience)
    monitor = GradHealthMonitor(rules)
    assert monitor.rules.warmup_steps == warmup and monitor.rules.exploding_threshold == exploding


@pytest.mark.parametrize("value", [{"vanishing_threshold": 1e-6}, 1e-6, "strict", HealthRules])
def test_grad_health_monitor_takes_its_rules_as_a_health_rules_value(value) -> None:
    with pytest.raises(TypeError, match=r"`rules=.*` is not valid: expected a gradmon.HealthRules"):
        GradHealthMonitor(value)
    assert GradHealthMonitor().rules == HealthRules()


@pytest.mark.parametrize("value", [0.2, 0.001, 1e-300, 5e-324])
@pytest.mark.parametrize("factory", [GradNormMonitor, GradHealthMonitor, lambda norm_type: layer_norms(nn.Linear(2, 2),
                                                                                                       norm_type)])
def test_a_norm_type_so_small_that_healthy_norms_overflow_is_refused_naming_the_range(factory, value) -> None:
    # At p=0.001 every healthy layer's norm was inf: flagged exploding and skipped at every step.
    with pytest.raises(ValueError, match=rf'`norm_type={value!r}` is not valid: expected a number p >= 0.25 or "inf"'):
        factory(norm_type=value)


def test_the_smallest_accepted_norm_type_keeps_healthy_norms_finite(tmp_path) -> None:
    monitor = GradHealthMonitor(norm_type=0.25, on_exploding="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(MLP(), [monitor], steps=3)
    # Small p measure large norms by construction (n**(1/p) times an entry), but finite ones.
    norms = monitor.tracker.state_dict()
    assert not any(e.condition == "nonfinite" or not math.isfinite(e.value) for e in monitor.events), norms
