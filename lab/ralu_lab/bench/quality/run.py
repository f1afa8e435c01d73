"""``ralu-bench quality``: the runner (testbed v2, :mod:`ralu_lab.bench.quality.v2.run`)."""

from __future__ import annotations

import argparse


def run_from_args(args: argparse.Namespace) -> int:
    from ralu_lab.bench.quality.v2.run import run_v2_from_args

    return run_v2_from_args(args)
