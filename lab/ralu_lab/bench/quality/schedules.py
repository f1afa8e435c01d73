"""The RALU schedules of the table: the published preset, our calibration of its layout, our searched layout."""

from __future__ import annotations

import datetime as _dt

import numpy as np

from ralu.calibrate.calibration import calibrate, tool_version
from ralu.calibrate.flops.pricing import flops_speedup
from ralu.calibrate.presets import PAPER_H0, PAPER_SIZE, PublishedPreset
from ralu.calibrate.search import Z_BOUNDS, NTDMObjective, StageLayout
from ralu.runtime.schedule import schedule_from_dict, stage_starts, transition
from ralu_lab.bench.quality.config import BASE_STEPS, PAPER_PRESETS


def paper_schedule(budget: int, size: int, preset: PublishedPreset | None = None, base_steps: int = BASE_STEPS):
    """The published preset for ``budget`` (docs/method.md §5; the FLUX one unless ``preset``
    is given, with its model's ``base_steps``) as a schedule at ``size`` px."""

    p = PAPER_PRESETS[budget] if preset is None else preset
    c = p.c
    problem = NTDMObjective(StageLayout(p.steps, p.ends), PAPER_H0)
    distance = float(problem.distance(np.array([[*p.shifts, p.z]]))[0])
    speed = flops_speedup(p.model, PAPER_SIZE, PAPER_SIZE, list(p.steps), p.up_ratio)
    starts = stage_starts(list(p.ends), c)
    data = {
        "version": 1,
        "model": p.model,
        "height": size,
        "width": size,
        "base_steps": base_steps,
        "stages": [{"steps": n, "start": s, "end": e, "shift": h} for n, s, e, h in zip(p.steps, starts, p.ends, p.shifts)],
        "c": c,
        "up_ratio": p.up_ratio,
        "divergence": {"js_distance": distance, "js_divergence": distance**2, "objective": "continuous"},
        "flops_speedup": {"total": speed.total, "linear": speed.linear},
        "transitions": [transition(e, c, k + 1).model_dump() for k, e in enumerate(p.ends[:-1])],
        "calibration": {
            "optimizer": "published",
            "layout": "given",
            "target_speedup": None,
            "flops_convention": "linear",
            "seed": None,
            "h0": PAPER_H0,
            "grid": problem.grid,
            "z_bounds": list(problem.z_bounds),
            "tool_version": tool_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        },
    }
    return schedule_from_dict(data, f"published {p.name} preset")


def ours_schedule(budget: int, size: int, h0: float, optimizer: str = "global", z_bounds: tuple[float, float] | None = None, preset: PublishedPreset | None = None):
    """Our calibration of the preset's layout (the FLUX one of ``budget`` unless ``preset``)
    at the testbed's h0 (global optimiser), at ``size`` px.

    Given ``z_bounds`` (the noise-strength sweep) are taken as they are, with no
    kept-signal bound: the sweep measures large Z on purpose."""
    p = PAPER_PRESETS[budget] if preset is None else preset
    return calibrate(
        p.model, steps=list(p.steps), ends=list(p.ends), up_ratio=p.up_ratio, height=size, width=size,
        h0=h0, optimizer=optimizer, z_bounds=z_bounds or Z_BOUNDS, min_signal=None if z_bounds is None else 0.0, flops_convention="total",
    )


def searched_schedule(budget: int, size: int, h0: float, trials: int, *, move, seed: int = 0, preset: PublishedPreset | None = None):
    """Our outer layout search for the preset's budget, moved to the testbed by ``move`` (a
    schedule -> the schedule at the testbed's size).

    The search prices layouts with FLUX.1-dev's cost model, which at the testbed's 64 px would
    be dominated by FLUX's 512 text tokens; so it runs at 1024 px (4096 image tokens, the
    resolution whose base shift equals the testbed's h0) for the preset's FLUX total-FLOPs
    speed-up there, and the schedule is then moved to the testbed's size.
    """
    p = PAPER_PRESETS[budget] if preset is None else preset
    target = flops_speedup(p.model, PAPER_SIZE, PAPER_SIZE, list(p.steps), p.up_ratio).total
    found = calibrate(p.model, speedup=round(target, 3), h0=h0, flops_convention="total", trials=trials, seed=seed)
    return move(found)
