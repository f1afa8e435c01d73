"""``ralu-bench``: benchmarks of the RALU runtime, one subcommand per benchmark.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``: it adds
its subparser and sets ``run=callable(args) -> exit code`` as a default.  Adding a benchmark
is one more entry in :data:`SUBCOMMAND_MODULES`.  Modules are imported to build the parser,
so they must import cheaply (torch and diffusers inside the functions that run).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from typing import Sequence

#: Modules that register a subcommand, in the order ``--help`` lists them.
SUBCOMMAND_MODULES: tuple[str, ...] = ("ralu.calibrate.bench.speed", "ralu.calibrate.bench.quality", "ralu.calibrate.bench.magcache", "ralu.calibrate.bench.cache")

PROG = "ralu-bench"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Benchmarks of the RALU runtime against plain diffusers pipelines; each writes a Markdown and a JSON report.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    #: The command line as typed, for the reports' "regenerate" line.
    args.command_line = shlex.join([PROG, *argv])
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
