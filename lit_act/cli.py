"""The ``lit-act`` console script.

    lit-act report <run or multirun dir> [--out DIR] [--metrics PATTERN ...]

writes a comparison table (Markdown + CSV) and figures of the jobs' final metrics and validation curves from their
local logs (see :mod:`lit_act.report`). Train with ``python train.py`` (see the README).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lit_act.report import write_report
from lit_act.sae import cli as sae_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-act", description="lit-act tools for finished runs and sweeps.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report", help="compare the jobs of a run or multirun directory (table + figures)",
        description="Read every job's .hydra/overrides.yaml, job_status.json and CSV metrics under DIR (no network) "
                    "and write comparison.md, comparison.csv and figures/.")
    report.add_argument("dir", type=Path, help="a run directory or a multirun (sweep) directory")
    report.add_argument("--out", type=Path, default=None, help="output directory (default: DIR/report)")
    report.add_argument("--metrics", nargs="+", default=None, metavar="PATTERN",
                        help="metric keys for the Markdown table and bar charts, as glob patterns "
                             "(e.g. 'val/*' 'train/*/mean'); default: every key without a per-module part")
    sae_cli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sae":
        return sae_cli.run(args)
    if args.command == "report":
        try:
            result = write_report(args.dir, args.out, args.metrics)
        except FileNotFoundError as err:
            print(f"lit-act report: {err}", file=sys.stderr)
            return 1
        print(f"Table:   {result.markdown}\nCSV:     {result.csv}\nFigures: {len(result.figures)} in "
              f"{result.markdown.parent / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
