"""The ``ralu-bench cache`` command line: its arguments only (no torch, so ``--help`` stays cheap)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "linear FLOPs executed and latent change of diffusers' step caches in RALU runs, on the testbed"
EXAMPLES = "example:\n  ralu-bench cache --out-dir reports"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedules", nargs="+", default=["flux-dev-4x", "flux-dev-7x"], metavar="NAME", help="flux-dev schedules (default flux-dev-4x flux-dev-7x)")
    parser.add_argument("--images", type=int, default=8, help="testbed images per row (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, help="testbed transformer folder (default: the shipped weights)")
    parser.add_argument("--out-dir", type=Path, default=Path("reports"), help="where cache.md and cache.json go (default reports/)")
