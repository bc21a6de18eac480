"""A few cases of the diagnosis benchmark (``python -m experiments.diagnosis_bench`` runs them all): healthy runs
get no finding and no warning; sick runs get the cause they were built with, found at the step it first shows, and
the fix their verdict proposes trains."""

from __future__ import annotations

import pytest

from experiments.diagnosis_bench import score
from experiments.diagnosis_zoo import CASES

BY_NAME = {case.name: case for case in CASES}

pytestmark = pytest.mark.slow  # trains the zoo's models, with and without their fix


@pytest.mark.parametrize("name", ["healthy/gpt", "healthy/mlp3_adam", "healthy/resnet_bn"])
def test_a_healthy_run_gets_no_finding_and_no_warning(name: str) -> None:
    outcome = score(BY_NAME[name])
    assert outcome.result.trained and outcome.clean, (outcome.result.findings, outcome.result.warnings)


@pytest.mark.parametrize(
    ("name", "step", "fix"),
    [
        ("lr_too_high/gpt_adamw", 5, "lr"),  # never at step 0: AdamW's first step moves every weight by lr
        ("saturating_activation/sigmoid_mlp", 0, "activation"),
        ("init_too_small/gelu_mlp", 0, "init"),
        ("bad_op/div_norm", 0, "guard"),
    ],
)
def test_a_sick_run_gets_its_cause_at_the_step_it_shows_and_its_fix_trains(name: str, step: int, fix: str) -> None:
    outcome = score(BY_NAME[name])
    assert not outcome.result.trained  # the case is sick
    assert outcome.verdict.cause == BY_NAME[name].expected and outcome.verdict.finding.step == step
    assert fix in outcome.verdict.finding.fix
    assert outcome.fixed is not None and outcome.fixed.trained and not outcome.fixed.warnings
    assert outcome.passed


def test_every_case_has_a_healthy_twin_and_the_zoo_spans_the_models_and_optimizers() -> None:
    healthy = {c.name for c in CASES if c.expected is None}
    assert all(c.twin in healthy for c in CASES if c.expected is not None)
    assert len(CASES) >= 30
    configs = [c.config for c in CASES]
    assert {"mlp", "conv", "resnet", "gpt", "mha_gpt", "lstm", "gru", "rnn"} <= {c.model for c in configs}
    assert {"relu", "gelu", "silu", "tanh", "sigmoid"} <= {c.activation for c in configs if c.model == "mlp"}
    assert {"sgd", "sgd_momentum", "adam", "adamw"} <= {c.optimizer for c in configs}
    assert {"32-true", "bf16-mixed"} <= {c.precision for c in configs}
    assert any(c.post_ln for c in configs) and any(c.tied for c in configs)
    assert {None, "layernorm", "batchnorm"} <= {c.norm for c in configs if c.model == "mlp"}


@pytest.mark.slow
def test_the_whole_zoo_meets_the_targets() -> None:
    from experiments.diagnosis_bench import met, summary

    scores = [score(case) for case in CASES]
    assert all(s.valid for s in scores), [s.case.name for s in scores if not s.valid]
    values = summary(scores)
    assert met(values), (values, [s.case.name for s in scores if not s.passed])
