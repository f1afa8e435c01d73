"""``ralu-bench``: benchmarks of the RALU runtime, one subcommand per benchmark.

Each subcommand is two modules: a light one that declares its arguments (``HELP``,
``EXAMPLES``, ``add_arguments(parser)``; importing it costs no torch) and the one that runs it
(``run_from_args(args) -> exit code``), imported only when that subcommand runs.  The
subcommand's description is the first paragraph of its package's docstring.  Adding a
benchmark is one more entry in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Subcommand(NamedTuple):
    package: str  # its docstring describes the subcommand
    arguments: str  # module with HELP, EXAMPLES and add_arguments(parser)
    runner: str  # module with run_from_args(args) -> exit code


#: The subcommands, in the order ``--help`` lists them.
SUBCOMMANDS: dict[str, Subcommand] = {
    name: Subcommand(f"ralu_lab.bench.{name}", f"ralu_lab.bench.{name}.args", f"ralu_lab.bench.{name}.run")
    for name in ("speed", "quality", "magcache", "cache")
}

PROG = "ralu-bench"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Benchmarks of the RALU runtime against plain diffusers pipelines; each writes a Markdown and a JSON report.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, sub in SUBCOMMANDS.items():
        arguments = importlib.import_module(sub.arguments)
        subparser = subparsers.add_parser(
            name,
            help=arguments.HELP,
            description=(importlib.import_module(sub.package).__doc__ or "").split("\n\n")[0],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=arguments.EXAMPLES,
        )
        arguments.add_arguments(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    #: The command line as typed, for the reports' "regenerate" line.
    args.command_line = shlex.join([PROG, *argv])
    from .checks import problem

    prog = f"{PROG} {args.command}"
    found = problem(args)  # before the runner (and torch) is imported, and long before any report is written
    if found is not None:
        print(f"{prog}: error: {' '.join(found.split())}", file=sys.stderr)
        return 2
    runner = importlib.import_module(SUBCOMMANDS[args.command].runner)
    try:
        return int(runner.run_from_args(args) or 0)
    except OSError as error:  # a full disk, a read-only file system, a report file taken by a device or link
        where = f" ({error.filename})" if error.filename else ""
        print(f"{prog}: error: {error.strerror or error}{where}. Fix: free space, or pass a writable --out-dir / --out", file=sys.stderr)
        return 2
    except ValueError as error:
        from ralu.runtime.schedule import OutputPathError

        if not isinstance(error, OutputPathError):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
