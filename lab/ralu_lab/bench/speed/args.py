"""The ``ralu-bench speed`` command line: its arguments only (no torch, so ``--help`` stays cheap)."""

from __future__ import annotations

import argparse
from pathlib import Path

#: torch.compile backends the compile rows accept (inductor: the real one; aot_eager: traces the
#: same graphs but runs them eagerly, in seconds: --quick's default).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
QUICK_COMPILE_BACKEND = "aot_eager"

HELP = "wall-clock speed-up, overhead and peak memory of the runtime against plain diffusers pipelines"
EXAMPLES = (
    "examples:\n"
    "  ralu-bench speed --threads 1                 # the CPU report (reduced widths; 2 cores: about 30 min, 1.5 h with the cache rows)\n"
    "  ralu-bench speed --quick --out-dir /tmp/q    # CI: the same code path in well under a minute\n"
    "  ralu-bench speed --device cuda               # one GPU: real widths, bf16, absolute timings (< 10 min without the cache rows)\n"
    "  ralu-bench speed --threads 1 --compile       # also the rows with a compiled transformer (inductor; CPU: another 30-45 min)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny models at 256x256, one repeat: the same code path for CI")
    parser.add_argument("--widths", choices=("reduced", "full"), help="model widths: reduced (default on cpu) or the real ones (default on cuda)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--repeats", type=int, help="timed runs per method (default: quick 1, cpu 3, cuda 5)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--schedules", nargs="+", metavar="NAME", help="shipped schedules to measure (default: all)")
    parser.add_argument("--no-caches", dest="caches", action="store_false",
                        help="leave out the step-cache rows (each schedule with the quality harness's caches, and the plain pipeline of equal cost)")
    parser.add_argument("--compile", nargs="?", const="inductor", choices=COMPILE_BACKENDS, metavar="BACKEND",
                        help=f"add rows with the transformer compiled by torch.compile with BACKEND (default inductor; one of {', '.join(COMPILE_BACKENDS)}); "
                        "--quick always adds them, with aot_eager unless given")
    parser.add_argument("--out-dir", type=Path, default=Path("reports"), help="where speed.md and speed.json go (default reports/)")
    parser.add_argument("--name", default="speed", help="the report files' name: NAME.md and NAME.json (default speed)")
