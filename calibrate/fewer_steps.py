"""The honest alternative to a RALU schedule: the base model with fewer steps at the same
FLOPs budget, as a one-stage schedule (one full-resolution stage from noise to data on the
base grid, shift h0): exactly FluxPipeline's sampler on FLUX, and on SD3 plain Euler on a
grid slightly unlike StableDiffusion3Pipeline's own (docs/diffusers.md §4).

:func:`compare` scores a RALU schedule and that plain schedule with the progress-aware
error (docs/method.md §4b), so ``ralu-calibrate`` can say which the model expects to be
better, or that it cannot tell (:func:`verdict`).
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field

import numpy as np

from ralu.runtime.models import get_model
from ralu.runtime.schedule import Schedule, schedule_from_dict

from .densities import RESOLUTION_GAP, SHIFT_RATIO
from .flops import pricing
from .progress_model import load_progress_model
from .search import CONTINUOUS_GRID, Z_BOUNDS, NTDMObjective, StageLayout

#: c of a one-stage schedule: it has no transition, so c is never used; the file format
#: still needs a valid value (the largest, Z = 2).
ONE_STAGE_C = 1.0 / Z_BOUNDS[0] ** 2


def plain_steps_for(model: str, height: int, width: int, base_steps: int, target: float, convention: str = "linear") -> int:
    """Most steps of the plain sampler whose FLOPs speed-up still meets ``target`` (at least 1)."""
    name = get_model(model).name
    steps = 1
    while steps < base_steps and getattr(pricing.flops_speedup(name, height, width, [steps + 1], 0.0, base_steps), convention) >= target:
        steps += 1
    return steps


def plain_schedule(model: str, steps: int, height: int, width: int, h0: float, base_steps: int, tool_version: str = "0+unknown") -> Schedule:
    """``steps`` plain Euler steps on the base grid (shift ``h0``) as a one-stage schedule."""
    name = get_model(model).name
    speed = pricing.flops_speedup(name, height, width, [steps], 0.0, base_steps)
    distance = float(NTDMObjective(StageLayout((steps,), (1.0,)), h0).distance(np.array([[h0, Z_BOUNDS[0]]]))[0])
    data = {
        "version": 1,
        "model": name,
        "height": height,
        "width": width,
        "base_steps": base_steps,
        "stages": [{"steps": steps, "start": 0.0, "end": 1.0, "shift": float(h0)}],
        "c": ONE_STAGE_C,
        "up_ratio": 0.0,
        "divergence": {"js_distance": distance, "js_divergence": distance**2, "objective": "continuous"},
        "flops_speedup": {"total": speed.total, "linear": speed.linear},
        "transitions": [],
        "calibration": {
            "optimizer": "none (plain fewer-steps sampler)",
            "layout": "given",
            "target_speedup": None,
            "flops_convention": "linear",
            "seed": None,
            "h0": float(h0),
            "grid": CONTINUOUS_GRID,
            "z_bounds": [Z_BOUNDS[0], Z_BOUNDS[0]],
            "tool_version": tool_version,
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        },
    }
    return schedule_from_dict(data, f"plain {steps}-step schedule")


def progress_of(schedule: Schedule, gap: float = RESOLUTION_GAP, shift_ratio: float = SHIFT_RATIO) -> float:
    """The progress-aware error (docs/method.md §4b) of any schedule, at its own h0."""
    layout = StageLayout(tuple(s.steps for s in schedule.stages), tuple(s.end for s in schedule.stages))
    problem = NTDMObjective(layout, schedule.calibration.h0, "progress", z_bounds=(schedule.z, schedule.z), up_ratio=schedule.up_ratio, gap=gap, shift_ratio=shift_ratio)
    return float(problem.distance(np.array([[*(s.shift for s in schedule.stages), schedule.z]]))[0])


#: The three answers to "RALU or the plain sampler at this budget?".
RALU_BETTER, PLAIN_BETTER, CANNOT_TELL = "RALU better", "plain better", "cannot tell"


def verdict(ralu_error: float, plain_error: float, margin: float) -> str:
    """RALU or plain, by the progress errors J of both: the one with the lower J when the two
    differ by at least ``margin`` in ``|ln(J_plain / J_ralu)|``, else CANNOT_TELL (also for
    equal J).  The margin is the fitted model's (``calibrate/progress_model.json``): below it
    the measured orders the model was fitted to do not name the better one with the fit's
    confidence."""
    log_ratio = math.log(plain_error / ralu_error)
    if log_ratio != 0.0 and abs(log_ratio) >= margin:
        return RALU_BETTER if log_ratio > 0 else PLAIN_BETTER
    return CANNOT_TELL


@dataclass(frozen=True)
class Comparison:
    """A RALU schedule against the plain sampler at the same budget."""

    ralu_error: float
    plain: Schedule
    plain_error: float
    #: stages of the compared schedule (one stage: it is a plain sampler itself)
    stages: int = 3
    #: |ln(J_plain / J_ralu)| below which the answer is CANNOT_TELL
    margin: float = field(default_factory=lambda: load_progress_model().verdict_margin)

    @property
    def verdict(self) -> str | None:
        """RALU_BETTER, PLAIN_BETTER or CANNOT_TELL; None for a one-stage schedule (a plain sampler itself)."""
        return None if self.stages == 1 else verdict(self.ralu_error, self.plain_error, self.margin)

    def describe(self) -> str:
        steps = self.plain.stages[0].steps
        if self.stages == 1:
            return (
                f"  progress error (docs/method.md §4b, lower is better): {self.ralu_error:.4f}; a one-stage schedule is itself a plain sampler "
                f"(base grid when its shift is h0); the plain {steps}-step sampler at this budget scores {self.plain_error:.4f}"
            )
        said = {
            PLAIN_BETTER: f"the plain {steps}-step sampler is predicted BETTER at this budget: RALU's low-resolution stages do not pay for themselves here",
            RALU_BETTER: "RALU is predicted better than the plain sampler at this budget",
            CANNOT_TELL: (
                f"cannot tell which is better: the two differ by less than the fitted model's margin (|ln(J_plain / J_ralu)| = "
                f"{abs(math.log(self.plain_error / self.ralu_error)):.3f} < {self.margin:.3f}); measure it on your pipeline with --objective quality"
            ),
        }[self.verdict]
        return (
            f"  progress error (docs/method.md §4b, lower is better): RALU {self.ralu_error:.4f}; plain {steps} steps "
            f"({self.plain.flops_speedup.linear:.2f}x linear) {self.plain_error:.4f}: {said}"
        )


def compare(schedule: Schedule, convention: str = "linear", gap: float = RESOLUTION_GAP, tool_version: str = "0+unknown", shift_ratio: float = SHIFT_RATIO) -> Comparison:
    """Score ``schedule`` and the plain sampler with as many steps as its own speed-up allows."""
    target = getattr(schedule.flops_speedup, convention)
    steps = plain_steps_for(schedule.model, schedule.height, schedule.width, schedule.base_steps, target, convention)
    plain = plain_schedule(schedule.model, steps, schedule.height, schedule.width, schedule.calibration.h0, schedule.base_steps, tool_version)
    return Comparison(progress_of(schedule, gap, shift_ratio), plain, progress_of(plain, gap, shift_ratio), len(schedule.stages))
