"""The pure health rules (gradmon.health), step by step, without a Trainer."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradmon.health import HealthRules, HealthTracker


def names(events, condition=None):
    return [(e.layer, e.rule) for e in events if condition is None or e.condition == condition]


def test_threshold_vanishing_is_flagged_only_after_patience_consecutive_steps() -> None:
    tracker = HealthTracker(HealthRules(vanishing_patience=3, depth_ratio=None))
    norms = {"a": 1e-9, "b": 0.5}
    assert tracker.update(0, norms) == []
    assert tracker.update(1, norms) == []
    events = tracker.update(2, norms)
    assert [(e.step, e.layer, e.condition, e.rule) for e in events] == [(2, "a", "vanishing", "threshold")]
    assert events[0].value == 1e-9
    # A healthy step resets the streak.
    assert tracker.update(3, {"a": 0.1, "b": 0.5}) == []
    assert tracker.update(4, norms) == []


def test_threshold_exploding_is_flagged_at_once_by_default() -> None:
    tracker = HealthTracker()
    events = tracker.update(0, {"a": 1.0, "b": 2e4})
    assert [(e.layer, e.condition, e.rule) for e in events] == [("b", "exploding", "threshold")]


def test_nonfinite_is_flagged_at_once_first_layer_first_and_not_folded_into_history() -> None:
    tracker = HealthTracker()
    events = tracker.update(0, {"a": 0.1, "b": math.nan, "c": math.inf, "d": 0.2})
    assert [(e.layer, e.condition) for e in events] == [("b", "nonfinite"), ("c", "nonfinite")]
    history = tracker.state_dict()
    assert history["mean_log"].keys() == history["seen"].keys() == {"a", "d"}


def test_an_inf_norm_of_finite_values_is_exploding_not_nonfinite() -> None:
    tracker = HealthTracker()
    events = tracker.update(0, {"a": math.inf}, confirm_nonfinite=lambda layer: False)
    assert [(e.layer, e.condition) for e in events] == [("a", "exploding")]


def test_spike_rule_uses_the_layers_own_history_after_warmup_whatever_the_scale() -> None:
    rules = HealthRules(warmup_steps=5, exploding_threshold=math.inf, depth_ratio=None)
    for scale in (1e-6, 1.0, 1e3):
        tracker = HealthTracker(rules)
        # During warm-up even a 1000x jump is not judged against a history.
        assert tracker.update(0, {"a": scale}) == []
        assert tracker.update(1, {"a": scale * 1000}) == []
        for step in range(2, 30):
            assert tracker.update(step, {"a": scale * (1.0 + 0.5 * (step % 3))}) == []
        # 20x is noise, 1000x is a spike, at any scale.
        assert tracker.update(30, {"a": scale * 20}) == []
        events = tracker.update(31, {"a": scale * 1000})
        assert names(events) == [("a", "spike")]


def test_depth_rule_names_every_layer_far_below_the_last_ones() -> None:
    tracker = HealthTracker(HealthRules(vanishing_patience=1, vanishing_threshold=0.0))
    norms = {"l0": 1e-7, "l1": 1e-6, "l2": 1e-2, "l3": 1e-5, "l4": 0.5, "l5": 0.2}
    events = tracker.update(0, norms)
    assert names(events, "vanishing") == [("l0", "depth"), ("l1", "depth"), ("l3", "depth")]


def test_depth_rule_is_quiet_for_a_healthy_spread_and_for_shallow_models() -> None:
    tracker = HealthTracker(HealthRules(vanishing_patience=1))
    assert tracker.update(0, {"l0": 0.05, "l1": 0.1, "l2": 0.3, "l3": 0.5, "l4": 0.4}) == []
    assert tracker.update(1, {"l0": 1e-6, "l1": 1.0, "l2": 1.0}) == []  # below depth_min_layers


def test_state_dict_round_trip_continues_identically() -> None:
    rules = HealthRules(warmup_steps=3, vanishing_patience=4)
    a = HealthTracker(rules)
    for step in range(6):
        a.update(step, {"x": 1.0 + step, "y": 1e-9})
    b = HealthTracker(rules)
    b.load_state_dict(a.state_dict())
    for step in range(6, 10):
        norms = {"x": 500.0 if step == 8 else 2.0, "y": 1e-9}
        assert a.update(step, norms) == b.update(step, norms)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"vanishing_threshold": -1.0}, "vanishing_threshold"),
        ({"exploding_threshold": 0.0}, "exploding_threshold"),
        ({"vanishing_threshold": 10.0, "exploding_threshold": 1.0}, "vanishing_threshold"),
        ({"spike_factor": 0.5}, "spike_factor"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"history_decay": 1.0}, "history_decay"),
        ({"depth_ratio": 2.0}, "depth_ratio"),
        ({"depth_window": 0}, "depth_window"),
        ({"depth_window": 3, "depth_min_layers": 4}, "depth_min_layers"),
        ({"sibling_ratio": 1.0}, "sibling_ratio"),
        ({"sibling_ratio": -1e-3}, "sibling_ratio"),
        ({"vanishing_patience": 0}, "vanishing_patience"),
        ({"exploding_patience": 1.5}, "exploding_patience"),
    ],
)
def test_bad_rules_name_the_argument_and_value(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}=") as info:
        HealthRules(**kwargs)
    assert "expected" in str(info.value)


def test_a_layer_climbing_out_of_vanishing_or_zero_is_not_a_spike() -> None:
    tracker = HealthTracker(HealthRules(warmup_steps=3, depth_ratio=None, vanishing_patience=100))
    for step in range(10):
        assert tracker.update(step, {"dead": 0.0, "faint": 1e-12}) == []
    # Jumps of 1e22x and 1e6x, but from below the vanishing threshold: neither is exploding.
    events = tracker.update(10, {"dead": 4e-23, "faint": 1e-6})
    assert [e for e in events if e.condition == "exploding"] == []


# ------------------------------------------------------------------- sibling rule: gradients cancelled by construction


def bias_before_batchnorm(bias: float = 2e-8) -> dict[str, float]:
    """Per-parameter norms of Linear -> BatchNorm -> ReLU twice, then a head: the Linear biases before a BatchNorm
    have a gradient of zero plus rounding (repro 09 measured 1.3e-8 and 2.7e-8 against weights of 0.2 and 0.3)."""
    return {
        "net.0.weight": 0.19, "net.0.bias": bias, "net.1.weight": 0.022, "net.1.bias": 0.023,
        "net.3.weight": 0.29, "net.3.bias": bias, "net.4.weight": 0.069, "net.4.bias": 0.037,
        "net.6.weight": 0.5, "net.6.bias": 0.03,
    }


def test_a_parameter_far_below_its_layers_other_parameter_is_cancelled_not_vanishing() -> None:
    tracker = HealthTracker(HealthRules(vanishing_patience=1), group_by="parameter")
    for step in range(5):
        assert tracker.update(step, bias_before_batchnorm()) == []
    assert tracker.cancelled == {"net.0.bias": 0, "net.3.bias": 0}
    # The sibling rule is off: the same norms are flagged at once, as before it existed.
    off = HealthTracker(HealthRules(vanishing_patience=1, sibling_ratio=None), group_by="parameter")
    events = off.update(0, bias_before_batchnorm())
    assert [(e.layer, e.rule) for e in events] == [("net.0.bias", "threshold"), ("net.3.bias", "threshold")]
    assert off.cancelled == {}


def test_the_sibling_rule_needs_group_by_parameter_and_a_sibling_that_is_not_vanishing() -> None:
    rules = HealthRules(vanishing_patience=1)
    # Layer names (the default): "net.0" and "net" are different layers, nothing is grouped.
    layers = HealthTracker(rules).update(0, {"net.0": 0.2, "net.1": 1e-9, "net.2": 0.1, "net.3": 0.1})
    assert [e.layer for e in layers] == ["net.1"]
    # Both parameters of a layer vanishing (here 4x apart, as in a sigmoid MLP): both flagged.
    tracker = HealthTracker(rules, group_by="parameter")
    norms = {"net.0.weight": 4e-9, "net.0.bias": 1e-9, "net.2.weight": 0.1, "net.2.bias": 0.03}
    assert [e.layer for e in tracker.update(0, norms)] == ["net.0.weight", "net.0.bias"]
    # A sibling of NaN does not vouch for its layer; 100x exactly is not beyond the ratio.
    norms = {"net.0.weight": math.nan, "net.0.bias": 1e-9, "a.weight": 5e-6, "a.bias": 1e-2 * 5e-6}
    flagged = {(e.layer, e.condition) for e in tracker.update(1, norms)}
    assert flagged == {("net.0.weight", "nonfinite"), ("net.0.bias", "vanishing"), ("a.bias", "vanishing")}
    assert tracker.cancelled == {}
    # A root-level parameter is its own layer: no siblings.
    assert [e.layer for e in tracker.update(2, {"scale": 1e-9, "net.2.weight": 0.1})] == ["scale"]


def test_cancelled_parameters_stay_out_of_the_depth_rules_windows() -> None:
    # Above the vanishing threshold only the depth rule could flag it, and with it in the first window it drags the
    # window 1000x below the last one: Conv2d -> BatchNorm2d at batch 128 measured biases of 6e-7 and 2.5e-7
    # against weights of 0.01 and 0.02.
    rules = HealthRules(vanishing_patience=1)
    norms = dict(bias_before_batchnorm(), **{"net.0.weight": 0.01, "net.0.bias": 6e-7, "net.3.weight": 0.02,
                                             "net.3.bias": 2.5e-7})
    assert HealthTracker(rules, group_by="parameter").update(0, norms) == []
    off = HealthTracker(HealthRules(vanishing_patience=1, sibling_ratio=None), group_by="parameter")
    assert [(e.layer, e.rule) for e in off.update(0, norms)] == [("net.0.bias", "depth"), ("net.3.bias", "depth")]
    # Under bfloat16 autocast such a bias measured up to 4.7e-3 of its weight (Conv2d -> BatchNorm2d, batch 64).
    bf16 = dict(norms, **{"net.0.weight": 0.015, "net.0.bias": 4.7e-3 * 0.015, "net.6.weight": 2.0, "net.6.bias": 0.8})
    assert HealthTracker(rules, group_by="parameter").update(0, bf16) == []
    assert [(e.layer, e.rule) for e in off.update(1, bf16)] == [("net.0.bias", "depth"), ("net.3.bias", "depth")]
    # The depth rule fired only because a spared bias dragged the first window down: judged again without it, the
    # first layers are not far below the last ones, so nothing is starved (not even the low layer in the middle).
    middle = dict(bias_before_batchnorm(), **{"net.0.bias": 1e-9, "net.3.weight": 1e-5, "net.3.bias": 1e-5})
    tracker = HealthTracker(rules, group_by="parameter")
    assert tracker.update(0, middle) == [] and tracker.cancelled == {"net.0.bias": 0}
    # Without the cancelled biases, the depth rule still sees a real fall through depth.
    starving = dict(bias_before_batchnorm(), **{"net.0.weight": 1e-5, "net.0.bias": 1e-12, "net.1.weight": 2e-5,
                                                "net.1.bias": 1e-5})
    tracker = HealthTracker(rules, group_by="parameter")
    events = tracker.update(0, starving)
    assert [(e.layer, e.rule) for e in events] == [
        ("net.0.weight", "depth"), ("net.1.weight", "depth"), ("net.1.bias", "depth"),
    ]
    assert tracker.cancelled == {"net.0.bias": 0, "net.3.bias": 0}


def test_cancelled_parameters_survive_a_state_dict_round_trip() -> None:
    a = HealthTracker(group_by="parameter")
    a.update(3, bias_before_batchnorm())
    b = HealthTracker(group_by="parameter")
    b.load_state_dict(a.state_dict())
    assert b.cancelled == {"net.0.bias": 3, "net.3.bias": 3}
    older = {k: v for k, v in a.state_dict().items() if k != "cancelled"}  # a checkpoint from before the rule
    c = HealthTracker(group_by="parameter")
    c.load_state_dict(older)
    assert c.cancelled == {}


def test_tracker_refuses_an_unknown_group_by() -> None:
    with pytest.raises(ValueError, match="`group_by='module'`"):
        HealthTracker(group_by="module")


# ------------------------------------------------- the one-pass path for healthy layers against the rules as written


class ReferenceTracker:
    """The health rules written plainly, one layer after another (as gradmon had them before the one-pass path for
    healthy layers): what HealthTracker must agree with, event for event."""

    def __init__(self, rules: HealthRules, group_by: str = "layer") -> None:
        self.rules, self.mean_log, self.seen, self.streak = rules, {}, {}, {}
        self.by_parameter, self.cancelled = group_by == "parameter", {}

    def spared(self, norms) -> set:
        """The sibling rule: parameters more than 1 / sibling_ratio below a parameter of their layer (the name up to
        its last dot) that is finite and not below the vanishing threshold."""
        r = self.rules
        if not self.by_parameter or r.sibling_ratio is None:
            return set()
        top = {}
        for name, v in norms.items():
            if r.vanishing_threshold <= v < math.inf:
                owner = name.rsplit(".", 1)[0]
                top[owner] = max(top.get(owner, 0.0), v)
        return {n for n, v in norms.items() if v < math.inf and v < r.sibling_ratio * top.get(n.rsplit(".", 1)[0], 0)}

    def log(self, v: float) -> float:
        return math.log(v) if v > 1e-45 else math.log(1e-45)

    def update(self, step, norms, confirm=None):
        r = self.rules
        starved = set()
        values = list(norms.values())
        spared = self.spared(norms)
        if r.depth_ratio is not None and len(norms) >= r.depth_min_layers and all(v < math.inf for v in values):
            k = r.depth_window
            bound = sum(self.log(v) for v in values[-k:]) / k + math.log(r.depth_ratio)
            if sum(self.log(v) for v in values[:k]) / k < bound:
                starved = {n for n, v in list(norms.items())[:-k] if self.log(v) < bound}
                if spared:  # judged again without the spared parameters
                    for n in starved & spared:
                        self.cancelled.setdefault(n, step)
                    kept = [(n, v) for n, v in norms.items() if n not in spared]
                    starved = set()
                    if len(kept) >= r.depth_min_layers:
                        bound = sum(self.log(v) for _, v in kept[-k:]) / k + math.log(r.depth_ratio)
                        if sum(self.log(v) for _, v in kept[:k]) / k < bound:
                            starved = {n for n, v in kept[:-k] if self.log(v) < bound}
        log_vanishing = math.log(r.vanishing_threshold) if r.vanishing_threshold > 0 else math.log(1e-45)
        patience = {"vanishing": r.vanishing_patience, "exploding": r.exploding_patience}
        nonfinite, flagged = [], []
        for layer, value in norms.items():
            if value != value or (value == math.inf and (confirm is None or confirm(layer))):
                nonfinite.append((layer, "nonfinite", "nonfinite"))
                self.streak.pop((layer, "vanishing"), None)
                self.streak.pop((layer, "exploding"), None)
                continue
            lv, n = (math.log(value) if value > 1e-45 else math.log(1e-45)), self.seen.get(layer, 0)
            condition = None
            if value > r.exploding_threshold:
                condition, rule = "exploding", "threshold"
            elif value < r.vanishing_threshold and layer in spared:
                self.cancelled.setdefault(layer, step)
            elif value < r.vanishing_threshold:
                condition, rule = "vanishing", "threshold"
            elif (r.spike_factor is not None and n > 0 and n >= r.warmup_steps
                  and self.mean_log[layer] > log_vanishing and lv > self.mean_log[layer] + math.log(r.spike_factor)):
                condition, rule = "exploding", "spike"
            elif layer in starved:
                condition, rule = "vanishing", "depth"
            if condition is not None:
                count = self.streak[(layer, condition)] = self.streak.get((layer, condition), 0) + 1
                self.streak.pop((layer, {"vanishing": "exploding", "exploding": "vanishing"}[condition]), None)
                if count >= patience[condition]:
                    flagged.append((layer, condition, rule))
            else:
                self.streak.pop((layer, "vanishing"), None)
                self.streak.pop((layer, "exploding"), None)
            if value != math.inf:
                d = r.history_decay
                self.mean_log[layer] = lv if n == 0 else d * self.mean_log[layer] + (1 - d) * lv
                self.seen[layer] = n + 1
        return nonfinite + flagged


_NORM = st.one_of(
    st.floats(min_value=1e-3, max_value=10.0),  # healthy
    st.sampled_from([0.0, 1e-50, 1e-9, 5e3, 2e4, 1e30, math.inf, math.nan, 3.0e38]),
)


@settings(max_examples=300, deadline=None)
@pytest.mark.slow  # property test: many examples
@given(
    steps=st.lists(st.lists(_NORM, min_size=5, max_size=5), min_size=1, max_size=40),
    present=st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=40, max_size=40),
    warmup=st.sampled_from([0, 1, 3]),
    spike=st.sampled_from([None, 2.0, 100.0]),
    depth_ratio=st.sampled_from([None, 1e-3, 0.5]),
    patience=st.sampled_from([1, 2]),
    vanishing_threshold=st.sampled_from([0.0, 1e-7, 1e-2]),
    exploding_threshold=st.sampled_from([1e4, math.inf]),
    overflowed=st.booleans(),
)
def test_tracker_flags_what_the_rules_as_written_flag_step_after_step(
    steps, present, warmup, spike, depth_ratio, patience, vanishing_threshold, exploding_threshold, overflowed
) -> None:
    rules = HealthRules(vanishing_threshold=vanishing_threshold, exploding_threshold=exploding_threshold,
                        spike_factor=spike, warmup_steps=warmup, depth_ratio=depth_ratio, depth_min_layers=4,
                        vanishing_patience=patience, exploding_patience=patience)
    tracker, reference = HealthTracker(rules), ReferenceTracker(rules)
    confirm = (lambda layer: False) if overflowed else None  # an inf norm of finite gradients: exploding
    for step, (values, here) in enumerate(zip(steps, present)):
        norms = {f"l{i}": v for i, (v, p) in enumerate(zip(values, here)) if p or i == 0}  # some layers absent
        got = [(e.layer, e.condition, e.rule) for e in tracker.update(step, norms, confirm)]
        assert got == reference.update(step, norms, confirm), f"step {step}"
    state = tracker.state_dict()
    assert state["mean_log"] == pytest.approx(reference.mean_log) and state["seen"] == reference.seen


_PARAMETER_NORM = st.one_of(
    st.floats(min_value=1e-3, max_value=10.0),  # healthy
    st.sampled_from([0.0, 1e-12, 1e-9, 3e-8, 1e-6, 2e-5, 5e3, 2e4, math.inf, math.nan]),
)


@settings(max_examples=300, deadline=None)
@pytest.mark.slow  # property test: many examples
@given(
    steps=st.lists(st.lists(_PARAMETER_NORM, min_size=6, max_size=6), min_size=1, max_size=30),
    present=st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=30, max_size=30),
    sibling_ratio=st.sampled_from([None, 1e-2, 0.5]),
    depth_ratio=st.sampled_from([None, 1e-3, 0.5]),
    vanishing_threshold=st.sampled_from([0.0, 1e-7, 1e-2]),
)
def test_tracker_per_parameter_flags_what_the_rules_with_the_sibling_rule_as_written_flag(
    steps, present, sibling_ratio, depth_ratio, vanishing_threshold
) -> None:
    # Three layers of a weight and a bias, and a parameter of the root module (its own layer), some absent at a step.
    names = ["net.0.weight", "net.0.bias", "scale", "net.2.weight", "net.2.bias", "net.3.weight"]
    rules = HealthRules(vanishing_threshold=vanishing_threshold, warmup_steps=1, depth_ratio=depth_ratio,
                        depth_min_layers=4, sibling_ratio=sibling_ratio, vanishing_patience=2)
    tracker, reference = HealthTracker(rules, "parameter"), ReferenceTracker(rules, "parameter")
    for step, (values, here) in enumerate(zip(steps, present)):
        norms = {n: v for n, v, p in zip(names, values, here) if p or n == "net.0.bias"}
        got = [(e.layer, e.condition, e.rule) for e in tracker.update(step, norms)]
        assert got == reference.update(step, norms), f"step {step}"
        assert tracker.cancelled == reference.cancelled, f"step {step}"
    assert tracker.state_dict()["mean_log"] == pytest.approx(reference.mean_log)


@pytest.mark.parametrize("rules", [0, "", [], {}, False, 1, "strict", HealthRules, {"vanishing_threshold": 1e-3}])
def test_the_tracker_refuses_rules_that_are_not_health_rules_naming_the_argument(rules) -> None:
    with pytest.raises(TypeError, match=r"`rules=.*` is not valid: expected a HealthRules instance or None"):
        HealthTracker(rules=rules)


def test_a_dict_of_thresholds_is_refused_with_the_way_to_pass_it() -> None:
    with pytest.raises(TypeError, match=r"pass HealthRules\(\*\*\{'vanishing_threshold': 0.001\}\)"):
        HealthTracker(rules={"vanishing_threshold": 1e-3})
    assert HealthTracker(rules=HealthRules(vanishing_threshold=1e-3)).rules.vanishing_threshold == 1e-3
