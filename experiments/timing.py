"""What the benchmarks share: the timed model, the warm-up, and the clocks that time whole steps and the time spent
inside given callbacks' hooks (:mod:`experiments.benchmark` and :mod:`experiments.profile_hooks` both use them)."""

from __future__ import annotations

import statistics
import time

import lightning.pytorch as pl
import torch
from torch import nn

from experiments.benchmark_gradcheck import IN_FEATURES, NUM_CLASSES
from experiments.models import kaiming_mlp

__all__ = ["BATCH", "IN_FEATURES", "NUM_CLASSES", "WARMUP_STEPS", "BenchMLP", "HookClock", "StepTimer", "step_median"]

#: Steps left out of every timing: Trainer start-up and the first steps' allocations.
WARMUP_STEPS = 20
BATCH = 128


class BenchMLP(pl.LightningModule):
    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.net = kaiming_mlp(IN_FEATURES, NUM_CLASSES, depth, width)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class StepTimer(pl.Callback):
    """The time from the first step after the warm-up (``warmup`` steps) to the last, and each step's own duration."""

    def __init__(self, warmup: int = WARMUP_STEPS) -> None:
        self.warmup = warmup
        self.start = self.end = self.batch_start = 0.0
        self.steps: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the timer's own sync, outside gradmon's hooks
        self.end = time.perf_counter()
        self.steps[trainer.global_step - 1] = self.end - self.batch_start

    def median_ms(self, logging: bool) -> float:
        """Median duration of the steps after the warm-up that log (every 50th), or of the others (the step after a
        logging step excluded too: it reads what the logging step sent)."""
        return 1e3 * step_median(self.steps, logging)


def step_median(per_step: dict[int, float], logging: bool) -> float:
    """Median of ``{step: seconds}`` over the steps after the warm-up that log (every 50th), or over the others (the
    step after a logging step excluded too: it reads what the logging step sent); 0.0 when there are none."""
    chosen = [t for s, t in per_step.items() if s >= WARMUP_STEPS and ((s % 50 == 0) if logging else s % 50 > 1)]
    return statistics.median(chosen) if chosen else 0.0


#: gradmon's hooks that run during training steps (the ones timed from the inside).
TIMED_HOOKS = ("on_before_optimizer_step", "on_train_batch_end", "on_train_batch_start")


class HookClock:
    """Time spent inside the given callbacks' own hooks, per step after the warm-up: a far steadier measure of
    gradmon's cost than the difference of two end-to-end step times, which vary between runs by more than gradmon
    costs."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.counting = False
        #: Seconds per step (``trainer.global_step`` when the hook was called), after the warm-up.
        self.per_step: dict[int, float] = {}

    def median_us(self, logging: bool) -> float:
        """Median time per step inside the hooks, over the steps that log or over the others (:func:`step_median`)."""
        return 1e6 * step_median(self.per_step, logging)

    def split_us(self) -> tuple[float, float]:
        """``(median, logging)``: the median in-hook time of a step that does not log, and what the logging steps
        (every 50th, and the step after each, which reads what it sent) add beyond that median, per step of the run.
        The in-hook mean per step is these two plus the spread of the other steps about their median."""
        median = self.median_us(False)
        measured = [s for s in self.per_step if s >= WARMUP_STEPS]
        logging = sum(1e6 * self.per_step[s] - median for s in measured if s % 50 <= 1)
        return median, logging / len(measured) if measured else 0.0

    def wrap(self, callback: pl.Callback) -> pl.Callback:
        for name in TIMED_HOOKS:
            if getattr(type(callback), name) is getattr(pl.Callback, name):
                continue
            hook = getattr(callback, name)

            def timed(trainer, *args, _hook=hook, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _hook(trainer, *args, **kwargs)
                finally:
                    elapsed = time.perf_counter() - start  # before reading the step: that read is not ours
                    step = trainer.global_step
                    if step >= WARMUP_STEPS:
                        self.seconds += elapsed
                        # on_train_batch_end runs after the step counter moved on: count it to its own step
                        owner = step - 1 if _name == "on_train_batch_end" else step
                        self.per_step[owner] = self.per_step.get(owner, 0.0) + elapsed

            setattr(callback, name, timed)
        return callback
