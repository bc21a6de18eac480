"""The core never imports Lightning: each module of it, imported alone in a fresh interpreter, leaves no module of
Lightning's packages (``lightning``, ``pytorch_lightning``, ``lightning_fabric``) in ``sys.modules``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
CORE = [
    "gradmon",
    "gradmon.norms",
    "gradmon.layout",
    "gradmon.health",
    "gradmon.init",
    "gradmon.numerical",
    "gradmon.activations",
    "gradmon.diagnosis",
    "gradmon.tensorboard",
    "gradmon.tags",
    "gradmon.naming",
    "gradmon.report",
    "gradmon.cli",
]
IMPORT = f"""
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in {LIGHTNING!r})))
"""


@pytest.fixture(scope="module")
def imports() -> Iterator[dict[str, subprocess.Popen]]:
    """One fresh interpreter per core module, all started at once (each spends seconds importing torch)."""
    started = {
        module: subprocess.Popen([sys.executable, "-c", IMPORT, module], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        for module in CORE
    }
    yield started
    for proc in started.values():
        proc.kill()
        proc.wait()


@pytest.mark.slow  # a fresh interpreter per module, each importing torch
@pytest.mark.parametrize("module", CORE)
def test_importing_a_core_module_imports_no_lightning(imports: dict[str, subprocess.Popen], module: str) -> None:
    out, err = imports[module].communicate(timeout=300)
    assert imports[module].returncode == 0, err[-2000:]
    assert json.loads(out) == []
