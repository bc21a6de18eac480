"""The verdict over a run: which finding is the root cause, which are its consequences, and how long it holds.

One step's findings are a snapshot; what a user needs is the cause of what went wrong, told at the step it was first
found and kept while it holds, even when later steps show only its consequences (a too-small init vanishes the
gradient, and the tiny gradient then makes tiny updates that look like a too-low learning rate). :class:`Diagnosis`
reads each observed step's findings (:func:`gradmon.diagnosis.diagnose`) and keeps a :class:`Verdict`:

- The first step with findings sets it: of that step's findings, the one that explains the others
  (:data:`CONSEQUENCES`), the likeliest root first (:data:`ROOTS`).
- Later findings of the same cause refresh it; findings it explains are its consequences; findings that contradict
  it (:data:`gradmon.diagnosis.text.OPPOSITES`) are left out.
- It is replaced only by stronger evidence (:func:`stronger`): a known cause over "cause not found", a measured
  signal over one predicted from the weights, an operation that makes NaN from finite values over anything, a cause
  that explains it, or any root once it stopped being found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gradmon.diagnosis.text import BASES, CAUSES, CONDITIONS, OPPOSITES, Finding

_AFTER_NAN = frozenset(set(CAUSES) - {"bad_op"})
_EXCESS = frozenset({"dead_relu", "saturating_activation", "activation_overflow", "gradient_spike", "unknown"})
#: For each root cause, the causes it explains when they are found with it or after it.
CONSEQUENCES: dict[str, frozenset[str]] = {
    "bad_op": _AFTER_NAN,
    # Not init_too_large: init findings judge the weights at the start, which no learning rate made.
    "no_warmup": _EXCESS | {"lr_too_high"},
    "lr_too_high": _EXCESS | {"no_warmup"},
    "init_too_large": _EXCESS | {"lr_too_high"},
    "init_too_small": frozenset({"dead_relu", "lr_too_low", "saturating_activation", "unknown"}),
    "gain_mismatch": frozenset({"dead_relu", "lr_too_low", "saturating_activation", "unknown", "init_too_small",
                                "init_too_large"}),
    "saturating_activation": frozenset({"lr_too_low", "dead_relu", "unknown"}),
    "dead_relu": frozenset({"lr_too_low", "unknown"}),
    "lr_too_low": frozenset({"unknown"}),
    "activation_overflow": frozenset({"gradient_spike", "unknown"}),
    "gradient_spike": frozenset({"activation_overflow", "unknown"}),
    "unknown": frozenset(),
}
#: Which cause is the root when one step's findings do not settle it, the likeliest first.
ROOTS: tuple[str, ...] = (
    "bad_op", "no_warmup", "init_too_large", "init_too_small", "gain_mismatch", "lr_too_high", "dead_relu",
    "saturating_activation", "lr_too_low", "activation_overflow", "gradient_spike", "unknown",
)
#: For each GradHealthMonitor condition, the finding conditions and causes that can explain it.
EXPLAINS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "vanishing": (
        frozenset({"backward_decay", "forward_decay", "dead_units", "saturation", "update_ratio_low"}),
        frozenset({"init_too_small", "gain_mismatch", "saturating_activation", "dead_relu"}),
    ),
    "exploding": (
        frozenset({"forward_growth", "backward_growth", "update_ratio_high", "divergence", "nonfinite"}),
        frozenset({"init_too_large", "lr_too_high", "no_warmup"}),
    ),
    "nonfinite": (
        frozenset({"nonfinite", "forward_growth", "backward_growth", "update_ratio_high", "divergence"}),
        frozenset({"bad_op", "init_too_large", "lr_too_high", "no_warmup", "activation_overflow", "gradient_spike"}),
    ),
}


@dataclass
class Verdict:
    """The root cause of what the run shows.

    Attributes:
        finding: The root finding, as first found (its step is when).
        last_seen: The latest observed step that showed it.
        consequences: The first finding of each cause it explains, by cause.
        cleared: The first observed step after ``last_seen`` that showed nothing, or ``None``.
    """

    finding: Finding
    last_seen: int
    consequences: dict[str, Finding] = field(default_factory=dict)
    cleared: int | None = None

    @property
    def cause(self) -> str:
        return self.finding.cause

    def markdown(self) -> str:
        """A paragraph for TensorBoard's text tab (``diagnosis/verdict``) and the report."""
        f = self.finding
        text = (f"**Verdict** (found at step {f.step}, from {BASES[f.basis]}): **{CAUSES[f.cause]}**: "
                f"{f.explanation}.  \nTry: {f.suggestion}.")
        if self.consequences:
            text += "  \nIts consequences: " + ", ".join(
                f"{CONDITIONS[c.condition]} (step {c.step})" for c in self.consequences.values()) + "."
        return text

    def line(self) -> str:
        """``likely cause (found at step N from <evidence>): <cause>: <why>; try: <change>``, then its
        consequences."""
        f = self.finding
        text = (f"likely cause (found at step {f.step} from {BASES[f.basis]}): {CAUSES[f.cause]}: {f.explanation}; "
                f"try: {f.suggestion}")
        if self.consequences:
            text += "; its consequences: " + ", ".join(
                f"{CAUSES[c.cause] if c.cause != 'unknown' else c.condition.replace('_', ' ')} (step {c.step})"
                for c in self.consequences.values())
        if self.cleared is not None:
            text += f"; no longer found from step {self.cleared}"
        return text


def explains(finding: Finding, condition: str) -> bool:
    """Whether ``finding`` can explain a GradHealthMonitor ``condition`` (``"vanishing"``, ``"exploding"``,
    ``"nonfinite"``)."""
    conditions, causes = EXPLAINS.get(condition, (frozenset(), frozenset()))
    return finding.condition in conditions or finding.cause in causes


def root_of(findings: Sequence[Finding]) -> Finding:
    """Of one step's findings, the one that explains the most others, the likeliest root (:data:`ROOTS`) first;
    measured before predicted."""
    def rank(f: Finding) -> tuple[int, int, int]:
        explained = sum(g.cause in CONSEQUENCES[f.cause] for g in findings if g is not f)
        return (-explained, ROOTS.index(f.cause), f.basis == "weights")

    return min(findings, key=rank)


def stronger(new: Finding, verdict: Verdict) -> bool:
    """Whether ``new`` replaces the verdict (see the module docstring)."""
    old = verdict.finding
    if new.cause == old.cause or OPPOSITES.get(old.cause) == new.cause and verdict.cleared is None:
        return False
    return (
        new.cause == "bad_op"
        or old.cause == "unknown" and new.cause != "unknown"
        or old.basis == "weights" and new.basis != "weights" and new.cause != "unknown"
        or old.cause in CONSEQUENCES[new.cause]
        or verdict.cleared is not None and new.cause != "unknown"
    )


class Diagnosis:
    """The verdict of a run, from each observed step's findings in order (see the module docstring).

    Example::

        diagnosis = Diagnosis()
        for step in observed_steps:
            diagnosis.observe(step, diagnose(evidence_of(step)))
        print(diagnosis.verdict.line() if diagnosis.verdict else "nothing found")
    """

    def __init__(self) -> None:
        self.verdict: Verdict | None = None
        #: Earlier verdicts that stronger evidence replaced, oldest first.
        self.replaced: list[Verdict] = []
        #: Findings neither the verdict nor its consequences, the first of each cause.
        self.others: dict[str, Finding] = {}
        self._last_step = -1

    def observe(self, step: int, findings: Sequence[Finding]) -> Verdict | None:
        """Take one observed step's findings (an empty list: the step looked healthy).

        Args:
            step: The step observed; a step observed again (read early for a warning, then in full) is taken again.
            findings: What :func:`gradmon.diagnosis.diagnose` found at it.

        Returns:
            The verdict after it.
        """
        self._last_step = max(self._last_step, step)
        verdict = self.verdict
        if not findings:
            if verdict is not None and verdict.cleared is None and step > verdict.last_seen:
                verdict.cleared = step
            return verdict
        if verdict is None:
            root = root_of(findings)
            self.verdict = verdict = Verdict(root, step)
        for finding in findings:
            if finding.cause == verdict.cause:
                verdict.last_seen, verdict.cleared = max(verdict.last_seen, step), None
            elif finding.cause in CONSEQUENCES[verdict.cause]:
                verdict.consequences.setdefault(finding.cause, finding)
            elif stronger(finding, verdict):
                self.replaced.append(verdict)
                explained = {c: f for c, f in verdict.consequences.items() if c in CONSEQUENCES[finding.cause]}
                if verdict.cause in CONSEQUENCES[finding.cause]:
                    explained.setdefault(verdict.cause, verdict.finding)
                self.verdict = verdict = Verdict(finding, step, explained)
            elif OPPOSITES.get(verdict.cause) != finding.cause:
                self.others.setdefault(finding.cause, finding)
        return verdict

    def explain(self, condition: str, findings: Sequence[Finding] = ()) -> str | None:
        """The line a GradHealthMonitor warning about ``condition`` ends with: the verdict's when it can explain
        the condition, else that of one of ``findings`` (the step's own) that can, else ``None``."""
        verdict = self.verdict
        if verdict is not None and (explains(verdict.finding, condition)
                                    or any(explains(f, condition) for f in verdict.consequences.values())):
            return verdict.line()
        finding = next((f for f in findings if explains(f, condition) and f.cause != "unknown"), None)
        if finding is None:
            finding = next((f for f in findings if explains(f, condition)), None)
        return finding.line() + f" (from {BASES[finding.basis]})" if finding is not None else None

    def state_dict(self) -> dict[str, Any]:
        def plain(v: Verdict) -> dict[str, Any]:
            return {"finding": asdict(v.finding), "last_seen": v.last_seen, "cleared": v.cleared,
                    "consequences": {c: asdict(f) for c, f in v.consequences.items()}}

        return {"verdict": plain(self.verdict) if self.verdict else None,
                "replaced": [plain(v) for v in self.replaced],
                "others": {c: asdict(f) for c, f in self.others.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def finding(d: dict[str, Any]) -> Finding:
            return Finding(**{**d, "layers": tuple(d["layers"])})

        def verdict(d: dict[str, Any]) -> Verdict:
            return Verdict(finding(d["finding"]), int(d["last_seen"]),
                           {c: finding(f) for c, f in d.get("consequences", {}).items()}, d.get("cleared"))

        self.verdict = verdict(state["verdict"]) if state.get("verdict") else None
        self.replaced = [verdict(v) for v in state.get("replaced", [])]
        self.others = {c: finding(f) for c, f in state.get("others", {}).items()}
