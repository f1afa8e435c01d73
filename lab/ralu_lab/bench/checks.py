"""The arguments every ``ralu-bench`` subcommand shares, checked before its runner is imported
(a benchmark runs for minutes to hours: it must not start on arguments that can only fail, nor
end in "cannot write the report").  Each problem is one line: what is wrong, then the fix."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ralu.calibrate.clitools import check_writable
from ralu.runtime.schedule import Z_RANGE, OutputPathError, check_output_file

#: Counts that must be at least 1 (argument name -> option).
POSITIVE = {name: "--" + name.replace("_", "-") for name in ("threads", "trials", "batch_size", "images", "repeats", "real_images", "sweep_seeds", "budgets")}
#: Seeds are integers in [0, SEED_LIMIT): the runners add image and prompt indices to them,
#: and torch's generators take at most 64 bits.
SEED_LIMIT = 2**62


def problem(args: argparse.Namespace) -> str | None:
    """The first problem of ``args`` (a parsed ralu-bench command line), or None."""
    for name, option in POSITIVE.items():
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value < 1:
                return f"{option} {value}: must be at least 1. Fix: a positive count, or leave {option} out for the default"
    for name in ("seed", "seeds"):
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not 0 <= value < SEED_LIMIT:
                return f"--{name} {value}: seeds are integers in [0, 2**62). Fix: a smaller non-negative seed"
    for value in getattr(args, "z_values", None) or []:
        if not (math.isfinite(value) and Z_RANGE[0] <= value <= Z_RANGE[1]):
            return f"--z-values {value}: Z = 1/sqrt(c) must be a finite number in [{Z_RANGE[0]:g}, {Z_RANGE[1]:g}] (Z >= 2 is c <= 1/4). Fix: e.g. --z-values 2.5 8 30"
    threshold = getattr(args, "threshold", None)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        return f"--threshold {threshold}: must be a number in [0, 1]. Fix: e.g. --threshold 0.06"
    for name in ("out_dir", "work_dir"):
        folder = getattr(args, name, None)
        if folder is not None:
            found = folder_problem(Path(folder), "--" + name.replace("_", "-"))
            if found:
                return found
    if getattr(args, "out", None) is not None:
        try:
            check_writable(Path(args.out), "--out")
        except ValueError as error:
            return str(error)
    return None


def folder_problem(folder: Path, option: str) -> str | None:
    """Why ``folder`` cannot hold the reports (it is created if missing), or None."""
    try:
        if folder.is_dir():
            return None
        check_output_file(folder, option)  # a device, FIFO, link or bad name
    except OutputPathError as error:
        return str(error)
    except (OSError, ValueError) as error:
        return f"{option} {folder} cannot be used ({getattr(error, 'strerror', None) or error}). Fix: pass a writable folder"
    if folder.exists():
        return f"{option} {folder} is a file, not a folder. Fix: pass a folder (it is created if missing)"
    above = folder.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        return f"{option} {folder}: {above} is a file, not a folder. Fix: pass a folder path"
    return None
