"""What the benchmarks share: number formats of the Markdown reports, statistics over runs and
seeds, Markdown tables declared as columns, and writing a report's files.

Imports nothing heavy: the reports can be re-rendered from their JSON without torch.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ralu.runtime.schedule import write_text_atomic

# ----------------------------------------------------------------------------------------
# Number formats ("n/a" where a figure is missing).
# ----------------------------------------------------------------------------------------


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def num_std(value: float | None, std: float | None = None, digits: int = 2) -> str:
    """``value ± std`` (the std only where there is one)."""
    text = num(value, digits)
    return text if value is None or std is None else f"{text} ± {std:.{digits}f}"


def pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f} %"


def times(value: float | None, digits: int = 2) -> str:
    """A speed-up: ``4.00x``."""
    return "n/a" if value is None else f"{value:.{digits}f}x"


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def mark(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "**no**")


# ----------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value), as numpy computes them."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


# ----------------------------------------------------------------------------------------
# Markdown tables.
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a Markdown table: its header and how a row gives its cell."""

    header: str
    cell: Callable[[Any], str]


def table(columns: Sequence[Column], rows: Sequence[Any]) -> list[str]:
    """Header, rule and one line per row."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return lines


# ----------------------------------------------------------------------------------------
# Files and the command line.
# ----------------------------------------------------------------------------------------


def json_text(data: Any) -> str:
    """The reports' JSON: indented, no NaN or infinity."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def write_report(out_dir: Path, name: str, markdown: str, data: Any) -> tuple[Path, Path]:
    """``name.md`` and ``name.json`` in ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    json_path = write_text_atomic(out_dir / f"{name}.json", json_text(data))
    md_path = write_text_atomic(out_dir / f"{name}.md", markdown)
    return md_path, json_path


def fail(command: str, error: Exception | str) -> int:
    """One line on stderr and the usage-error exit code."""
    print(f"{command}: {error}", file=sys.stderr)
    return 2


def render_from_json(argv: Sequence[str], module: str, render: Callable[[str], str]) -> int:
    """``python -m MODULE REPORT_JSON``: print ``render(json_text)``, the report's Markdown."""
    asked = list(argv[:1]) in (["-h"], ["--help"])
    if asked or len(argv) != 1:
        print(f"usage: python -m {module} REPORT_JSON", file=sys.stderr)
        return 0 if asked else 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"python -m {module}: no report file {path}. Fix: give the JSON a report run wrote", file=sys.stderr)
        return 2
    sys.stdout.write(render(path.read_text()))
    return 0
