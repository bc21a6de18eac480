"""The ``gradmon`` command line. One subcommand so far::

    gradmon report LOGDIR [--out DIR] [--metric TAG]

writes figures and a markdown summary of every TensorBoard run under LOGDIR (see :mod:`gradmon.report`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

_REPORT_DESCRIPTION = """\
For every run under LOGDIR (a directory holding TensorBoard event files) that logged gradmon's gradient norms,
write into DIR/<run>/: grad_norm_heatmap.png (log10 gradient norm, layer by step), grad_norm_curves.png (gradient
norm over the steps: every layer up to 10 layers, else percentile bands and a few chosen layers) and
gradient_flow.png (each layer's last gradient norm); for runs sharing a parent directory,
DIR/<parent>/gradient_flow_comparison.png; and DIR/summary.md, one row per run: last step, the last value of the
metric, the steps GradHealthMonitor flagged per condition, skipped steps and the gradient check's worst error.
Steps GradHealthMonitor flagged are marked above the heatmap and the curves. Long layer names are shortened (common
prefix dropped, middle parts abbreviated; each figure's caption says how).

A directory holding several event files is merged by step, each file replacing the earlier ones from its first step
on: a run resumed from a checkpoint is reported whole, a rerun from step 0 replaces the earlier run (summary.md and
a note here name the files merged or ignored). An event file that cannot be read to its end (truncated, corrupted)
is reported as far as it can be read, with a warning naming it and the last step read; the command then exits with
1 (2 for a LOGDIR or --out that cannot be used)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradmon", description="Gradient-health tools for PyTorch Lightning.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="figures and a summary from TensorBoard logs",
        description=_REPORT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("logdir", type=Path, metavar="LOGDIR", help="directory of TensorBoard runs, e.g. runs")
    report.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="output directory (default: LOGDIR/report)"
    )
    report.add_argument(
        "--metric",
        default=None,
        metavar="TAG",
        help="scalar tag whose last value summary.md shows per run, e.g. val/acc (default: a tag like val*acc*, "
        "case-insensitive, such as val/acc, val_acc or valid/accuracy; no column when no run has one)",
    )
    report.set_defaults(handler=_report)
    return parser


def _report(args: argparse.Namespace) -> int:
    # tensorboard and matplotlib load only for this subcommand.
    from gradmon.report import DAMAGED, write_report

    if args.metric is not None and not args.metric:
        print("gradmon report: error: `--metric ''` is not valid: expected a tag such as val/acc", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else args.logdir / "report"
    damaged = []

    def note(text: str) -> None:
        if text.startswith(DAMAGED):
            damaged.append(text)
            print(f"gradmon report: warning: {text}", file=sys.stderr)
        else:
            print(f"gradmon report: note: {text}")

    try:
        written = write_report(args.logdir, out, metric=args.metric, note=note)
    except (FileNotFoundError, NotADirectoryError) as error:
        print(f"gradmon report: error: {error}", file=sys.stderr)
        return 2
    print(f"gradmon report: wrote {len(written) - 1} figures and {out / 'summary.md'}")
    if damaged:
        print(f"gradmon report: {len(damaged)} damaged event file(s): the report covers only what could be read "
              "(see summary.md)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
