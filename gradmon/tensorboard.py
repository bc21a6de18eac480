"""Presentation on TensorBoard: scalars in one summary, histograms, text and the custom-scalars layout.

Works on any ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX writer) and never imports Lightning, so a
plain PyTorch loop can present the same numbers the callbacks log.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tensorboard.compat.proto.event_pb2 import Event

from gradmon.tags import LAYOUT_CHARTS


def write_scalars(writer: Any, values: Mapping[str, float], step: int) -> None:
    """Write all ``values`` at ``step`` as a single summary event.

    One event with N values costs far less than N separate ``add_scalar`` calls. The values are added to the
    event's own summary in place, rather than copied into a new event as ``add_summary`` would.
    """
    if not values:
        return
    event = Event()
    add = event.summary.value.add
    for tag, v in values.items():
        add(tag=tag, simple_value=float(v))
    writer._get_file_writer().add_event(event, step, time.time())


def write_histograms(writer: Any, tensors: Mapping[str, torch.Tensor], step: int) -> None:
    """One histogram per tag, of the flattened tensor's finite values (float32 on the CPU).

    NaN and inf cannot be binned (TensorBoard raises on them, and on an empty histogram): they are left out, and a
    tensor with no finite value at all gets no histogram at that step. :func:`count_nonfinite` says how many.
    """
    for tag, tensor in tensors.items():
        values = finite_values(tensor)
        if values.numel():
            writer.add_histogram(tag, values, step)


def finite_values(tensor: torch.Tensor) -> torch.Tensor:
    """The finite entries of ``tensor``, flattened, as float32 on the CPU: what a histogram can bin."""
    values = tensor.detach().float().cpu().reshape(-1)
    finite = torch.isfinite(values)
    return values if bool(finite.all()) else values[finite]


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many NaN and inf entries ``tensor`` holds (the ones a histogram leaves out)."""
    return int((~torch.isfinite(tensor.detach())).sum())


def write_text(writer: Any, tag: str, text: str, step: int = 0) -> None:
    writer.add_text(tag, text, step)


def write_layout(writer: Any, charts: Mapping[str, Sequence[tuple[str, str]]] = LAYOUT_CHARTS) -> None:
    """Write the custom-scalars layout: every layer of one metric as one multi-line chart."""
    layout = {
        category: {title: ["Multiline", [regex]] for title, regex in category_charts}
        for category, category_charts in charts.items()
    }
    writer.add_custom_scalars(layout)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table, which TensorBoard's text plugin renders as a table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
