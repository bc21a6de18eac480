"""The diagnosis's rules that read the optimizer and the history, and the verdict kept over a run: root cause over
symptom, kept while it holds, replaced only by stronger evidence, never contradicted."""

from __future__ import annotations

import math

import pytest

from gradmon.activations import ModuleStats
from gradmon.diagnosis import (
    Diagnosis,
    Evidence,
    Finding,
    LayerInfo,
    OptimizerInfo,
    RecurrentInfo,
    StepRecord,
    diagnose,
)

ADAM = OptimizerInfo("AdamW", 3e-3, adaptive=True)
SGD = OptimizerInfo("SGD", 0.5, adaptive=False)


def layer(name: str, rms: float = 0.177, activation: str | None = "ReLU", bias: float | None = None) -> LayerInfo:
    return LayerInfo(name, "Linear", 64, rms, activation, math.sqrt(2) if activation else 1.0, False, True, bias)


def finding(step: int, cause: str, condition: str = "forward_decay", basis: str = "activations") -> Finding:
    return Finding(step, condition, cause, ("a",), f"{cause} because", "change it", basis=basis)


def causes(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.condition, f.cause) for f in findings]


# --- the learning rate, as the optimizer makes it -------------------------------------------------------------------


def test_an_adam_step_that_moves_the_weights_by_lr_is_no_evidence_of_a_too_high_learning_rate():
    layers = [layer("a", 0.02), layer("b", 0.02)]
    ratios = {"a": 0.15, "b": 0.15}  # a healthy GPT's first AdamW step at 3e-3 on weights of RMS 0.02
    assert diagnose(Evidence(0, layers, update_ratios=ratios, optimizer=ADAM)) == []
    (sgd,) = diagnose(Evidence(0, layers, update_ratios=ratios, optimizer=SGD))
    assert (sgd.condition, sgd.cause) == ("update_ratio_high", "lr_too_high")
    assert sgd.fix == {"lr": pytest.approx(0.03)}  # lr x 1e-2 / 0.15, one significant digit


def test_a_too_low_learning_rate_proposes_one_that_moves_the_weights_by_the_usual_amount():
    (low,) = diagnose(Evidence(3, [layer("a"), layer("b")], update_ratios={"a": 1e-7, "b": 1e-7},
                               optimizer=OptimizerInfo("SGD", 1e-4, False)))
    assert low.cause == "lr_too_low" and low.fix == {"lr": pytest.approx(0.1)}  # 3e4-fold capped at 1000-fold


def test_a_loss_rising_over_the_observed_steps_is_divergence_on_any_optimizer():
    history = (StepRecord(0, 1.0, loss=4.2, lr=1.0), StepRecord(5, 3.0, loss=9.0, lr=1.0))
    evidence = Evidence(10, [layer("a", 0.5), layer("b", 0.5)], optimizer=OptimizerInfo("AdamW", 1.0, True),
                        loss=76.0, history=history, initial_weight_rms={"a": 0.02, "b": 0.02})
    (found,) = diagnose(evidence)
    assert (found.condition, found.cause, found.basis) == ("divergence", "lr_too_high", "history")
    assert "the loss rose from 4.2 at step 0 to 76" in found.explanation
    assert found.fix == {"lr": pytest.approx(1e-3)}  # each weight moved by 5% of the initial RMS (0.02) a step


def test_weights_grown_while_the_loss_falls_are_not_divergence():
    history = (StepRecord(0, 1.0, loss=3.5),)
    evidence = Evidence(50, [layer("a", 0.1), layer("b", 0.1)], optimizer=ADAM, loss=2.0, history=history,
                        initial_weight_rms={"a": 0.02, "b": 0.02})
    assert diagnose(evidence) == []
    stalled = Evidence(50, [layer("a", 0.1), layer("b", 0.1)], optimizer=ADAM, loss=3.45, history=history,
                       initial_weight_rms={"a": 0.02, "b": 0.02})
    assert causes(diagnose(stalled)) == [("divergence", "lr_too_high")]


def test_a_post_ln_transformer_diverging_on_adam_without_warm_up_is_told_to_warm_up():
    history = (StepRecord(0, 1.0, loss=3.4, lr=0.02),)
    evidence = Evidence(20, [layer("a", 0.2), layer("b", 0.2)], optimizer=OptimizerInfo("Adam", 0.02, True),
                        loss=3.4, history=history, initial_weight_rms={"a": 0.02, "b": 0.02}, post_norm=True)
    (found,) = diagnose(evidence)
    assert found.cause == "no_warmup" and "warmup_steps" in found.fix
    warming = Evidence(20, evidence.layers, optimizer=evidence.optimizer, loss=3.4, post_norm=True,
                       history=(StepRecord(0, 1.0, loss=3.4, lr=0.001),),
                       initial_weight_rms=evidence.initial_weight_rms)
    assert diagnose(warming)[0].cause == "lr_too_high"  # warm-up was there: the peak learning rate is too high


# --- non-finite values ----------------------------------------------------------------------------------------------


def test_an_output_made_non_finite_from_a_moderate_input_is_an_operation_not_an_overflow():
    stats = (ModuleStats("a", "Linear", 1.0), ModuleStats("b", "Linear", math.nan))
    (found,) = diagnose(Evidence(0, [layer("a"), layer("b")], stats, grad_norms={"a": math.nan, "b": math.nan}))
    assert (found.cause, found.fix) == ("bad_op", {"guard": True})
    assert "input (a, RMS 1)" in found.explanation
    grown = Evidence(9, [layer("a"), layer("b")], stats, grad_norms={"a": math.nan, "b": math.nan},
                     history=(StepRecord(5, 3e6),))
    assert diagnose(grown)[0].cause == "activation_overflow"  # after a spike: the values grew, no op to blame


def test_gradients_non_finite_behind_a_finite_forward_and_loss_blame_an_operation_in_the_loss():
    stats = (ModuleStats("a", "Linear", 1.0), ModuleStats("b", "Linear", 3.0))
    (found,) = diagnose(Evidence(0, [layer("a"), layer("b")], stats, grad_norms={"a": math.nan, "b": math.nan},
                                 loss=2.3))
    assert found.cause == "bad_op" and "log_softmax instead of log(softmax)" in found.suggestion


# --- init and recurrent weights ------------------------------------------------------------------------------------


def test_init_findings_quote_the_weights_at_the_start_not_the_current_ones():
    layers = [layer(str(i), rms=0.0105, activation="ReLU") for i in range(6)]
    stats = tuple(ModuleStats(str(i), "Linear", 10.0 ** -i) for i in range(6))
    (found,) = diagnose(Evidence(4, layers, stats, initial_weight_rms={str(i): 0.01 for i in range(6)}))
    assert found.cause == "init_too_small" and "initialised at RMS 0.01 " in found.explanation
    assert found.fix == {"init": "kaiming_normal(nonlinearity='relu')"}


def test_saturated_tanh_units_behind_too_large_weights_blame_the_init_not_the_activation():
    tanh = [LayerInfo(str(i), "Linear", 64, 1.0, "Tanh", 5 / 3, False, False) for i in range(4)]
    stats = tuple(ModuleStats(f"t{i}", "Tanh", 1.0, 0.1, saturated_fraction=0.9, slope=0.05) for i in range(4))
    (found,) = diagnose(Evidence(0, tanh, stats, initial_weight_rms={str(i): 1.0 for i in range(4)}))
    assert (found.condition, found.cause) == ("saturation", "init_too_large")
    assert "passes back almost no gradient" not in found.explanation
    assert found.fix == {"init": "xavier_normal(gain=1.667)"}


def test_recurrent_weights_with_a_gain_above_two_make_the_gradient_grow_through_time():
    big = RecurrentInfo("rnn", "RNN", 64, 0.5)  # gain 4
    (found,) = diagnose(Evidence(0, [], recurrent=(big,)))
    assert (found.cause, found.fix) == ("init_too_large", {"init_recurrent": "orthogonal"})
    assert diagnose(Evidence(0, [], recurrent=(RecurrentInfo("rnn", "RNN", 64, 0.125),))) == []  # orthogonal


# --- the verdict ---------------------------------------------------------------------------------------------------


def test_the_verdict_is_the_root_and_what_it_explains_are_its_consequences():
    diagnosis = Diagnosis()
    diagnosis.observe(0, [finding(0, "dead_relu", "dead_units"), finding(0, "init_too_small")])
    diagnosis.observe(10, [finding(10, "lr_too_low", "update_ratio_low")])
    verdict = diagnosis.verdict
    assert verdict.cause == "init_too_small" and verdict.finding.step == 0
    assert list(verdict.consequences) == ["dead_relu", "lr_too_low"]
    assert verdict.line().startswith("likely cause (found at step 0 from the signal measured through the layers): "
                                     "init scale too small: ")
    assert "its consequences: dead ReLUs (step 0), learning rate too low (step 10)" in verdict.line()


def test_the_verdict_holds_against_a_contradicting_finding_and_falls_to_stronger_evidence():
    diagnosis = Diagnosis()
    diagnosis.observe(1, [finding(1, "lr_too_high", "update_ratio_high", basis="weights")])
    diagnosis.observe(10, [finding(10, "lr_too_low", "update_ratio_low")])
    assert diagnosis.verdict.cause == "lr_too_high" and not diagnosis.others
    diagnosis.observe(12, [finding(12, "bad_op", "nonfinite", basis="values")])
    assert diagnosis.verdict.cause == "bad_op" and diagnosis.replaced[0].cause == "lr_too_high"


def test_a_cause_not_found_gives_way_to_a_cause_and_a_cleared_verdict_to_a_new_root():
    diagnosis = Diagnosis()
    diagnosis.observe(0, [finding(0, "unknown")])
    diagnosis.observe(5, [finding(5, "saturating_activation", "backward_decay")])
    assert diagnosis.verdict.cause == "saturating_activation"
    diagnosis.observe(10, [])
    assert diagnosis.verdict.cleared == 10
    diagnosis.observe(20, [finding(20, "lr_too_low", "update_ratio_low")])
    assert diagnosis.verdict.cause == "saturating_activation"  # lr_too_low is its consequence
    diagnosis.observe(30, [finding(30, "init_too_large", "forward_growth")])
    assert diagnosis.verdict.cause == "init_too_large" and diagnosis.verdict.finding.step == 30


def test_explain_gives_the_verdict_for_a_condition_it_explains_and_nothing_for_one_it_does_not():
    diagnosis = Diagnosis()
    diagnosis.observe(0, [finding(0, "init_too_small")])
    assert diagnosis.explain("vanishing").startswith("likely cause (found at step 0")
    assert diagnosis.explain("exploding") is None
    spike = Finding(3, "nonfinite", "gradient_spike", ("b",), "x", "y", basis="values")
    assert diagnosis.explain("nonfinite", [spike]).startswith("likely cause: gradient spike: x; try: y (from where")


def test_the_verdict_survives_a_checkpoint():
    diagnosis = Diagnosis()
    diagnosis.observe(0, [finding(0, "init_too_small"), finding(0, "dead_relu", "dead_units")])
    diagnosis.observe(4, [])
    restored = Diagnosis()
    restored.load_state_dict(diagnosis.state_dict())
    assert restored.verdict.line() == diagnosis.verdict.line() and restored.verdict.cleared == 4


def test_weights_grown_after_an_exploding_init_stay_the_inits_consequence():
    # A too-large init explodes at step 0; the update it makes grows the weights, which at step 1 reads as a too-high
    # learning rate: that is the init's consequence, not a cause that explains the init.
    diagnosis = Diagnosis()
    diagnosis.observe(0, [finding(0, "init_too_large", "forward_growth")])
    diagnosis.observe(1, [finding(1, "lr_too_high", "forward_growth")])
    assert diagnosis.verdict.cause == "init_too_large" and "lr_too_high" in diagnosis.verdict.consequences
