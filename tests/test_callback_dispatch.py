"""Per-batch hooks a gradmon callback does not use are skipped by Lightning (each one it calls costs a profiler
context and a formatted name), and that changes nothing a user can see: subclasses' own hooks run, ``super()`` in
them reaches Lightning's no-op, and the used hooks still run."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from helpers import MLP, fit, make_loader, trainer
from lightning.pytorch.profilers import SimpleProfiler

from gradmon import ActivationMonitor, GradCheck, GradHealthMonitor, GradNormMonitor, WeightInit
from gradmon.callbacks._hooks import PER_BATCH_HOOKS

TRAINING_STEP_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_before_zero_grad", "on_train_batch_end",
)
#: The per-batch hooks each callback defines (the others are skipped).
USED = {
    GradNormMonitor: {"on_before_optimizer_step", "on_train_batch_end"},
    GradHealthMonitor: {"on_before_optimizer_step"},
    ActivationMonitor: {"on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end"},
    GradCheck: {"on_train_batch_start"},
    WeightInit: set(),
}


class ValidatedMLP(MLP):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))


def called_hooks(profiler: SimpleProfiler, callback: pl.Callback) -> set[str]:
    """The hooks of ``callback`` that Lightning called, from the profiler's action names."""
    prefix = f"[Callback]{callback.state_key}."
    return {name[len(prefix):] for name in profiler.recorded_durations if name.startswith(prefix)}


def test_lightning_calls_only_the_per_batch_hooks_a_callback_uses(tmp_path: Path) -> None:
    callbacks = [
        GradNormMonitor(log_every_n_steps=2), GradHealthMonitor(), ActivationMonitor(log_every_n_steps=2),
        GradCheck(every_n_steps=3), WeightInit("xavier_uniform"),
    ]
    profiler = SimpleProfiler()
    steps = 4
    run = trainer(tmp_path, max_steps=steps, callbacks=callbacks, profiler=profiler, val_check_interval=2)
    run.fit(ValidatedMLP(), make_loader(16, steps), make_loader(16, 2, seed=1))
    assert any(name.endswith("on_validation_batch_end") for name in profiler.recorded_durations)  # validation ran
    for callback in callbacks:
        called = called_hooks(profiler, callback)
        used = USED[type(callback)]
        assert called & set(PER_BATCH_HOOKS) == used, type(callback).__name__
        assert "on_fit_start" in called or isinstance(callback, GradCheck)  # the other hooks are left as they were
        for hook in TRAINING_STEP_HOOKS:
            if hook not in used:  # None on the instance, Lightning's no-op on the class (for introspection)
                assert getattr(callback, hook) is None
                assert getattr(type(callback), hook) is getattr(pl.Callback, hook)
    # The used hooks ran every step: GradHealthMonitor judged each step.
    health = callbacks[1]
    assert health.tracker.state_dict()["seen"] == {f"net.{i}": steps for i in (0, 2, 4, 6)}


def test_a_subclass_hook_runs_and_its_super_call_reaches_lightnings_no_op(tmp_path: Path) -> None:
    class Counting(GradNormMonitor):
        def __init__(self) -> None:
            super().__init__(log_every_n_steps=1)
            self.after_backward = self.batch_start = 0

        def on_after_backward(self, trainer, pl_module) -> None:
            assert super().on_after_backward(trainer, pl_module) is None  # Lightning's no-op, not a TypeError
            self.after_backward += 1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            self.batch_start += 1

    class Deeper(Counting):  # the hook defined one class up still runs, and its super() still works
        pass

    for cls in (Counting, Deeper):
        callback = cls()
        fit(MLP(), [callback], steps=3, tmp_path=tmp_path / cls.__name__)
        assert (callback.after_backward, callback.batch_start) == (3, 3)
        assert callable(callback.on_after_backward)
    # Its siblings are still skipped, and a plain GradNormMonitor is unaffected.
    assert Counting().on_before_zero_grad is None and GradNormMonitor().on_after_backward is None


@pytest.mark.parametrize("hook", ["on_after_backward", "on_before_zero_grad"])
def test_a_hook_set_on_the_instance_is_called(tmp_path: Path, hook: str) -> None:
    callback = GradHealthMonitor()
    calls: list[int] = []
    setattr(callback, hook, lambda trainer, pl_module, *args: calls.append(trainer.global_step))
    fit(MLP(), [callback], steps=3, loader=make_loader(16, 3))
    assert len(calls) == 3
