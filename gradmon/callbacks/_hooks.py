"""Per-batch hooks a gradmon callback does not use, kept out of Lightning's dispatch.

Lightning calls every callback's hook of a given name at each point of a batch (``_call_callback_hooks``), and it
skips a hook only when the attribute is not callable; for each one it calls, it enters a profiler context and formats
the action's name. On the 20x64 benchmark step that costs about 7 us a hook per callback, 30 us a step for a callback
that uses none of ``on_train_batch_start``, ``on_before_backward``, ``on_after_backward``, ``on_before_zero_grad``,
whether or not a profiler is set (measured side by side: two ``Callback()`` 132 to 175 us a step in those four hooks,
two with them skipped 64 to 95, no callback 65 to 131). :func:`skip_unused_per_batch_hooks` makes each per-batch hook
a class does not define read as ``None`` on its instances, so Lightning skips it.

A subclass that defines one of those hooks gets it called as usual, and ``super().<hook>(...)`` inside it reaches
Lightning's no-op, as it would without this. On the class itself the attribute is still Lightning's no-op function.
"""

from __future__ import annotations

from typing import Any, TypeVar

from lightning.pytorch.callbacks import Callback

#: Hooks Lightning calls once or more per batch, all through ``_call_callback_hooks`` (which skips what is not
#: callable). ``on_save_checkpoint`` and ``on_load_checkpoint`` are called directly, so they are never skipped.
PER_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
)

C = TypeVar("C", bound=type[Callback])


class _UnusedHook:
    """A per-batch hook of ``owner`` that it does not define: ``None`` on its instances (and on instances of subclasses
    that do not define it either), Lightning's no-op where a subclass's own hook reaches it through ``super()``."""

    def __init__(self, owner: type[Callback], name: str) -> None:
        self.owner = owner
        self.name = name
        self.noop = getattr(Callback, name)
        self._skipped: dict[type, bool] = {}  # per instance type: whether the hook is skipped

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self.noop
        cls = type(instance)
        skipped = self._skipped.get(cls)
        if skipped is None:
            # Attribute lookup reaches this descriptor from an instance only when no class before ``owner`` in the
            # MRO defines the hook; a class that does define it reaches it only through super().
            mro = cls.__mro__
            before = mro[: mro.index(self.owner)] if self.owner in mro else mro
            skipped = self._skipped[cls] = not any(self.name in vars(c) for c in before)
        return None if skipped else self.noop.__get__(instance, cls)


def skip_unused_per_batch_hooks(cls: C) -> C:
    """Class decorator: each of :data:`PER_BATCH_HOOKS` that ``cls`` does not define (itself or through a base other
    than ``Callback``) is skipped by Lightning on its instances."""
    for name in PER_BATCH_HOOKS:
        if getattr(cls, name) is getattr(Callback, name):
            setattr(cls, name, _UnusedHook(cls, name))
    return cls
