"""The ``gradmon`` command line. One subcommand so far::

    gradmon report LOGDIR [--out DIR]

writes figures and a markdown summary of every TensorBoard run under LOGDIR (see :mod:`gradmon.report`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradmon", description="Gradient-health tools for PyTorch Lightning.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="figures and a summary from TensorBoard logs",
        description="Write, for every run under LOGDIR, a layer-by-step heatmap of log10 gradient norms, per-layer "
        "norm curves and a gradient-flow bar chart (PNG), plus summary.md with the health events of each run.",
    )
    report.add_argument("logdir", type=Path, metavar="LOGDIR", help="directory of TensorBoard runs, e.g. runs")
    report.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="output directory (default: LOGDIR/report)"
    )
    report.set_defaults(handler=_report)
    return parser


def _report(args: argparse.Namespace) -> int:
    # tensorboard and matplotlib load only for this subcommand.
    from gradmon.report import write_report

    out = args.out if args.out is not None else args.logdir / "report"
    try:
        written = write_report(args.logdir, out)
    except FileNotFoundError as error:
        print(f"gradmon report: error: {error}", file=sys.stderr)
        return 2
    print(f"gradmon report: wrote {len(written) - 1} figures and {out / 'summary.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
