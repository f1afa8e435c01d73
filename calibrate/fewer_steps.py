"""The honest alternative to a RALU schedule: the base model with fewer steps at the same
FLOPs budget, as a one-stage schedule (one full-resolution stage from noise to data on the
base grid, shift h0): exactly FluxPipeline's sampler on FLUX, and on SD3 plain Euler on a
grid slightly unlike StableDiffusion3Pipeline's own (docs/diffusers.md §4).

:func:`compare` scores a RALU schedule and that plain schedule with the progress-aware
error (docs/method.md §4b), so ``ralu-calibrate`` can say when fewer steps should win.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np

from ralu.runtime.models import get_model
from ralu.runtime.schedule import Schedule, schedule_from_dict

from .densities import RESOLUTION_GAP
from .flops import pricing
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


def progress_of(schedule: Schedule, gap: float = RESOLUTION_GAP) -> float:
    """The progress-aware error (docs/method.md §4b) of any schedule, at its own h0."""
    layout = StageLayout(tuple(s.steps for s in schedule.stages), tuple(s.end for s in schedule.stages))
    problem = NTDMObjective(layout, schedule.calibration.h0, "progress", z_bounds=(schedule.z, schedule.z), up_ratio=schedule.up_ratio, gap=gap)
    return float(problem.distance(np.array([[*(s.shift for s in schedule.stages), schedule.z]]))[0])


@dataclass(frozen=True)
class Comparison:
    """A RALU schedule against the plain sampler at the same budget."""

    ralu_error: float
    plain: Schedule
    plain_error: float
    #: stages of the compared schedule (one stage: it is a plain sampler itself)
    stages: int = 3

    @property
    def plain_wins(self) -> bool:
        return self.stages > 1 and self.plain_error <= self.ralu_error

    def describe(self) -> str:
        steps = self.plain.stages[0].steps
        if self.stages == 1:
            return (
                f"  progress error (docs/method.md §4b, lower is better): {self.ralu_error:.4f}; a one-stage schedule is itself a plain sampler "
                f"(base grid when its shift is h0); the plain {steps}-step sampler at this budget scores {self.plain_error:.4f}"
            )
        verdict = (
            f"the plain {steps}-step sampler is predicted BETTER at this budget: RALU's low-resolution stages do not pay for themselves here"
            if self.plain_wins
            else "RALU is predicted better than the plain sampler at this budget"
        )
        return (
            f"  progress error (docs/method.md §4b, lower is better): RALU {self.ralu_error:.4f}; plain {steps} steps "
            f"({self.plain.flops_speedup.linear:.2f}x linear) {self.plain_error:.4f}: {verdict}"
        )


def compare(schedule: Schedule, convention: str = "linear", gap: float = RESOLUTION_GAP, tool_version: str = "0+unknown") -> Comparison:
    """Score ``schedule`` and the plain sampler with as many steps as its own speed-up allows."""
    target = getattr(schedule.flops_speedup, convention)
    steps = plain_steps_for(schedule.model, schedule.height, schedule.width, schedule.base_steps, target, convention)
    plain = plain_schedule(schedule.model, steps, schedule.height, schedule.width, schedule.calibration.h0, schedule.base_steps, tool_version)
    return Comparison(progress_of(schedule, gap), plain, progress_of(plain, gap), len(schedule.stages))
