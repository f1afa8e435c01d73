"""ralu.runtime: load RALU schedules and run three-stage sampling in diffusers pipelines.

Light by design: never imports optuna, scipy or matplotlib.  Pipeline classes are imported
lazily so that reading a schedule does not pay for importing diffusers.
"""

from .schedule import (
    MODEL_FAMILIES,
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

__all__ = [
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
