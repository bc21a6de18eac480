"""What the ranks of a distributed run tell each other: the health events each found at a step, and, at setup, which
gradmon callbacks each has (a callback that makes collectives on some ranks only would hang the job)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from gradmon.health import CONDITIONS, HealthEvent

#: How long a rank waits at setup for every other rank to describe its gradmon callbacks. The ranks leave Lightning's
#: ``pre_setup`` barrier together; only ``LightningDataModule.setup`` runs between it and the callbacks' setup.
SETUP_CHECK_TIMEOUT_S = 60.0


def distributed(trainer: pl.Trainer) -> bool:
    """Whether the trainer runs on several ranks of an initialised process group."""
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


_HOST_GROUP: list[Any] = []  # [(default group, gloo group)]: one gloo group per default process group


def host_group() -> Any:
    """A process group whose collectives run on the host (gloo), for decisions that must not wait for a device:
    ``None`` (the default group) when the default backend is gloo, else a gloo group over the same ranks, created
    once (a collective: every rank must call this at the same point)."""
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if not _HOST_GROUP or _HOST_GROUP[0][0] is not world:
        _HOST_GROUP[:] = [(world, dist.new_group(backend="gloo"))]
    return _HOST_GROUP[0][1]


def share_events(events: list[HealthEvent], group: Any, device: torch.device) -> list[HealthEvent]:
    """Every rank's events of one step, on every rank: a collective that every rank must make at every step.

    One all-reduce of a few integers per rank (events per condition and a checksum of their layers); when the ranks
    found the same (the usual case: the norms are taken after DDP's all-reduce, so they are the same everywhere),
    ``events`` is returned as it is. Otherwise the events are gathered, and each one not found by every rank carries
    the rank that found it (:attr:`HealthEvent.rank`).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    counts = torch.zeros(world, len(CONDITIONS) + 1, dtype=torch.int64)
    for e in events:
        counts[rank, CONDITIONS.index(e.condition)] += 1
    counts[rank, -1] = zlib.crc32("|".join(f"{e.layer}:{e.condition}" for e in events).encode()) if events else 0
    counts = counts.to(device)
    dist.all_reduce(counts, group=group)
    rows = counts.tolist()
    if all(row == rows[0] for row in rows):
        return events
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, events, group=group)
    return merge_events(gathered)


def merge_events(per_rank: Sequence[Sequence[HealthEvent]]) -> list[HealthEvent]:
    """One list from every rank's events of a step: each (layer, condition) once, non-finite first, with the rank
    that found it when not every rank did."""
    keys = [{(e.layer, e.condition) for e in events} for events in per_rank]
    everywhere = set.intersection(*keys) if keys else set()
    merged: list[HealthEvent] = []
    seen: set[tuple[str, str]] = set()
    for r, events in enumerate(per_rank):
        for e in events:
            key = (e.layer, e.condition)
            if key not in seen:
                seen.add(key)
                merged.append(e if key in everywhere else replace(e, rank=r))
    merged.sort(key=lambda e: e.condition != "nonfinite")  # stable: each rank's order is kept
    return merged


_CHECKS = [0]  # setup checks made by this process, so that each check has its own keys in the store


def signature(callback: Any) -> str | None:
    """How a callback takes part in the ranks' collectives (its ``_ranks_signature()``), ``None`` for a callback
    that makes none."""
    method = getattr(callback, "_ranks_signature", None)
    return method() if callable(method) else None


def check_at_setup(trainer: pl.Trainer, callback: Any) -> None:
    """:func:`check_same_callbacks`, made by the first callback of the Trainer that makes collectives (once per
    setup, whichever of them calls first)."""
    first = next((cb for cb in trainer.callbacks if signature(cb) is not None), None)
    if first is callback:
        check_same_callbacks(trainer)


def check_same_callbacks(trainer: pl.Trainer) -> None:
    """Raise ``RuntimeError`` unless every rank has the same gradmon callbacks that make collectives (their
    :func:`signature`, in order), at setup: a callback that makes collectives on some ranks only would block the
    others in their next collective until the process group's timeout (30 minutes), without a word.

    Goes through the process group's key-value store, with :data:`SETUP_CHECK_TIMEOUT_S`, so that a rank without
    any gradmon callback (which never gets here) is reported rather than waited for. The first gradmon callback of
    the Trainer makes the check for all of them.
    """
    if not distributed(trainer):
        return
    ours = [s for s in map(signature, trainer.callbacks) if s is not None]
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a torch without the store API: nothing to check with
        return
    _CHECKS[0] += 1
    prefix = f"gradmon/setup/{_CHECKS[0]}/"
    rank, world = dist.get_rank(), dist.get_world_size()
    text = "; ".join(ours)
    store.set(prefix + str(rank), text)
    keys = [prefix + str(r) for r in range(world)]
    try:
        store.wait(keys, timedelta(seconds=SETUP_CHECK_TIMEOUT_S))
    except Exception:  # noqa: BLE001 - the store raises a timeout of its own kind
        missing = [r for r in range(world) if not store.check([prefix + str(r)])]
        raise RuntimeError(
            f"gradmon: rank {rank} has the callbacks [{text}], but rank(s) {', '.join(map(str, missing))} did not "
            f"reach gradmon's setup within {SETUP_CHECK_TIMEOUT_S:g} s: give every rank the same gradmon callbacks "
            "(a callback on some ranks only makes collectives the others never join, and the job hangs)."
        ) from None
    theirs = {r: store.get(prefix + str(r)).decode() for r in range(world)}
    if len(set(theirs.values())) > 1:
        listed = "; ".join(f"rank {r}: [{t}]" for r, t in theirs.items())
        raise RuntimeError(
            f"gradmon: the ranks have different gradmon callbacks ({listed}): give every rank the same callbacks "
            "with the same settings (their collectives must line up, or the job hangs)."
        )
