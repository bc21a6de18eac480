"""The main job (``make demo``): run the experiments, then write figures and a summary of every run::

    python -m experiments.demo [--logdir runs]

1. sigmoid saturation and 2. the matrix product (computed, not trained); 3. vanishing through depth (sigmoid, tanh,
relu), 4. initialisation (N(0, 0.01), N(0, 1), Xavier, Kaiming, PyTorch's default), 5. exploding (stopped by
GradHealthMonitor) and 6. the gradient check (buggy, fixed), each variant a TensorBoard run at
``<logdir>/<experiment>/<variant>``; then ``gradmon report`` over all of them into ``<logdir>/report``.

The training runs are every config in ``configs/`` but the base (:func:`experiments.configs.variants`), in the order
their ``demo.order`` gives (the walkthrough's), then any without one by file name: a new variant is one YAML file.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

import gradmon
from experiments import lightning_quiet, matrix_product, sigmoid
from experiments.cli import THREADS, fit_config
from experiments.configs import variants
from gradmon import GradCheck, GradHealthMonitor, GradientHealthWarning
from gradmon.diagnosis import CAUSES
from gradmon.report import write_report

#: The training runs: every variant config, in the order the demo runs them.
VARIANTS = tuple(variants())
#: Their configs' names (``configs/<name>.yaml``).
CONFIGS = tuple(v.name for v in VARIANTS)
#: Every experiment the demo runs, as named by its runs' directory ``<logdir>/<experiment>``.
EXPERIMENTS = (sigmoid.EXPERIMENT, matrix_product.EXPERIMENT, *dict.fromkeys(v.experiment for v in VARIANTS))


def train(config: str, logdir: Path, *overrides: str) -> str:
    """Run one config (with LightningCLI ``overrides``); return its line: name, steps, accuracy, seconds, and what
    gradmon flagged."""
    start = time.perf_counter()
    trainer = fit_config(config, logdir, *overrides).trainer
    val_acc = trainer.callback_metrics.get("val/acc")
    accuracy = f"val acc {float(val_acc):.2f}" if val_acc is not None else "no validation"
    name = f"{trainer.logger.name}/{trainer.logger.version}"
    seconds = time.perf_counter() - start
    return f"  {name:<24} {trainer.global_step:>4} steps  {accuracy}  {seconds:4.1f} s  {flagged(trainer)}"


def flagged(trainer) -> str:
    """What gradmon's callbacks found in a run, in a few words: the conditions GradHealthMonitor flagged, the
    gradient check's verdict, and the diagnosis's verdict (the root cause, the step it was found at, and what
    followed from it)."""
    found = []
    for callback in trainer.callbacks:
        if isinstance(callback, GradHealthMonitor):
            for condition, steps in callback.flagged_steps.items():
                noun = "step" if steps == 1 else "steps"
                found.append(f"{condition} at {steps} {noun} from step {callback.first_flagged_steps[condition]}")
            if trainer.should_stop and callback.flagged_steps:
                found.append("stopped")
        elif isinstance(callback, GradCheck):
            failed = sorted({r.layer for r in callback.results if not r.passed})
            found.append(f"gradcheck failed in {', '.join(failed)}" if failed else "gradcheck passed")
    verdict = gradmon.verdict(trainer)
    if verdict is not None:
        then = [CAUSES[c] if c != "unknown" else f.condition.replace("_", " ") for c, f in verdict.consequences.items()]
        found.append(f"diagnosis: {CAUSES[verdict.cause]} (step {verdict.finding.step})"
                     + (f", then {', '.join(then)}" if then else ""))
    return "; ".join(found) or "nothing flagged"


class quiet:
    """Keep a run to its one line: Lightning's start-up notes, WeightInit's tables, the health summaries and the
    warnings the lines already report (all still in the logs and on the callbacks) are not printed."""

    def __enter__(self) -> None:
        self._lightning = lightning_quiet(logging.WARNING)
        self._lightning.__enter__()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", GradientHealthWarning)
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        # The configs go to LightningCLI as `args`; the demo's own options are not for it.
        warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended to run from within Python.*")

    def __exit__(self, *exc: object) -> None:
        self._warnings.__exit__(*exc)
        self._lightning.__exit__(*exc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", type=Path, default=Path("runs"), help="TensorBoard log root (default: runs)")
    logdir = parser.parse_args(argv).logdir
    torch.set_num_threads(THREADS)

    start = time.perf_counter()
    # A rerun would add a second event file to each run directory, and TensorBoard would draw both as one run.
    for experiment in EXPERIMENTS:
        shutil.rmtree(logdir / experiment, ignore_errors=True)
    print(f"Running the experiments into {logdir}/ (earlier runs of them cleared):", flush=True)
    print(f"  {sigmoid.run(logdir)}", flush=True)
    print(f"  {matrix_product.run(logdir)}", flush=True)
    with quiet():
        for config in CONFIGS:
            print(train(config, logdir), flush=True)
    report = logdir / "report"
    written = write_report(logdir, report)

    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    print(f"  TensorBoard runs:  {logdir}/<experiment>/<variant> ({', '.join(EXPERIMENTS)})")
    print(
        f"  Figures:           {logdir / sigmoid.EXPERIMENT / 'sigmoid.png'}, "
        f"{logdir / matrix_product.EXPERIMENT / 'matrix_product.png'}, and {len(written) - 1} under {report}/"
    )
    print(f"  Summary:           {report / 'summary.md'}")
    tensorboard = Path(sys.executable).parent / "tensorboard"
    print(f"  Open TensorBoard:  {tensorboard if tensorboard.exists() else 'tensorboard'} --logdir {logdir}")


if __name__ == "__main__":
    main()
