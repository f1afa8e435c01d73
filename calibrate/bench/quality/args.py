"""The ``ralu-bench quality`` command line: its arguments only (no torch, so ``--help`` stays cheap)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ralu.calibrate.bench.quality.config import PAPER_PRESETS

HELP = "image quality of RALU against its peers at matched FLOPs, on the offline testbed"
EXAMPLES = (
    "examples:\n"
    "  ralu-bench quality                               # the report (about 20-30 min on 2 cores)\n"
    "  ralu-bench quality --quick --out-dir /tmp/q      # CI: every code path in under a minute\n"
    "  ralu-bench quality --schedule my-4x.json         # add a row for any schedule file"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 images, 2 sweep points, short searches: the same code path for CI")
    parser.add_argument("--schedule", action="append", metavar="FILE", help="add a RALU row for this schedule file (or shipped name); repeatable")
    parser.add_argument("--seeds", type=int, nargs="+", help="sample seeds (default 0 1 2)")
    parser.add_argument("--images", type=int, help="images per seed (default 128)")
    parser.add_argument("--budgets", type=int, nargs="+", help=f"budgets, named after the published presets {sorted(PAPER_PRESETS)} (default 4 7)")
    parser.add_argument("--z-values", type=float, nargs="*", help="Z = 1/sqrt(c) of the noise sweep (default 2.5 ... 90; none: no sweep)")
    parser.add_argument("--sweep-seeds", type=int, help="how many of the seeds the noise sweep uses (default all)")
    parser.add_argument("--trials", type=int, help="trials of the outer layout search (default 80)")
    parser.add_argument("--real-images", type=int, help="real images of the FD reference (default 1000)")
    parser.add_argument("--batch-size", type=int, help="images per pipeline call (default 64)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default 2)")
    parser.add_argument("--weights", type=Path, help="testbed transformer folder (default: the shipped weights)")
    parser.add_argument("--classifier", type=Path, help="testbed classifier folder (default: the shipped one)")
    parser.add_argument("--out-dir", type=Path, default=Path("reports"), help="where quality.md, quality.json and quality/ go (default reports/)")
