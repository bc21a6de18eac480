"""GradCheck: the directional gradient check of :mod:`gradmon.numerical`, run on a Trainer's own training step."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from functools import cached_property
from typing import Any, Literal

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer

from gradmon import tags
from gradmon._validation import MAX_SEED, check_bool, check_choice, check_float, check_int, check_seed, invalid
from gradmon.callbacks import _ranks
from gradmon.callbacks._logging import log_scalars
from gradmon.callbacks._schedule import Every, OptimizerSteps
from gradmon.errors import GradientHealthError, warn_health
from gradmon.numerical import (
    LayerCheck,
    apply_to_tensors,
    batch_statistics_layers,
    check_gradients,
    check_thresholds,
    max_retries,
)

OnFailure = Literal["warn", "stop", "raise"]
#: The ``eps`` GradCheck takes. The central difference's rounding error is about ``1e-16 * |loss| / eps`` (float64),
#: its truncation error ``eps**2`` times the third derivative: below ``1e-10`` the rounding floor is within a factor
#: of 100 of the default ``fail_above`` and a wrong gradient can pass; above 1 the step is no longer local.
EPS_RANGE = (1e-10, 1.0)
#: Layer checks kept in :attr:`GradCheck.results` (and in checkpoints): the latest ones, and always every layer of the
#: latest check. The counts of checks and failures are kept whole.
RESULTS_KEPT = 100


class GradCheck(Callback):
    """Check, during training, that every layer's gradient is the derivative of the loss.

    When: at the start of a training batch (``on_train_batch_start``), before ``training_step``, so the weights
    checked are the ones this step differentiates. It runs when the optimizer steps taken so far (of the Trainer's
    first optimizer; under the automatic optimization GradCheck needs there is only one, and this is
    ``trainer.global_step``) are a positive multiple of ``every_n_steps`` and, with ``check_at_start``, once more on
    the first batch with ``global_step >= burn_in_steps``. Under gradient accumulation only the first micro-batch of
    a step is checked.

    What: the first ``num_samples`` examples of the batch (every tensor in it sliced along dim 0) go through the
    module's own ``training_step`` on a float64 copy of the module, and
    :func:`gradmon.numerical.check_gradients` compares, per layer and along ``num_directions`` random directions, the
    autograd directional derivative with a central difference. ``self.log`` calls made by ``training_step`` during the
    check are discarded. The run itself is untouched: weights, gradients, buffers (BatchNorm statistics), train/eval
    modes and the CPU and CUDA random states are the same after the check as before, so a run ends with bit-identical
    weights with or without this callback. Dropout is off in the copy; BatchNorm in train mode uses the statistics of
    the sliced batch, so ``num_samples=1`` on a model with such a BatchNorm layer is refused at ``setup`` with a
    ``ValueError`` naming ``num_samples`` and the layer. A module compiled with ``torch.compile`` (passed compiled to
    ``trainer.fit``, or with compiled submodules) is checked as its uncompiled Python code: the float64 copy runs
    eagerly, while the run itself keeps its compiled code. Layers are named as the user named them: wrapper pieces
    such as ``_orig_mod.`` are dropped (``net.0``, not ``net._orig_mod.0``).

    Logged at ``trainer.global_step``, on rank 0:

    - ``gradcheck/rel_error/<layer>``: the layer's worst relative error ``|a - n| / max(|a|, |n|)`` at this check;
    - ``gradcheck/max_rel_error``: the worst over all layers.

    A layer fails above ``fail_above``; below ``good_below`` its gradient is good, in between acceptable (it passes).
    On a failure, ``on_failure`` decides: ``"warn"`` issues a :class:`~gradmon.errors.GradientHealthWarning`,
    ``"stop"`` warns and sets ``trainer.should_stop``, ``"raise"`` raises
    :class:`~gradmon.errors.GradientHealthError`; each names the step, the layers and their errors. Under DDP each rank
    checks its own copy without collectives and the decision is shared, so every rank stops or raises together.
    Every layer at every check is appended to :attr:`results`, as a :class:`~gradmon.numerical.LayerCheck` whose
    ``step`` is the check's ``trainer.global_step``; only the latest :data:`RESULTS_KEPT` (100) are kept, and every
    layer of the latest check, so memory and checkpoints stay bounded however long the run. :attr:`checks` counts
    the checks made and :attr:`failures` how many each layer failed, over the whole run (resumes included).

    A new ``fit`` (``setup`` with ``stage="fit"``) starts afresh: :attr:`results` is emptied and the schedule starts
    over, so the same instance reused for a new model checks it like a new instance would. Resuming with
    ``trainer.fit(..., ckpt_path=...)`` restores both from the checkpoint (Lightning loads callback state after
    ``setup``), so the results go on from the saved ones and a step already checked is not checked again.

    Needs automatic optimization, and a ``training_step`` that returns the loss (a tensor or ``{"loss": ...}``).

    Example::

        trainer = Trainer(callbacks=[GradCheck(every_n_steps=1000, on_failure="raise")])

    Args:
        every_n_steps: check every this many optimizer steps (of the first optimizer), at its steps n, 2n, ...; an
            integer in [1, 2**53].
        num_samples: examples taken from the start of the batch.
        num_directions: random directions per layer.
        eps: step length of the central difference, along a unit direction, in float64: in ``[1e-10, 1]``
            (:data:`EPS_RANGE`). Below, the loss's rounding divided by the step swamps the difference: at ``1e-13`` a
            gradient 10 times too large passes, and at ``1e-20`` it is "good".
        fail_above: relative error above which a layer's gradient is wrong; in ``(0, 2)``, since a relative error
            never exceeds 2.
        good_below: relative error below which a layer's gradient is good; must be below ``fail_above``.
        check_at_start: also check once at the first batch with ``global_step >= burn_in_steps`` (``True`` or
            ``False``).
        burn_in_steps: optimizer steps before that first check (one lets lazy modules materialise).
        on_failure: ``"warn"``, ``"stop"`` or ``"raise"``.
        seed: seeds the directions, in ``[0, 2**64)``; the check at step ``s`` uses ``(seed + s) % 2**64``, so each
            check draws new ones.
        retries: how many times a failing direction is tried again, each with a new direction and a ten times
            smaller step (a kink such as ReLU's makes one direction look wrong), in ``[0, max_retries(eps)]``; a
            step too small to measure the layer's derivative settles nothing after a failure (see
            :func:`~gradmon.numerical.check_gradients`).

    Raises:
        ValueError: naming the argument, for a value out of its range (counts are integers up to ``2**53``;
            ``good_below`` must lie below ``fail_above``) or an unknown ``on_failure``; at ``setup``, naming the
            layer, for ``num_samples=1`` on a model with a BatchNorm layer in training mode.
        TypeError: for ``check_at_start`` other than ``True`` or ``False``.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 8,
        num_directions: int = 2,
        eps: float = 1e-6,
        fail_above: float = 1e-2,
        good_below: float = 1e-7,
        check_at_start: bool = True,
        burn_in_steps: int = 1,
        on_failure: OnFailure = "warn",
        seed: int = 0,
        retries: int = 2,
    ) -> None:
        self._every = Every("every_n_steps", every_n_steps, none="refused")
        self.every_n_steps: int = self._every.n
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.num_directions = check_int("num_directions", num_directions, 1)
        self.eps = check_float("eps", eps, minimum=EPS_RANGE[0], inclusive=True, maximum=EPS_RANGE[1])
        self.fail_above, self.good_below = check_thresholds(fail_above, good_below)
        self.check_at_start = check_bool("check_at_start", check_at_start)
        self.burn_in_steps = check_int("burn_in_steps", burn_in_steps, 0)
        self.on_failure = check_choice("on_failure", on_failure, ("warn", "stop", "raise"))
        self.seed = check_seed("seed", seed)
        self.retries = check_int("retries", retries, 0, maximum=max_retries(self.eps))
        self.results: list[LayerCheck] = []
        #: Checks made (one per checked step) and, per layer, how many of them it failed: whole, however many
        #: :attr:`results` are kept.
        self.checks = 0
        self.failures: Counter[str] = Counter()
        self._last_step: int | None = None  # the count of the last step checked
        self._steps = OptimizerSteps()

    @cached_property  # Lightning reads it around every hook call
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "GradCheck needs automatic optimization: under manual optimization `training_step` steps the "
                "optimizers itself, so it cannot be rerun as a function of the weights."
            )
        self._check_num_samples(pl_module)
        # A fit on a reused instance must not inherit the last one's schedule; a resume's checkpoint restores both
        # afterwards, since Lightning loads callback state after `setup`.
        self.results = []
        self.checks = 0
        self.failures = Counter()
        self._last_step = None
        self._steps.reset()
        _ranks.check_at_setup(trainer, self)

    def _ranks_signature(self) -> str:
        """What must be the same on every rank for the collectives to line up."""
        return (f"GradCheck(every_n_steps={self.every_n_steps}, check_at_start={self.check_at_start}, "
                f"burn_in_steps={self.burn_in_steps})")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        self._steps.advance(trainer, optimizer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        count = self._steps.upcoming(trainer)
        if not self._due(count):
            return
        self._check_num_samples(pl_module)  # a mode changed after `setup` (by a hook) is caught here
        self._last_step = count
        step = trainer.global_step
        samples = apply_to_tensors(batch, lambda t: t[: self.num_samples] if t.dim() > 0 else t)
        checks = check_gradients(
            pl_module,
            _training_step_loss(trainer, batch_idx),
            samples,
            num_directions=self.num_directions,
            eps=self.eps,
            fail_above=self.fail_above,
            good_below=self.good_below,
            retries=self.retries,
            seed=(self.seed + step) % (MAX_SEED + 1),
        )
        self.results += [replace(check, step=step) for check in checks]
        del self.results[: -max(RESULTS_KEPT, len(checks))]  # bounded memory and checkpoints, however long the run
        self.checks += 1
        self.failures.update(check.layer for check in checks if not check.passed)
        if trainer.is_global_zero and checks:
            scalars = {tags.tag(tags.GRADCHECK_REL_ERROR, check.layer): check.rel_error for check in checks}
            scalars[tags.GRADCHECK_MAX_REL_ERROR] = max(check.rel_error for check in checks)
            log_scalars(trainer, scalars, step=step)
        failures = [check for check in checks if not check.passed]
        if trainer.strategy.reduce_boolean_decision(bool(failures), all=False):
            self._act(trainer, step, failures)

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "results": [asdict(check) for check in self.results],
            "checks": self.checks,
            "failures": dict(self.failures),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]
        self.results = [self._restored(saved) for saved in state_dict["results"]]
        # Saved before the counts were kept: the results then held every check.
        self.checks = int(state_dict.get("checks", len({check.step for check in self.results})))
        self.failures = Counter(
            state_dict.get("failures", Counter(check.layer for check in self.results if not check.passed))
        )
        latest = sum(check.step == self._last_step for check in self.results)
        del self.results[: -max(RESULTS_KEPT, latest, 1)]

    def _restored(self, saved: dict[str, Any]) -> LayerCheck:
        if "status" in saved:
            return LayerCheck(**saved)
        # Saved before results were LayerChecks: only step, layer, rel_error and passed were kept.
        rel_error = saved["rel_error"]
        if not saved["passed"]:
            status = "wrong"
        else:
            status = "good" if rel_error < self.good_below else "acceptable"
        return LayerCheck(saved["layer"], rel_error, math.nan, math.nan, math.nan, status=status, step=saved["step"])

    def _check_num_samples(self, pl_module: LightningModule) -> None:
        if self.num_samples >= 2:
            return
        layers = batch_statistics_layers(pl_module)
        if layers:
            names = ", ".join(repr(name) for name in layers)
            culprits = f"layer {names} is" if len(layers) == 1 else f"layers {names} are"
            raise invalid(
                "num_samples",
                self.num_samples,
                f"at least 2, since BatchNorm in training mode needs >= 2 samples ({culprits} BatchNorm in "
                "training mode)",
            )

    def _due(self, count: int) -> bool:
        if count == self._last_step:  # the next micro-batch of a step under gradient accumulation, or a resumed step
            return False
        if self.check_at_start and self._last_step is None and count >= self.burn_in_steps:
            return True
        return count > 0 and self._every.due(count)

    def _act(self, trainer: Trainer, step: int, failures: list[LayerCheck]) -> None:
        if failures:
            layers = ", ".join(f"{check.layer!r} (relative error {check.rel_error:.3g})" for check in failures)
            noun = "layer" if len(failures) == 1 else "layers"
            message = f"GradCheck at step {step}: wrong gradient in {noun} {layers}; fail_above={self.fail_above:g}."
        else:
            message = f"GradCheck at step {step}: a layer failed the gradient check on another rank."
        if self.on_failure == "raise":
            raise GradientHealthError(message)
        if self.on_failure == "stop":
            trainer.should_stop = True
            message += " Stopping the run."
        warn_health(message)


def _training_step_loss(trainer: Trainer, batch_idx: int) -> Callable[[LightningModule, Any], Tensor]:
    """The loss of ``training_step`` on the checked copy of the module."""

    def loss(module: LightningModule, batch: Any) -> Tensor:
        _attach_without_logging(module, trainer)
        output = module.training_step(batch, batch_idx)
        if isinstance(output, Mapping):
            output = output.get("loss")
        if not isinstance(output, Tensor):
            raise ValueError(
                f"GradCheck needs `training_step` to return the loss, a tensor or a dict with a 'loss' tensor; "
                f"got {type(output).__name__}."
            )
        return output

    return loss


def _attach_without_logging(module: LightningModule, trainer: Trainer) -> None:
    """Give the copy the trainer (a step may read ``self.global_step`` and the like) but discard its ``self.log``
    calls, which would otherwise land in the run's metrics. Idempotent: the copy is made inside ``check_gradients``."""
    module.trainer = trainer
    for submodule in module.modules():
        if isinstance(submodule, LightningModule):
            submodule.log = submodule.log_dict = _discard


def _discard(*args: Any, **kwargs: Any) -> None:
    return None
