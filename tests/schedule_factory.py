"""Hand-made, valid schedule dictionaries for tests (no calibration needed)."""

from __future__ import annotations

import copy

from ralu.runtime.schedule import stage_starts, transition


def schedule_dict(
    model: str = "flux-dev",
    steps=(2, 3, 5),
    ends=(0.2, 0.3, 1.0),
    shifts=(7.4, 2.7, 2.1),
    c: float = 1 / 7.8**2,
    up_ratio: float = 0.1,
    height: int = 1024,
    width: int = 1024,
    base_steps: int = 50,
) -> dict:
    starts = stage_starts(list(ends), c)
    return copy.deepcopy(
        {
            "version": 1,
            "model": model,
            "height": height,
            "width": width,
            "base_steps": base_steps,
            "stages": [{"steps": n, "start": s, "end": e, "shift": h} for n, s, e, h in zip(steps, starts, ends, shifts)],
            "c": c,
            "up_ratio": up_ratio,
            "divergence": {"js_distance": 0.03, "js_divergence": 0.0009, "objective": "continuous"},
            "flops_speedup": {"total": 6.0, "linear": 7.0},
            "transitions": [transition(e, c, k + 1).model_dump() for k, e in enumerate(ends[:-1])],
            "calibration": {
                "optimizer": "manual",
                "layout": "given",
                "target_speedup": None,
                "flops_convention": "linear",
                "seed": None,
                "h0": 3.0,
                "grid": 1000,
                "z_bounds": [2.0, 100.0],
                "tool_version": "test",
                "created": "2026-01-01T00:00:00+00:00",
            },
        }
    )
