"""The fitted terms of the progress-aware objective (docs/method.md §4b), read from the one
data file that holds them, ``calibrate/progress_model.json``.

The file is written by the lab's fit (its ``command`` field says how to regenerate it): the
terms are fitted to the order of measured image scores, and the verdict margin comes from
the same fit.  Every default of the product (``densities.RESOLUTION_GAP``,
``densities.SHIFT_RATIO``, the "RALU or plain" margin of :mod:`.fewer_steps`) is read from
here, so a refit changes them all at once.  Importing this module reads only the standard
library and that file.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

MODEL_NAME = "progress_model.json"
MODEL_FORMAT = 1


@dataclass(frozen=True)
class ProgressModel:
    """The free terms of J and what a difference in J is worth."""

    #: Identifies the fit; schedule files record it (``calibration.progress_model``).
    version: str
    #: g: RMS error of a low-resolution estimate, relative to the data's, as J counts it.
    resolution_gap: float
    #: rho: a step's error is uniform in u = F_{rho h0}(t) (rho = 1: the base model's own grid).
    shift_ratio: float
    #: |ln(J_plain / J_ralu)| below which the fit cannot tell which of the two is better.
    verdict_margin: float
    #: The probability the margin stands for (the fit's order model at the margin).
    verdict_confidence: float


def model_path() -> Path:
    return Path(str(resources.files("ralu.calibrate").joinpath(MODEL_NAME)))


def _number(data: dict, path: str, low: float, high: float) -> float:
    value = data
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{model_path()}: {path} must be a number in [{low:g}, {high:g}], got {value!r}. Fix: regenerate the file with its recorded command")
    return float(value)


@functools.lru_cache(maxsize=1)
def load_progress_model() -> ProgressModel:
    """The shipped fit; a one-line ValueError naming the fix when the file is unusable."""
    path = model_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the progress model {path}: {error}. Fix: reinstall ralu, or regenerate the file with its recorded command") from None
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT or not isinstance(data.get("version"), str):
        raise ValueError(f"{path}: not a progress model of format {MODEL_FORMAT} with a version string. Fix: regenerate it with its recorded command")
    return ProgressModel(
        version=data["version"],
        resolution_gap=_number(data, "terms.resolution_gap.value", 0.0, 10.0),
        shift_ratio=_number(data, "terms.shift_ratio.value", 0.05, 10.0),
        verdict_margin=_number(data, "verdict.margin", 0.0, 10.0),
        verdict_confidence=_number(data, "verdict.confidence", 0.5, 1.0),
    )
