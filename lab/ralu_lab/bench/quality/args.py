"""The ``ralu-bench quality`` command line: its arguments only (no torch, so ``--help`` stays cheap)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "image quality of RALU against its peers at matched FLOPs, on the offline testbed (v2)"
EXAMPLES = (
    "examples:\n"
    "  ralu-bench quality                                   # FLUX and SD3: reports/quality.* (hours on 2 cores; it prints an estimate)\n"
    "  ralu-bench quality --arch flux --seeds 0             # FLUX only, one seed\n"
    "  ralu-bench quality --quick --out-dir /tmp/q          # CI: every code path on random weights in about a minute\n"
    "  ralu-bench quality --schedule my-4x.json             # add a row for any schedule file\n"
    "An interrupted run continues where it stopped: each (arch, method, seed) batch of images is kept under --work-dir."
)

#: The testbeds ``--testbed`` selects (v2 only: testbed v1 is retired; the option stays so that
#: recorded commands with ``--testbed v2`` still run), and the architectures (declared in its model).
TESTBEDS = ("v2",)
ARCHES = ("flux", "sd3")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--testbed", choices=TESTBEDS, default="v2", help="v2, the 64 px latent-space FLUX and SD3 testbed (the only one; accepted for recorded commands)")
    parser.add_argument("--arch", choices=ARCHES, nargs="+", help="generators to judge (default flux sd3)")
    parser.add_argument("--weights-dir", type=Path, help="folder holding autoencoder/ classifier/ flux/ sd3/ (default: testbed v2's weights lookup)")
    parser.add_argument("--work-dir", type=Path, help="where generated image batches are kept so a run resumes (default <out-dir>/.quality-v2-work)")
    parser.add_argument("--no-caches", action="store_true", help="leave out the step-cache rows (each cache on RALU and on the plain pipeline)")
    parser.add_argument("--quick", action="store_true", help="few seeds, few images, 2 sweep points, short searches: the same code paths for CI")
    parser.add_argument("--schedule", action="append", metavar="FILE", help="add a RALU row for this schedule file (or shipped name); repeatable")
    parser.add_argument("--seeds", type=int, nargs="+", help="sample seeds (default 10 ... 25: 16 seeds; docs/testbed-v2.md §5)")
    parser.add_argument("--images", type=int, help="images per seed (default 32)")
    parser.add_argument("--heldout-seeds", type=int, nargs="*", metavar="SEED",
                        help="seeds on which the --schedule rows meet base-steps, bottleneck and the published preset, reported last "
                             "(default 900 ... 907; none: no held-out section)")
    parser.add_argument("--budgets", type=int, nargs="+", help="budgets, named after the published presets (FLUX 4 5 7, SD3 2 3; default all)")
    parser.add_argument("--rows", nargs="+", metavar="ROW",
                        help="only these planned rows (e.g. base-steps bottleneck ralu-paper ralu-paper-crop); the baseline and --schedule rows always run")
    parser.add_argument("--z-values", type=float, nargs="*", help="Z = 1/sqrt(c) of the noise sweep (default 2.5 ... 90; none: no sweep)")
    parser.add_argument("--sweep-seeds", type=int, help="how many of the seeds the noise sweep uses (default 1)")
    parser.add_argument("--trials", type=int, help="trials of the outer layout search (default 80)")
    parser.add_argument("--real-images", type=int, help="real images of the FD reference (default 1000)")
    parser.add_argument("--batch-size", type=int, help="images per pipeline call (default 64)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default 2)")
    parser.add_argument("--out-dir", type=Path, default=Path("reports"), help="where the report goes (default reports/: quality.md, quality.json, quality/)")
