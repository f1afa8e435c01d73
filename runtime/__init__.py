"""ralu.runtime: load RALU schedules and run three-stage sampling in diffusers pipelines.

Light by design: never imports optuna, scipy or matplotlib.  Pipeline classes are imported
lazily so that reading a schedule does not pay for importing diffusers.
"""

from .models import FAMILIES, MODEL_FAMILIES
from .schedule import (
    SCHEDULE_VERSION,
    Schedule,
    ScheduleError,
    Stage,
    TransitionCoefficients,
    load_schedule,
    save_schedule,
    schedule_json_schema,
    shipped_schedules,
    stage_sigmas,
    transition,
)

#: RALU pipeline class -> its module, one per family (ralu.runtime.models.FAMILIES).
_LAZY = {family.pipeline: f".{family.module}" for family in FAMILIES.values()}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "FAMILIES",
    "MODEL_FAMILIES",
    "SCHEDULE_VERSION",
    "Schedule",
    "ScheduleError",
    "Stage",
    "TransitionCoefficients",
    "load_schedule",
    "save_schedule",
    "schedule_json_schema",
    "shipped_schedules",
    "stage_sigmas",
    "transition",
]
