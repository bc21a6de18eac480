"""Reading TensorBoard event files into :class:`Run` objects, without a server.

A run is a directory holding event files. A directory holding several (a run resumed from a checkpoint, a rerun
logged into the same ``version``) is read file by file, oldest first, and merged by step: each file replaces what the
earlier ones logged from its own first step on (see :func:`load_run`). A file tensorboard's reader cannot read to its
end (truncated, corrupted) is read as far as it can be and listed in :attr:`Run.damaged`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.backend.event_processing import event_accumulator, event_file_loader

from gradmon import tags

EVENT_FILE_GLOB = "events.out.tfevents.*"

# Tag groups that mark a run as watched by gradmon, and so as a row of the summary.
_GRADMON_GROUPS = (tags.GRAD_NORM, tags.GRAD_HEALTH, tags.GRADCHECK, tags.ACTIVATION_RMS)
# Text summaries are written under "<tag>/text_summary".
_TEXT_SUFFIX = "/text_summary"
# Keep every scalar (0 = no limit) and none of the heavy summaries the report does not draw.
_SIZE_GUIDANCE = {
    event_accumulator.SCALARS: 0,
    event_accumulator.HISTOGRAMS: 1,
    event_accumulator.COMPRESSED_HISTOGRAMS: 1,
    event_accumulator.IMAGES: 1,
    event_accumulator.TENSORS: 0,  # text summaries (the diagnosis) are tensors: keep them all
    event_accumulator.AUDIO: 1,
}
_LOADER_LOGGER = "tensorboard"  # tensorboard's modules all log through this one

Texts = dict[str, list[tuple[int, str]]]


@dataclass
class Series:
    """One scalar tag of one run: its steps and values, in logged order."""

    steps: np.ndarray
    values: np.ndarray

    @property
    def last(self) -> float:
        return float(self.values[-1])


@dataclass
class Run:
    """The scalars of one run, by tag, in the order each tag was first logged.

    ``event_file`` is the file they were read from; ``ignored_event_files`` are the older event files of the same
    directory, which were not read.
    """

    name: str
    path: Path
    scalars: dict[str, Series]
    event_file: Path | None = None
    ignored_event_files: list[Path] = field(default_factory=list)
    #: Older event files of the directory whose steps before the next file's first step are part of the run (a run
    #: resumed from a checkpoint writes a second file into the same directory), oldest first.
    merged_event_files: list[Path] = field(default_factory=list)
    #: Event files that could not be read to their end: ``{file: (what tensorboard's reader said, last step read or
    #: None when nothing was)}``.
    damaged: dict[Path, tuple[str, int | None]] = field(default_factory=dict)
    #: ``diagnosis/<condition>`` text entries, as ``(step, markdown)`` in logged order, by tag.
    texts: Texts = field(default_factory=dict)

    def layers(self, prefix: str = f"{tags.GRAD_NORM}/") -> list[str]:
        """Layer names logged under ``prefix``, in first-logged order (``grad_norm/total`` and the per-optimizer
        ``grad_norm/total-<optimizer>`` are not layers)."""
        names = [tag[len(prefix) :] for tag in self.scalars if tag.startswith(prefix)]
        names = [name for name in names if not tags.is_total(name)]
        if prefix == f"{tags.GRAD_NORM}/" and self.forward_order:
            # Forward order where ActivationMonitor saw it; layers it did not observe keep their place after them.
            position = {module: i for i, module in enumerate(self.modules)}
            registered = {name: i for i, name in enumerate(names)}
            names.sort(key=lambda name: position.get(name, len(position) + registered[name]))
        return names

    @property
    def forward_order(self) -> bool:
        """Whether the layers can be put in forward order: ActivationMonitor logged the modules in the order the
        forward called them, and observed at least one layer."""
        observed = set(self.modules)
        return any(tag[len(tags.GRAD_NORM) + 1:] in observed for tag in self.scalars
                   if tag.startswith(f"{tags.GRAD_NORM}/"))

    @property
    def has_grad_norms(self) -> bool:
        return bool(self.layers())

    @property
    def modules(self) -> list[str]:
        """The modules ActivationMonitor observed (``activation_rms/<module>``), in forward order."""
        return self.layers(f"{tags.ACTIVATION_RMS}/")

    def diagnosis(self) -> Texts:
        """``{condition: [(step, markdown), ...]}`` from the ``diagnosis/<condition>`` texts, in logged order."""
        prefix = f"{tags.DIAGNOSIS}/"
        return {tag[len(prefix) :]: entries for tag, entries in self.texts.items()
                if tag.startswith(prefix) and tag != tags.tag(tags.DIAGNOSIS, tags.VERDICT)}

    def verdict(self) -> str | None:
        """The run's latest verdict (``diagnosis/verdict``, markdown), or ``None``."""
        entries = self.texts.get(tags.tag(tags.DIAGNOSIS, tags.VERDICT), [])
        return entries[-1][1] if entries else None


def find_runs(logdir: str | Path) -> list[Path]:
    """Every directory under ``logdir`` (itself included) that holds an event file.

    Args:
        logdir: The directory to search, e.g. the ``save_dir`` of a TensorBoardLogger.

    Returns:
        The run directories, sorted.

    Raises:
        FileNotFoundError: ``logdir`` does not exist or holds no event file.
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        what = "is a file, not a directory" if logdir.exists() else "does not exist"
        raise FileNotFoundError(f"log directory {str(logdir)!r} {what}")
    runs = sorted({p.parent for p in logdir.rglob(EVENT_FILE_GLOB) if p.is_file()})
    if not runs:
        raise FileNotFoundError(
            f"no TensorBoard event files ({EVENT_FILE_GLOB}) under {str(logdir)!r}; "
            "point at the save_dir of a TensorBoardLogger, e.g. `gradmon report runs`"
        )
    return runs


def event_files(run_dir: str | Path) -> list[Path]:
    """The event files directly in ``run_dir``, oldest first.

    Args:
        run_dir: A run directory.

    Returns:
        The files, by the wall time of each file's first event (written when its writer opened it), then by name.
        The last one is the run :func:`load_run` names as its ``event_file``.
    """
    files = [p for p in Path(run_dir).glob(EVENT_FILE_GLOB) if p.is_file()]
    return sorted(files, key=lambda p: (_opened_at(p), p.name))


def load_run(path: str | Path, logdir: str | Path | None = None) -> Run:
    """Read every scalar of the run in ``path``.

    A directory holding several event files (see :func:`event_files`) is read file by file, oldest first, and merged
    by step: each file replaces what the earlier ones logged from its own first step on. A run resumed from a
    checkpoint (its second file starts at the checkpoint's step) is thus read whole, the resumed steps winning over
    those the first run logged after its checkpoint; a rerun from step 0 replaces the earlier files entirely (they are
    listed in ``ignored_event_files``). A file tensorboard's reader cannot read to its end (truncated, corrupted) is
    read as far as it can be and listed in ``damaged``.

    Args:
        path: A run directory, or one event file.
        logdir: The log directory the run is named relative to; ``None`` names it by its directory's name.

    Returns:
        The run.

    Raises:
        FileNotFoundError: ``path`` is neither an event file nor a directory holding one.
    """
    path = Path(path)
    if path.is_file():
        run_dir, files = path.parent, [path]
    else:
        run_dir, files = path, event_files(path)
        if not files:
            raise FileNotFoundError(f"`path={str(path)!r}` holds no TensorBoard event file ({EVENT_FILE_GLOB})")
    merged = _Merge()
    for file in files:
        merged.add(file, *_read_event_file(file))
    scalars = {tag: series for tag, series in merged.scalars.items() if len(series.steps)}
    latest = files[-1]
    kept = [f for f, start in merged.sources.items() if start is not False and f != latest]
    ignored = [f for f in files[:-1] if f not in kept]
    name = run_dir.relative_to(logdir).as_posix() if logdir is not None else run_dir.name
    return Run(name if name != "." else run_dir.resolve().name, run_dir, _without_logger_prefix(scalars), latest,
               ignored, merged_event_files=kept, damaged=merged.damaged, texts=merged.texts)


def load_runs(logdir: str | Path) -> list[Run]:
    """Every run under ``logdir``.

    Args:
        logdir: The log directory (see :func:`find_runs`).

    Returns:
        The runs, each read by :func:`load_run`, sorted by directory.

    Raises:
        FileNotFoundError: ``logdir`` does not exist or holds no event file.
    """
    return [load_run(path, logdir) for path in find_runs(logdir)]


@dataclass
class _Merge:
    """The event files of one directory merged by step, oldest first (see :func:`load_run`)."""

    scalars: dict[str, Series] = field(default_factory=dict)
    texts: Texts = field(default_factory=dict)
    #: Each file read: its first step while any of its steps are still in the run, ``False`` once none are.
    sources: dict[Path, Any] = field(default_factory=dict)
    damaged: dict[Path, tuple[str, int | None]] = field(default_factory=dict)

    def add(self, file: Path, scalars: dict[str, Series], texts: Texts, damage: str | None) -> None:
        """Merge in the next file: what it logged replaces what the earlier files logged from its first step on."""
        steps = [int(step) for series in scalars.values() if len(series.steps)
                 for step in (series.steps.min(), series.steps.max())]
        steps += [step for entries in texts.values() for step, _ in entries]
        if damage is not None:
            self.damaged[file] = (damage, max(steps) if steps else None)
        if not steps:
            return
        start = min(steps)
        self._cut(start)
        for tag, series in scalars.items():
            old = self.scalars.get(tag)
            self.scalars[tag] = series if old is None else Series(
                np.concatenate([old.steps, series.steps]), np.concatenate([old.values, series.values])
            )
        for tag, entries in texts.items():
            self.texts[tag] = self.texts.get(tag, []) + entries
        self.sources[file] = start

    def _cut(self, start: int) -> None:
        """Drop what the files read so far logged from ``start`` on."""
        for tag, series in self.scalars.items():
            keep = series.steps < start
            self.scalars[tag] = Series(series.steps[keep], series.values[keep])
        self.texts = {tag: [(step, text) for step, text in entries if step < start]
                      for tag, entries in self.texts.items()}
        for earlier in self.sources:
            self.sources[earlier] = _holds_steps_before(earlier, start, self.sources[earlier])


def _holds_steps_before(file: Path, start: int, kept: Any) -> Any:
    """Whether an earlier file still has steps in the run once a later file starts at ``start``: its own first step
    (``kept``, an int) is before ``start``; ``False`` once it has none."""
    return kept if kept is not False and kept < start else False


class _DataLoss(logging.Handler):
    """Catches what tensorboard's event file loader says, at debug level only, when it stops before the end of a file
    (a truncated record, a failed crc32 check): the loader swallows the error and the accumulator reads on as if the
    file had ended."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._passed_on = logger.getEffectiveLevel()  # what the user's handlers would have seen
        self._parent = logger.parent

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "Truncated record in %s (%s)":
            self.messages.append(str(record.args[-1]) if isinstance(record.args, tuple) else record.getMessage())
        elif record.levelno >= self._passed_on and self._parent is not None:
            self._parent.handle(record)


def _read_event_file(file: Path) -> tuple[dict[str, Series], Texts, str | None]:
    """The scalars and diagnosis texts of one event file, and what stopped tensorboard's reader before the end of
    the file (``None`` when it read it all)."""
    # One file only: EventAccumulator given the directory would read every file in it as one run.
    accumulator = event_accumulator.EventAccumulator(str(file), size_guidance=_SIZE_GUIDANCE)
    damage = _reload(accumulator)
    scalars = {}
    for tag in accumulator.Tags()[event_accumulator.SCALARS]:
        events = accumulator.Scalars(tag)
        scalars[tag] = Series(
            np.array([e.step for e in events], dtype=np.int64), np.array([e.value for e in events], dtype=np.float64)
        )
    texts = {}
    for tag in accumulator.Tags()[event_accumulator.TENSORS]:
        if tag.startswith(f"{tags.DIAGNOSIS}/") and tag.endswith(_TEXT_SUFFIX):
            texts[tag[: -len(_TEXT_SUFFIX)]] = [
                (int(e.step), e.tensor_proto.string_val[0].decode("utf-8", "replace"))
                for e in accumulator.Tensors(tag)
            ]
    if damage is not None and file.name in damage:  # "<path> failed event crc32 check": the path is said elsewhere
        damage = damage.split(file.name, 1)[1].strip(" :'\"")
    return scalars, texts, damage


def _reload(accumulator: event_accumulator.EventAccumulator) -> str | None:
    """Read the accumulator's file; what stopped tensorboard's reader before its end, ``None`` when it read it all."""
    logger = logging.getLogger(_LOADER_LOGGER)
    catcher = _DataLoss(logger)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(catcher)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # the loader's debug lines are for us, not for the user's handlers
    try:
        accumulator.Reload()
    finally:
        logger.removeHandler(catcher)
        logger.setLevel(level)
        logger.propagate = propagate
    return catcher.messages[0] if catcher.messages else None


def _without_logger_prefix(scalars: dict[str, Series]) -> dict[str, Series]:
    """A run logged through ``TensorBoardLogger(prefix="x")`` holds ``x-grad_norm/net.0`` and the like (Lightning
    joins a logger's prefix with ``-``): read it as ``grad_norm/net.0``, so the report finds gradmon's tags. Only
    when the run has no unprefixed gradmon tag; tags without that prefix (none of gradmon's) are kept as they are."""
    groups = tuple(f"{group}/" for group in _GRADMON_GROUPS)
    if any(tag.startswith(groups) for tag in scalars):
        return scalars
    found = [tag.split("-" + group, 1)[0] for tag in scalars for group in groups if "-" + group in tag]
    if not found:
        return scalars
    start = max(set(found), key=found.count) + "-"  # the logger's prefix, with the join character
    return {tag[len(start) :] if tag.startswith(start) else tag: series for tag, series in scalars.items()}


def _opened_at(path: Path) -> float:
    """The wall time of the first event in an event file (its writer's start); from the name if it has none."""
    try:
        for event in event_file_loader.EventFileLoader(str(path)).Load():
            return float(event.wall_time)
    except Exception:  # an unreadable file still has a place in the order: by the time in its name
        pass
    match = re.match(r"events\.out\.tfevents\.(\d+)", path.name)
    return float(match.group(1)) if match else 0.0
