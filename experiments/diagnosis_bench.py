"""The diagnosis benchmark: train the zoo (:mod:`experiments.diagnosis_zoo`) with GradHealthMonitor and
ActivationMonitor attached, score what the diagnosis says, apply the fix it proposes and train again::

    python -m experiments.diagnosis_bench              # every case, a few minutes on a laptop CPU
    python -m experiments.diagnosis_bench healthy/gpt  # the cases whose names start so

Every case must first show what it was built to (a healthy run trains, a sick one does not: its loss does not fall
below 0.85 of chance, or GradHealthMonitor flags it); one that does not fails. A healthy run passes when the
monitors found nothing and warned nothing. A sick run passes when the end-of-fit
verdict (:func:`gradmon.verdict`) names the cause the case was built with, and the run trained with the verdict's own
advice (``Finding.fix``, applied to the run's settings) learns: its loss falls and GradHealthMonitor flags nothing. A
verdict that names the opposite cause (too high for too low, too small for too large) is counted apart. The scores
the benchmark must reach are :data:`TARGETS`; ``tests/test_diagnosis_bench.py`` holds a few cases to them in CI.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from experiments.diagnosis_zoo import CASES, Case, RunConfig, RunResult, run
from gradmon import GradHealthMonitor
from gradmon.diagnosis import CAUSES, Verdict
from gradmon.diagnosis.text import OPPOSITES

#: What the benchmark must reach: healthy runs with no finding or warning, sick runs whose verdict names the
#: expected cause and whose fix trains, and no verdict that contradicts the expected cause.
TARGETS = {"healthy clean": 1.0, "sick named": 0.9, "fix trains": 0.9, "contradicting": 0}


@dataclass
class Score:
    """One case's outcome.

    Attributes:
        case: The case.
        result: Its run.
        verdict: The end-of-fit verdict.
        fixed: The run with the verdict's fix applied (sick cases whose verdict proposes settings).
    """

    case: Case
    result: RunResult
    verdict: Verdict | None
    fixed: RunResult | None = None

    @property
    def named(self) -> bool:
        """A sick case's verdict names its cause; a healthy case has nothing to name."""
        if self.case.expected is None:
            return self.verdict is None
        return self.verdict is not None and self.verdict.cause == self.case.expected

    @property
    def contradicting(self) -> bool:
        return self.verdict is not None and OPPOSITES.get(self.case.expected or "") == self.verdict.cause

    @property
    def clean(self) -> bool:
        """No finding and no warning (what a healthy run must show)."""
        return not self.result.findings and not self.result.warnings and self.verdict is None

    @property
    def fix_trains(self) -> bool:
        return self.fixed is not None and self.fixed.trained and not self.fixed.warnings

    @property
    def valid(self) -> bool:
        """The case shows what it was built to: a healthy run trains, a sick one does not."""
        return self.result.trained == (self.case.expected is None)

    @property
    def passed(self) -> bool:
        if not self.valid:
            return False
        return self.clean if self.case.expected is None else self.named and self.fix_trains


def fix_of(verdict: Verdict | None) -> dict | None:
    """The verdict's fix as settings of the zoo's runs, or ``None`` when it proposes none they can take."""
    if verdict is None or not verdict.finding.fix:
        return None
    settings = {f.name for f in fields(RunConfig)}
    fix = dict(verdict.finding.fix)
    return fix if set(fix) <= settings else None


def score(case: Case, health_only: bool = False) -> Score:
    """Run ``case`` and, for a sick one, the fix its verdict proposes; with ``health_only``, under a
    GradHealthMonitor alone (its verdicts then come from the weights and gradients at its warnings)."""
    result = run(case.config, [GradHealthMonitor()] if health_only else None)
    verdict = result.verdict
    outcome = Score(case, result, verdict)
    fix = fix_of(verdict) if case.expected is not None else None
    if fix is not None:
        outcome.fixed = run(replace(case.config, **fix))
    return outcome


def _fix_text(fix: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in fix.items()) if fix else "-"


def table(scores: Sequence[Score]) -> str:
    """The benchmark's table, as Markdown: one row per case."""
    rows = ["| case | run trains | expected | verdict (step) | fix applied | rerun trains | pass |",
            "|---|---|---|---|---|---|---|"]
    for s in scores:
        expected = CAUSES[s.case.expected] if s.case.expected else "nothing"
        if s.verdict is not None:
            found = f"{CAUSES[s.verdict.cause]} ({s.verdict.finding.step})"
        else:
            found = "nothing" if s.clean else (
                f"{len(s.result.findings)} finding(s), {len(s.result.warnings)} warning(s)")
        if s.case.expected is None:
            fix, trains = "", ""
        else:
            fix, trains = _fix_text(fix_of(s.verdict)), "yes" if s.fix_trains else "no"
        ran, passed = ("yes" if s.result.trained else "no"), ("yes" if s.passed else "NO")
        rows.append(f"| {s.case.name} | {ran} | {expected} | {found} | {fix} | {trains} | {passed} |")
    return "\n".join(rows)


def cause_table(scores: Sequence[Score]) -> str:
    """The benchmark's scores by expected cause, as Markdown: cases, verdicts that name it, fixes that train."""
    rows = ["| expected | cases | verdict names it | its fix trains |", "|---|---|---|---|"]
    causes = list(dict.fromkeys(s.case.expected for s in scores))
    for cause in sorted(causes, key=lambda c: (c is not None, list(CAUSES).index(c) if c else 0)):
        group = [s for s in scores if s.case.expected == cause]
        if cause is None:
            rows.append(f"| nothing (healthy) | {len(group)} | {sum(s.clean for s in group)} with no finding and no "
                        "warning | |")
        else:
            rows.append(f"| {CAUSES[cause]} | {len(group)} | {sum(s.named for s in group)} | "
                        f"{sum(s.fix_trains for s in group)} |")
    return "\n".join(rows)


def summary(scores: Sequence[Score]) -> dict[str, float]:
    """The scores :data:`TARGETS` names."""
    healthy = [s for s in scores if s.case.expected is None]
    sick = [s for s in scores if s.case.expected is not None]
    return {
        "healthy clean": sum(s.clean for s in healthy) / len(healthy) if healthy else 1.0,
        "sick named": sum(s.named for s in sick) / len(sick) if sick else 1.0,
        "fix trains": sum(s.fix_trains for s in sick) / len(sick) if sick else 1.0,
        "contradicting": sum(s.contradicting for s in scores),
    }


def met(values: dict[str, float]) -> bool:
    """Whether the scores reach :data:`TARGETS`."""
    return all(values[k] <= v if k == "contradicting" else values[k] >= v for k, v in TARGETS.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score gradmon's diagnosis on the zoo of small runs.")
    parser.add_argument("names", nargs="*", help="case names or prefixes (default: every case)")
    parser.add_argument("--seed", type=int, default=None,
                        help="run every case with this seed instead of its own (a case may then stop showing what it "
                             "was built to: such a case fails as invalid)")
    parser.add_argument("--health-only", action="store_true",
                        help="attach GradHealthMonitor alone (no ActivationMonitor): a verdict only where it warns")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.names or any(c.name.startswith(n) for n in args.names)]
    if args.seed is not None:
        cases = [replace(c, config=replace(c.config, seed=args.seed)) for c in cases]
    start = time.perf_counter()
    scores = []
    for case in cases:
        scores.append(score(case, args.health_only))
        s = scores[-1]
        said = s.verdict.line() if s.verdict else "; ".join(
            [str(f) for f in s.result.findings[:1]] + s.result.warnings[:1]) or "nothing found"
        status = "pass" if s.passed else "FAIL" if s.valid else "INVALID"
        print(f"{case.name:40} {status:7}  {said[:160]}", flush=True)
    values = summary(scores)
    healthy = sum(s.case.expected is None for s in scores)
    print()
    print(table(scores))
    print()
    print(cause_table(scores))
    print()
    seconds = time.perf_counter() - start
    print(f"{len(scores)} cases ({healthy} healthy, {len(scores) - healthy} sick) in {seconds:.0f} s")
    for name, value in values.items():
        target = TARGETS[name]
        shown = f"{value:.0%}" if name != "contradicting" else f"{value:.0f}"
        goal = f">= {target:.0%}" if name != "contradicting" else f"<= {target}"
        print(f"{name}: {shown} (target {goal})")
    invalid = [s.case.name for s in scores if not s.valid]
    if invalid:
        print(f"cases that did not show what they were built to (a healthy run that did not train, a sick one that "
              f"did): {', '.join(invalid)}")
    print("targets met" if met(values) else "targets NOT met")
    return 0 if met(values) else 1


if __name__ == "__main__":
    raise SystemExit(main())
