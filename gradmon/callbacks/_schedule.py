""""Every n steps", with one meaning in every callback: **optimizer steps, counted per optimizer**.

Step k of an optimizer is its k-th ``optimizer.step()`` of the fit, counted from 0; with one optimizer it is
``trainer.global_step`` at that step. :class:`Every` is the interval, checked once where the callback is made;
:class:`OptimizerSteps` counts the steps. A callback that looks at one optimizer's step (GradNormMonitor,
GradHealthMonitor) counts that optimizer's steps; one that looks at a whole batch (ActivationMonitor, GradCheck)
counts the steps of the Trainer's first optimizer.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch

from gradmon._validation import MAX_INT, check_int, invalid

#: What ``None`` means for an interval: the Trainer's ``log_every_n_steps`` (resolved at fit start), never, or
#: nothing (``None`` is refused).
NoneMeans = Literal["trainer", "never", "refused"]

_ACCEPTED = {
    "trainer": " or None for the Trainer's log_every_n_steps",
    "never": " or None for never",
    "refused": "",
}


class Every:
    """An interval of ``n`` optimizer steps: due at an optimizer's steps 0, n, 2n, ...

    Args:
        name: the argument it came from, named in the error.
        n: the interval: an integer in [1, 2**53], or ``None`` (see ``none``).
        none: what ``None`` means: ``"trainer"``, the Trainer's ``log_every_n_steps`` (read at :meth:`start`);
            ``"never"``, never due; ``"refused"``, not accepted.

    Raises:
        ValueError: naming the argument, the value and what is accepted, for anything else.
    """

    def __init__(self, name: str, n: Any, *, none: NoneMeans = "trainer") -> None:
        self.name = name
        self.none = none
        try:
            self.n = check_int(name, n, 1, allow_none=none != "refused")
        except ValueError:
            raise invalid(name, n, f"an integer in [1, {MAX_INT}] (optimizer steps){_ACCEPTED[none]}") from None
        self.every = self.n

    def start(self, trainer: pl.Trainer) -> None:
        """Called at fit start: ``None`` meaning "the Trainer's" becomes the Trainer's ``log_every_n_steps``."""
        self.every = trainer.log_every_n_steps if self.n is None and self.none == "trainer" else self.n

    def due(self, count: int) -> bool:
        """Whether an optimizer's step ``count`` (from 0) is due."""
        if self.every is None:
            if self.none == "trainer":
                raise RuntimeError(f"`{self.name}=None` means the Trainer's: call start(trainer) first.")
            return False
        return count % self.every == 0

    def __repr__(self) -> str:
        return f"Every({self.name}={self.n!r})"


class OptimizerSteps:
    """Counts each optimizer's own steps (optimizer index -> steps taken), for :class:`Every`.

    With several optimizers (a GAN under manual optimization) ``trainer.global_step`` advances once per optimizer
    step, so the generator may only ever step at even global steps: an interval counted on ``global_step`` would
    never see the discriminator. Each optimizer's count is kept here (and in the callback's checkpoint). With one
    optimizer the count is ``trainer.global_step`` itself, which a resumed run restores.
    """

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self._sole: int | None = None  # id() of the fit's only optimizer, once seen (not a reference: no leak)

    def reset(self) -> None:
        self.counts = {}
        self._sole = None

    def advance(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, step: int = -1) -> tuple[int, int]:
        """``(index of optimizer in trainer.optimizers, its step count before this step)``; counts this step. Call
        once per optimizer step. ``step`` is ``trainer.global_step``, which the caller has already read (it is not
        free); a caller that only counts leaves it out and gets -1 as the sole optimizer's count. The fit's only
        optimizer is remembered, so its steps do not read ``trainer.optimizers``; a second optimizer added during the
        fit is noticed at its first step."""
        if id(optimizer) == self._sole:  # the usual case: the fit's only optimizer, seen before
            return 0, step
        optimizers = trainer.optimizers
        if len(optimizers) <= 1:
            self._sole = id(optimizer) if optimizers and optimizers[0] is optimizer else None
            return 0, step
        self._sole = None
        index = next((i for i, o in enumerate(optimizers) if o is optimizer), 0)
        count = self.counts.get(index, 0)
        self.counts[index] = count + 1
        return index, count

    def upcoming(self, trainer: pl.Trainer) -> int:
        """The count the Trainer's first optimizer's next step will have (its steps taken so far): for a callback
        that decides at the start of a batch."""
        if self._sole is not None or len(trainer.optimizers) <= 1:
            return trainer.global_step
        return self.counts.get(0, 0)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): n for i, n in self.counts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {int(i): int(n) for i, n in state.items()}
