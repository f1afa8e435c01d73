"""The ``ralu-bench magcache`` command line: its arguments only (no torch, so ``--help`` stays cheap)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "measure MagCache's per-stage magnitude ratios of a schedule on testbed v2 and write it with a cache section"
EXAMPLES = "example:\n  ralu-bench magcache --schedule flux-dev-4x --out flux-dev-4x-magcache.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", required=True, help="schedule file or shipped name (a FLUX.1-dev or SD3 schedule)")
    parser.add_argument("--out", type=Path, required=True, help="schedule file to write (with the cache section)")
    parser.add_argument("--images", type=int, default=8, help="images measured on, random testbed v2 prompts (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the noise (default 0)")
    parser.add_argument("--threshold", type=float, default=0.06, help="MagCache's error threshold written to the section (default 0.06, diffusers')")
    parser.add_argument("--weights-dir", type=Path, help="folder holding testbed v2's autoencoder/ flux/ sd3/ (default: the repository's lab/testbed-weights/v2)")
