"""gradmon's warnings read well under Python's own formatting, which importing gradmon leaves alone."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
from helpers import MLP, PlantNaN, fit

from gradmon import GradHealthMonitor, GradientHealthWarning
from gradmon.errors import warn_health

IMPORTS = """
import warnings
before = warnings.formatwarning
import gradmon, gradmon.errors, gradmon.health, gradmon.norms, gradmon.numerical
assert warnings.formatwarning is before, "import gradmon replaced warnings.formatwarning"
"""


@pytest.mark.slow  # a fresh interpreter
def test_importing_gradmon_leaves_the_process_wide_warning_formatter_alone() -> None:
    done = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # The callbacks, with Lightning, leave it too: it is Python's own, or the one Lightning installs
    # when it is imported, never one of gradmon's.
    for callback in ("activation_monitor", "grad_check", "grad_health", "grad_norm", "weight_init"):
        importlib.import_module(f"gradmon.callbacks.{callback}")
    assert warnings.formatwarning.__module__ in ("warnings", "lightning.fabric.utilities.warnings")


def test_a_health_warning_names_the_users_line_under_the_default_formatter() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        warn_health("gradmon: step 3: test")
    (w,) = record
    assert (w.category, w.filename, w.lineno) == (GradientHealthWarning, __file__, line)
    shown = warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
    assert shown.startswith(f"{__file__}:{line}: GradientHealthWarning: gradmon: step 3: test\n")
    assert 'warn_health("gradmon: step 3: test")' in shown  # the line itself, as Python shows it


def test_a_warning_raised_inside_the_training_loop_points_at_the_fit_call(tmp_path) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(MLP(depth=2), [GradHealthMonitor(on_nonfinite="warn"), PlantNaN(1)], steps=3, tmp_path=tmp_path)
    health = [w for w in record if issubclass(w.category, GradientHealthWarning)]
    assert health and "non-finite" in str(health[0].message)
    assert all(w.filename.endswith("helpers.py") for w in health)  # the t.fit(...) line of tests/helpers.py
    shown = warnings.formatwarning(health[0].message, health[0].category, health[0].filename, health[0].lineno)
    assert ": GradientHealthWarning: gradmon: " in shown and "t.fit(model, loader" in shown
