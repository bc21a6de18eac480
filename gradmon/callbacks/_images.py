"""gradmon's figures as TensorBoard images during the run: the scalars gradmon logs are kept per Trainer (only those
the figures draw), and at the steps a callback asks, a snapshot of them is drawn by :mod:`gradmon.report`'s figure
functions on one background thread, so the training step never waits for matplotlib.

Written under ``gradmon/`` at the step asked: ``gradmon/grad_norm_heatmap`` (log10 gradient norm, layer by step,
flagged cells marked), ``gradmon/gradient_flow`` (each layer's norm at that step, input at left), and, when
ActivationMonitor logged them, ``gradmon/activation_rms_heatmap`` and ``gradmon/dead_or_saturated_heatmap``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gradmon import tags
from gradmon.callbacks import _logging
from gradmon.callbacks._boards import FIGURE_BOARD, trainer_board

#: The tag groups the figures draw: only these are kept.
KEPT = (tags.GRAD_NORM, tags.GRAD_NORM_LOG10, tags.GRAD_HEALTH_FLAG, tags.GRAD_HEALTH, tags.ACTIVATION_RMS_LOG10,
        tags.ACTIVATION_RMS, tags.DEAD_FRACTION, tags.SATURATED_FRACTION)
#: Where the images go in TensorBoard's Images tab.
IMAGE_PREFIX = "gradmon"
#: The report's figures drawn as images during the run (the norm curves are left to the report).
IMAGES = ("grad_norm_heatmap", "gradient_flow", "activation_rms_heatmap", "dead_or_saturated_heatmap")


class FigureBoard:
    """One Trainer's scalars as the figures need them, and the thread that draws them."""

    def __init__(self) -> None:
        self.scalars: dict[str, tuple[list[int], list[float]]] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._drawing: list[Future] = []
        self._told: set[int] = set()
        #: Whether a callback draws figures in this fit (nothing is kept otherwise).
        self.enabled = False

    def keep(self, values: Mapping[str, float], step: int) -> None:
        """Keep the values of ``values`` whose tag group the figures draw."""
        if not self.enabled:
            return
        with self._lock:
            for tag, value in values.items():
                if tag.partition("/")[0] in KEPT:
                    steps, kept = self.scalars.setdefault(tag, ([], []))
                    if steps and steps[-1] == step:
                        kept[-1] = value
                    else:
                        steps.append(step)
                        kept.append(value)

    def draw(self, trainer: pl.Trainer, step: int) -> None:
        """Draw the figures of what was kept so far at ``step``, on the background thread, for the Trainer's loggers
        that take images (:func:`gradmon.callbacks._logging.image_writers`)."""
        writers = _logging.image_writers(trainer, self._told)
        if not writers or f"{tags.GRAD_NORM}/" not in "".join(self.scalars):
            return
        with self._lock:
            snapshot = {tag: (np.array(s, dtype=np.int64), np.array(v, dtype=np.float64))
                        for tag, (s, v) in self.scalars.items()}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradmon-figures")
        self._drawing = [f for f in self._drawing if not f.done()]
        self._drawing.append(self._pool.submit(_draw_all, snapshot, writers, step))

    def finish(self) -> None:
        """Wait for the figures on their way (at the end of fit), and report a drawing that failed."""
        for future in self._drawing:
            error = future.exception()
            if error is not None:
                rank_zero_warn(f"gradmon: a figure could not be drawn ({type(error).__name__}: {error}).")
        self._drawing = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def figure_board(trainer: pl.Trainer) -> FigureBoard:
    """The Trainer's figure board, made on first use."""
    return trainer_board(trainer, FIGURE_BOARD, FigureBoard)


def _draw_all(snapshot: dict[str, tuple[np.ndarray, np.ndarray]], writers: list, step: int) -> None:
    from gradmon.report import Run, Series, run_figures

    run = Run("this run", Path("."), {tag: Series(s, v) for tag, (s, v) in snapshot.items()})
    for name, plot in run_figures(run):
        if name in IMAGES:
            image = render(plot(run))
            for writer in writers:
                writer.add_image(f"{IMAGE_PREFIX}/{name}", image, step, dataformats="HWC")
    for writer in writers:
        writer.flush()


def render(fig: Figure) -> np.ndarray:
    """A figure as an RGB image (height x width x 3, uint8)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
