"""ralu.calibrate: offline NT-DM calibration of RALU schedules (scipy, Optuna, matplotlib).

>>> from ralu.calibrate import calibrate
>>> schedule = calibrate("flux", steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], up_ratio=0.1)  # doctest: +SKIP
"""

from .calibration import SpeedupUnreachable, calibrate
from .search import (
    InnerResult,
    NTDMObjective,
    StageLayout,
    optimise_global,
    optimise_paper,
)

__all__ = ["InnerResult", "NTDMObjective", "SpeedupUnreachable", "StageLayout", "calibrate", "optimise_global", "optimise_paper"]
