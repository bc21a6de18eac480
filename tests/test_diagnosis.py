"""gradmon.diagnosis without Lightning: each cause told apart on plain deep MLPs, from measured activations and from
the weights alone, and each rule on evidence built by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradmon.activations import ActivationRecorder, ModuleStats
from gradmon.diagnosis import (
    CAUSES,
    CONDITIONS,
    Evidence,
    Finding,
    LayerInfo,
    StepRecord,
    diagnose,
    diagnose_model,
    layer_structure,
    needed_gain,
)
from gradmon.init import initialize
from gradmon.norms import layer_norms

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def mlp(activation: str = "relu", scheme: str | None = "kaiming_normal(nonlinearity='relu')", depth: int = 12,
        width: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), ACTIVATIONS[activation]()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    if scheme is not None:
        initialize(model, scheme, generator=torch.Generator().manual_seed(0))
    return model


def findings_of(model: nn.Module, measured: bool = True) -> list[Finding]:
    """One step of a plain loop, as the module docstring shows it."""
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(128) % 10
    recorder = ActivationRecorder(model)
    with recorder:
        nn.functional.cross_entropy(model(x), y).backward()
    stats = recorder.stats() if measured else []
    return diagnose_model(model, stats, step=0, grad_norms=layer_norms(model)[0])


def causes(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.condition, f.cause) for f in findings]


@pytest.mark.parametrize(
    ("activation", "scheme", "expected"),
    [
        ("relu", "xavier_uniform", [("forward_decay", "gain_mismatch")]),
        ("relu", "normal(std=0.01)", [("forward_decay", "init_too_small")]),
        ("relu", "default", [("forward_decay", "init_too_small")]),
        ("relu", "normal(std=1)", [("forward_growth", "init_too_large")]),
        ("sigmoid", "xavier_uniform", [("backward_decay", "saturating_activation")]),
        ("relu", "kaiming_normal(nonlinearity='relu')", []),
        ("tanh", "xavier_uniform", []),
    ],
)
def test_each_cause_is_told_apart_from_measured_activations(activation, scheme, expected):
    assert causes(findings_of(mlp(activation, scheme))) == expected


@pytest.mark.parametrize(
    ("activation", "scheme", "expected"),
    [
        ("relu", "xavier_uniform", [("forward_decay", "gain_mismatch")]),
        ("relu", "normal(std=0.01)", [("forward_decay", "init_too_small")]),
        ("relu", "normal(std=1)", [("forward_growth", "init_too_large")]),
        ("sigmoid", "xavier_uniform", [("backward_decay", "saturating_activation")]),
        ("relu", "kaiming_normal(nonlinearity='relu')", []),
        ("tanh", "xavier_uniform", []),
    ],
)
def test_without_activation_statistics_the_weights_predict_the_same_causes(activation, scheme, expected):
    found = diagnose_model(mlp(activation, scheme))
    assert causes(found) == expected
    assert all("predicted" in f.explanation for f in found)


def test_a_gain_mismatch_says_what_the_weights_are_scaled_for_and_what_relu_needs():
    (finding,) = findings_of(mlp("relu", "xavier_uniform"))
    assert finding.numbers["initial weight gain"] == pytest.approx(1.0, rel=0.05)
    assert finding.numbers["needed gain"] == pytest.approx(math.sqrt(2))
    assert finding.numbers["forward factor per layer"] == pytest.approx(math.sqrt(0.5), rel=0.1)
    assert "scaled for gain 1 (Xavier" in finding.explanation and "ReLU needs gain 1.41" in finding.explanation
    assert "kaiming_normal(nonlinearity='relu')" in finding.suggestion
    assert finding.line().startswith("likely cause: init gain mismatch: ") and "; try: " in finding.line()
    assert finding.layers == tuple(f"{2 * i}" for i in range(13))


def test_pytorch_default_init_is_named_as_such():
    (finding,) = findings_of(mlp("relu", "default"))
    assert "PyTorch's default init" in finding.explanation
    assert finding.numbers["initial weight RMS / needed"] == pytest.approx(1 / math.sqrt(6), rel=0.05)  # 0.41x kaiming


def test_large_negative_biases_kill_relu_units_and_the_units_are_named():
    model = mlp("relu", "kaiming_normal(nonlinearity='relu')", depth=4)
    with torch.no_grad():
        model[2].bias.fill_(-20.0)
    (finding,) = [f for f in findings_of(model) if f.condition == "dead_units"]
    assert finding.cause == "dead_relu" and finding.layers[0] == "3"
    assert "the biases of 2 are negative (mean -20)" in finding.explanation


def test_needed_gains_follow_torch_and_the_mean_square_of_the_activation():
    assert needed_gain(nn.ReLU()) == pytest.approx(math.sqrt(2))
    assert needed_gain(nn.Tanh()) == pytest.approx(5 / 3)
    assert needed_gain(nn.LeakyReLU(0.2)) == pytest.approx(math.sqrt(2 / 1.04))
    assert needed_gain(None) == 1.0
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert needed_gain(nn.GELU()) == pytest.approx(1 / nn.functional.gelu(z).square().mean().sqrt().item(), rel=1e-2)


def test_layer_structure_pairs_each_layer_with_the_activation_after_it():
    layers = layer_structure(mlp("relu", None, depth=2))
    assert [(info.name, info.activation, info.fan_in) for info in layers] == [
        ("0", "ReLU", 64), ("2", "ReLU", 64), ("4", None, 64)
    ]


def layer(name: str, rms: float = 0.177, activation: str | None = "ReLU") -> LayerInfo:
    return LayerInfo(name, "Linear", 64, rms, activation, math.sqrt(2) if activation else 1.0, False, True)


def test_an_update_ratio_far_above_or_below_the_usual_range_names_the_learning_rate():
    layers = [layer("a"), layer("b")]
    high = diagnose(Evidence(3, layers, update_ratios={"a": 0.5, "b": 2.0}))
    low = diagnose(Evidence(3, layers, update_ratios={"a": 1e-7, "b": 3e-8}))
    skipped = diagnose(Evidence(3, layers, update_ratios={"a": 0.0, "b": 0.0}))  # a step not taken
    assert causes(high) == [("update_ratio_high", "lr_too_high")] and high[0].layers == ("a", "b")
    assert causes(low) == [("update_ratio_low", "lr_too_low")]
    assert skipped == []


def test_weights_grown_since_the_start_blame_the_learning_rate_not_the_init():
    layers = [layer(str(i), rms=1.5) for i in range(6)]
    stats = tuple(ModuleStats(str(i), "Linear", 10.0 ** i) for i in range(6))
    (finding,) = diagnose(Evidence(9, layers, stats, initial_weight_rms={str(i): 0.177 for i in range(6)}))
    assert (finding.condition, finding.cause) == ("forward_growth", "lr_too_high")
    assert "grew 8.5x since the start" in finding.explanation


def test_non_finite_gradients_name_the_first_layer_and_the_spike_before():
    layers = [layer("a"), layer("b"), layer("c")]
    grads = {"a": 1.0, "b": math.nan, "c": math.inf}
    (finding,) = diagnose(Evidence(7, layers, grad_norms=grads, history=(StepRecord(0, 1.0), StepRecord(5, 3e5))))
    assert (finding.condition, finding.cause, finding.layers) == ("nonfinite", "gradient_spike", ("b",))
    assert "first non-finite gradient in b" in finding.explanation and "step 5" in finding.explanation


def test_non_finite_gradients_after_an_overflowing_activation_name_the_module():
    layers = [layer("a"), layer("b")]
    stats = (ModuleStats("a", "Linear", 3e30), ModuleStats("act", "ReLU", math.inf),
             ModuleStats("b", "Linear", math.nan))
    (finding,) = diagnose(Evidence(2, layers, stats, grad_norms={"a": math.nan, "b": math.nan}))
    assert (finding.cause, finding.layers) == ("activation_overflow", ("a", "act"))
    assert "overflowed first at act" in finding.explanation and "after a (RMS 3e30)" in finding.explanation


def test_every_condition_and_cause_has_words():
    assert all(isinstance(v, str) and v for v in {**CONDITIONS, **CAUSES}.values())
