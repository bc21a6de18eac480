"""The diagnosis zoo's cases behave as labelled: a sick run fails, its fix trains, and a healthy run trains."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from experiments.diagnosis_zoo import CASES, run

BY_NAME = {case.name: case for case in CASES}


def test_cases_are_well_formed():
    assert len(BY_NAME) == len(CASES) >= 30
    for case in CASES:
        assert (case.expected is None) == (case.twin is None) == (not case.fix), case.name
        if case.twin is not None:
            assert BY_NAME[case.twin].expected is None, case.name


@pytest.mark.parametrize("name", ["bad_op/div_norm", "init_too_small/relu_mlp"])
def test_sick_case_fails_and_its_fix_trains(name):
    case = BY_NAME[name]
    sick = run(case.config)
    fixed = run(replace(case.config, **case.fix))
    assert not sick.trained and sick.flagged and sick.warnings
    assert fixed.trained and not fixed.flagged and not fixed.warnings
    assert math.isfinite(fixed.last_loss) and fixed.last_loss < fixed.first_loss


def test_healthy_gpt_learns():
    result = run(BY_NAME["healthy/gpt"].config)
    assert result.trained and not result.flagged
    assert result.last_loss < 0.5 * result.first_loss
