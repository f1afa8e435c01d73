"""The ``ralu-bench quality`` command line: its arguments only (no torch, so ``--help`` stays cheap)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ralu.calibrate.bench.quality.config import PAPER_PRESETS

HELP = "image quality of RALU against its peers at matched FLOPs, on the offline testbed (v2 by default, v1 on request)"
EXAMPLES = (
    "examples:\n"
    "  ralu-bench quality                                   # testbed v2, FLUX and SD3: reports/quality.* (hours on 2 cores; it prints an estimate)\n"
    "  ralu-bench quality --arch flux --seeds 0             # v2, FLUX only, one seed\n"
    "  ralu-bench quality --quick --out-dir /tmp/q          # CI: every v2 code path on random weights in about a minute\n"
    "  ralu-bench quality --testbed v1                      # the v1 report, reports/quality-v1.* (about 20-30 min on 2 cores)\n"
    "  ralu-bench quality --testbed v1 --quick --out-dir /tmp/q1\n"
    "  ralu-bench quality --schedule my-4x.json             # add a row for any schedule file\n"
    "An interrupted v2 run continues where it stopped: each (arch, method, seed) batch of images is kept under --work-dir."
)

#: The testbeds ``--testbed`` selects, and the architectures of v2 (declared in its model).
TESTBEDS = ("v1", "v2")
ARCHES = ("flux", "sd3")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--testbed", choices=TESTBEDS, default="v2", help="v2: 64 px latent-space FLUX and SD3 testbed (default); v1: the 32 px pixel-space FLUX testbed")
    parser.add_argument("--arch", choices=ARCHES, nargs="+", help="v2: generators to judge (default flux sd3); v1 is FLUX only")
    parser.add_argument("--weights-dir", type=Path, help="v2: folder holding autoencoder/ classifier/ flux/ sd3/ (default: testbed v2's weights lookup)")
    parser.add_argument("--work-dir", type=Path, help="v2: where generated image batches are kept so a run resumes (default <out-dir>/.quality-v2-work)")
    parser.add_argument("--no-caches", action="store_true", help="v2: leave out the step-cache rows (each cache on RALU and on the plain pipeline)")
    parser.add_argument("--quick", action="store_true", help="few seeds, few images, 2 sweep points, short searches: the same code paths for CI")
    parser.add_argument("--schedule", action="append", metavar="FILE", help="add a RALU row for this schedule file (or shipped name); repeatable")
    parser.add_argument("--seeds", type=int, nargs="+", help="sample seeds (default v1: 0 1 2, v2: 0 1)")
    parser.add_argument("--images", type=int, help="images per seed (default v1: 128, v2: 256)")
    parser.add_argument("--budgets", type=int, nargs="+", help=f"budgets, named after the published presets (v1: {sorted(PAPER_PRESETS)}, default 4 7; v2: FLUX 4 7, SD3 2 3, a subset of those)")
    parser.add_argument("--z-values", type=float, nargs="*", help="Z = 1/sqrt(c) of the noise sweep (default 2.5 ... 90; none: no sweep)")
    parser.add_argument("--sweep-seeds", type=int, help="how many of the seeds the noise sweep uses (default v1: all, v2: 1)")
    parser.add_argument("--trials", type=int, help="trials of the outer layout search (default 80)")
    parser.add_argument("--real-images", type=int, help="real images of the FD reference (default 1000)")
    parser.add_argument("--batch-size", type=int, help="images per pipeline call (default 64)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default 2)")
    parser.add_argument("--weights", type=Path, help="v1: testbed transformer folder (default: the shipped weights)")
    parser.add_argument("--classifier", type=Path, help="v1: testbed classifier folder (default: the shipped one)")
    parser.add_argument("--out-dir", type=Path, default=Path("reports"), help="where the report goes (default reports/: v2 quality.md, quality.json, quality/; v1 quality-v1.md, quality-v1.json, quality-v1/)")
