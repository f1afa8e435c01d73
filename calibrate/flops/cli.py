"""``python -m ralu.calibrate.flops``: recount the table (``--write``), write the report
(``--report``), and print a summary."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from ralu.runtime.schedule import write_text_atomic

from .counting import write_table
from .report import render_report, summary_lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ralu.calibrate.flops", description="FLOPs cost model of the real architectures RALU runs on (docs/method.md §6).")
    parser.add_argument("--write", action="store_true", help="recount every model and rewrite the shipped table")
    parser.add_argument("--table", type=Path, default=None, help="table path for --write (default: the package's)")
    parser.add_argument("--report", type=Path, default=None, help="write the Markdown report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.write:
        print(f"wrote {write_table(args.table)}")
    if args.report is not None:
        print(f"wrote {write_text_atomic(args.report, render_report())}")
    print("\n".join(summary_lines()))
    return 0
