"""The ``ralu-bench cache`` command line: its arguments only (no torch, so ``--help`` stays cheap)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "linear FLOPs executed and latent change of diffusers' step caches in RALU runs, on testbed v2"
EXAMPLES = "example:\n  ralu-bench cache --out-dir reports"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedules", nargs="+", default=["flux-dev-4x", "flux-dev-7x"], metavar="NAME", help="FLUX.1-dev or SD3 schedules, files or shipped names (default flux-dev-4x flux-dev-7x)")
    parser.add_argument("--images", type=int, default=8, help="testbed v2 images per row, random prompts (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights-dir", type=Path, help="folder holding testbed v2's autoencoder/ flux/ sd3/ (default: the repository's lab/testbed-weights/v2)")
    parser.add_argument("--out-dir", type=Path, default=Path("reports"), help="where cache.md and cache.json go (default reports/)")
