"""ralu.calibrate: offline NT-DM calibration of RALU schedules (scipy, Optuna, matplotlib).

>>> from ralu.calibrate import calibrate
>>> schedule = calibrate("flux", steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], up_ratio=0.1)  # doctest: +SKIP

The public names are imported on first use: the command-line tools import this package
before they can catch Ctrl-C, and numpy, scipy and Optuna take most of a second to load.
"""

#: Public name -> the module (in this package) that defines it.
_PUBLIC = {
    "SpeedupUnreachable": ".calibration",
    "calibrate": ".calibration",
    "InnerResult": ".search",
    "NTDMObjective": ".search",
    "StageLayout": ".search",
    "optimise_global": ".search",
    "optimise_paper": ".search",
}


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_PUBLIC)
