"""Layer labels short enough for a figure's axis, and the caption lines that say how they were shortened and what
else a figure leaves out.

A label drops the dotted prefix all layers share; one longer than :data:`MAX_LABEL_CHARS` gets its middle pieces
abbreviated (``transformer.encoder.layers.0.linear1`` to ``t.e.l.0.linear1``); :meth:`ShortNames.caption` says what
was dropped and what the abbreviations stand for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradmon.report.runs import Run

#: Longest layer label before middle parts are abbreviated.
MAX_LABEL_CHARS = 28


@dataclass(frozen=True)
class ShortNames:
    """Layer labels for the axes: ``labels[i]`` stands for ``names[i]`` without ``prefix``, with the pieces of
    ``abbreviations`` (short -> full) shortened."""

    labels: list[str]
    prefix: str
    abbreviations: dict[str, str]

    def caption(self) -> list[str]:
        """What a reader needs to map the labels back to the names."""
        notes = []
        if self.prefix:
            notes.append(f'Layer names without their common prefix "{self.prefix}".')
        if self.abbreviations:
            pairs = ", ".join(f"{short} = {full}" for short, full in self.abbreviations.items())
            notes.append(f"Abbreviated: {pairs}.")
        return notes


def short_names(names: Sequence[str], max_chars: int = MAX_LABEL_CHARS) -> ShortNames:
    """Distinct labels of at most ``max_chars`` characters for ``names`` (dotted module names).

    The dotted prefix all names share is dropped (each keeps at least its last piece). A label still too long gets
    its pieces abbreviated from the left, never the last one nor a number (``transformer_encoder.layers.0.linear1``
    to ``te.l.0.linear1``): the end of a module name and its indices are what tell layers apart. A label that is
    still too long keeps its start and end around an ellipsis.

    Args:
        names: The layer names.
        max_chars: The longest label.

    Returns:
        The labels, the prefix dropped and the abbreviations used.
    """
    parts = [name.split(".") for name in names]
    keep = _shared_pieces(parts)
    prefix = ".".join(parts[0][:keep]) + "." if keep else ""
    rests = [p[keep:] for p in parts]
    table = _abbreviation_table({piece for rest in rests for piece in rest[:-1] if _abbreviable(piece)})
    # Greedy per name, then every chosen abbreviation applied to every name, so that one piece reads the same in all.
    chosen: set[str] = set()
    for rest in rests:
        pieces = list(rest)
        for i in range(len(pieces) - 1):
            if len(".".join(pieces)) <= max_chars:
                break
            if pieces[i] in table:
                chosen.add(pieces[i])
                pieces[i] = table[pieces[i]]
    used: dict[str, str] = {}
    labels: list[str] = []
    for rest in rests:
        pieces = list(rest)
        for i, piece in enumerate(rest[:-1]):
            if piece in chosen:
                used.setdefault(table[piece], piece)
                pieces[i] = table[piece]
        labels.append(_ellipsize(".".join(pieces), max_chars))
    return ShortNames(_distinct(labels, rests, max_chars), prefix, used)


def _flag_caption(flags: dict[str, np.ndarray], per_layer: bool, marked: str) -> list[str]:
    """What a figure's flag marks mean (none when GradHealthMonitor logged nothing); ``marked``: how the figure
    marks a flagged layer, e.g. ``"cells are hatched"``."""
    if not flags:
        return []
    if not any(len(steps) for steps in flags.values()):
        return ["GradHealthMonitor flagged nothing."]
    if per_layer:
        return [f"Top strip: steps GradHealthMonitor flagged; the flagged {marked} in the strip's colours."]
    return ["Top strip: steps GradHealthMonitor flagged (not which layers: the logs hold no grad_health_flag/ tags)."]


def _thin_caption(shown: list[int], n: int) -> list[str]:
    """The caption line of an axis that labels only ``shown`` of its ``n`` layers (none when it labels them all)."""
    return [f"1 in {shown[1] - shown[0]} of the {n} layers labelled."] if len(shown) < n else []


def _order_caption(run: Run) -> list[str]:
    """The caption line that says in which order the layers are drawn."""
    if run.forward_order:
        return ["Layers in forward order, as ActivationMonitor saw the forward call them (input first)."]
    return ["Layers in the order the model registers them (for an nn.Sequential, the forward order); with "
            "ActivationMonitor attached they are drawn in the order the forward calls them."]


def _rerun_caption(run: Run) -> list[str]:
    """The caption line of a run read from the latest of several event files (none for a run read whole)."""
    if not run.ignored_event_files or run.event_file is None:
        return []
    return [
        f"From {run.event_file.name}, the latest of {len(run.ignored_event_files) + 1} event files in this "
        "directory (the others ignored)."
    ]


def _shared_pieces(parts: list[list[str]]) -> int:
    """How many leading pieces all names share, leaving each at least its last one."""
    keep = 0
    if parts:
        limit = min(len(p) for p in parts) - 1
        while keep < limit and all(p[keep] == parts[0][keep] for p in parts):
            keep += 1
    return keep


def _distinct(labels: list[str], rests: list[list[str]], max_chars: int) -> list[str]:
    """``labels``, those that abbreviating made one label unabbreviated again, and numbered if they still clash."""
    if len(set(labels)) < len(labels):
        # Abbreviating can make two names one label; the unabbreviated ends tell them apart more often.
        counts = {label: labels.count(label) for label in labels}
        labels = [_ellipsize(".".join(r), max_chars) if counts[lab] > 1 else lab for lab, r in zip(labels, rests)]
        if len(set(labels)) < len(labels):
            labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    return labels


def _abbreviable(piece: str) -> bool:
    return len(piece) > 3 and not piece.isdigit()


def _abbreviation_table(pieces: set[str]) -> dict[str, str]:
    """A distinct abbreviation for each piece: the initials of its ``_``-parts, each keeping its trailing digits
    (``transformer_encoder`` -> ``te``, ``linear1`` -> ``l1``); pieces that share one get more letters of each part
    until they differ (``embedding_stack``, ``encoder_stack`` -> ``em_st``, ``en_st``). Pieces that would not get
    shorter are left out."""
    def abbreviate(piece: str, letters: int) -> str:
        parts = [
            part[:letters] + (m.group(0) if (m := re.search(r"\d+$", part)) and len(part) > letters else "")
            for part in piece.split("_")
            if part
        ]
        # Initials read as one word (te); longer stubs need their separator back (em_st).
        return ("" if letters == 1 else "_").join(parts)

    table: dict[str, str] = {}
    pending, letters = sorted(pieces), 1
    while pending and letters < 8:
        short = {piece: abbreviate(piece, letters) for piece in pending}
        clash = {s for s in short.values() if list(short.values()).count(s) > 1}
        table.update({p: s for p, s in short.items() if s not in clash and len(s) < len(p)})
        pending, letters = [p for p, s in short.items() if s in clash], letters + 1
    return table


def _ellipsize(label: str, max_chars: int) -> str:
    if len(label) <= max_chars:
        return label
    head = (max_chars - 1) // 3  # the end of a name says more than its start
    return label[:head] + "…" + label[len(label) - (max_chars - 1 - head) :]
