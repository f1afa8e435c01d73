"""One call from a model and a target (or a layout) to a validated :class:`Schedule`."""

from __future__ import annotations

import datetime as _dt
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Literal

from ralu.runtime.models import check_resolution, get_model
from ralu.runtime.schedule import (
    Calibration,
    Divergence,
    FlopsSpeedup,
    Schedule,
    Stage,
    schedule_from_dict,
    stage_starts,
    transition,
)

from .layout_search import Convention, choose_up_ratio, largest_speedup, search_layout, speedup_of
from .search import Z_BOUNDS, StageLayout, NTDMObjective, Objective, optimise


def tool_version() -> str:
    try:
        return version("ralu")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


class SpeedupUnreachable(ValueError):
    """The requested speed-up exceeds what any layout can reach."""


def calibrate(
    model: str,
    *,
    speedup: float | None = None,
    steps: list[int] | None = None,
    ends: list[float] | None = None,
    up_ratio: float | None = None,
    height: int = 1024,
    width: int = 1024,
    h0: float | None = None,
    base_steps: int | None = None,
    optimizer: Literal["global", "paper"] = "global",
    objective: Objective = "continuous",
    grid: int | None = None,
    z_bounds: tuple[float, float] = Z_BOUNDS,
    flops_convention: Convention = "linear",
    trials: int = 80,
    seed: int = 0,
    storage: str | None = None,
    study_name: str | None = None,
    show_progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Schedule:
    """Calibrate a RALU schedule.

    Give either ``speedup`` (the outer Optuna search picks steps and ends) or ``steps`` and
    ``ends`` (a fixed layout; ``speedup``, if also given, is checked).  ``h0`` defaults to
    the model's real base shift at this resolution.
    """
    spec = get_model(model)
    check_resolution(height, width)
    base_steps = base_steps or spec.base_steps
    h0 = spec.base_shift(height, width) if h0 is None else float(h0)
    if h0 <= 0:
        raise ValueError(f"--h0 {h0} must be positive")
    if speedup is None and steps is None:
        raise ValueError("give a target (--speedup X) or a layout (--steps N1 N2 N3 --ends e1 e2 1.0)")
    if (steps is None) != (ends is None):
        raise ValueError("--steps and --ends go together: one number of steps and one end per stage")
    if up_ratio is not None and not 0.0 <= up_ratio <= 1.0:
        raise ValueError(f"--up-ratio {up_ratio} must lie in [0, 1]")
    if speedup is not None:
        if speedup <= 1.0:
            raise ValueError(f"--speedup {speedup} must be greater than 1")
        n_stages = 3 if steps is None else len(steps)
        reachable = largest_speedup(spec, height, width, base_steps, flops_convention, n_stages)
        if speedup > reachable:
            raise SpeedupUnreachable(
                f"a {speedup}x speed-up is not reachable for {spec.name} at {width}x{height} against {base_steps} steps: "
                f"the largest is {reachable:.2f}x ({flops_convention} FLOPs, one step per stage, up_ratio 0.1). "
                f"Fix: ask for at most {reachable:.1f}x"
            )

    layout_kind: Literal["given", "searched"]
    if steps is None:
        log(f"searching stage layouts for {speedup}x ({flops_convention} FLOPs), {trials} trials, seed {seed}")
        found = search_layout(
            spec, height, width, speedup, h0=h0, base_steps=base_steps, convention=flops_convention,
            objective=objective, grid=grid, z_bounds=z_bounds, optimizer=optimizer, up_ratio=up_ratio, trials=trials, seed=seed,
            storage=storage, study_name=study_name, show_progress=show_progress,
        )
        layout, inner = found.layout, found.inner
        ratio = found.up_ratio
        layout_kind = "searched"
        log(f"{found.feasible_trials}/{found.trials} trials met the target")
    else:
        layout = StageLayout(tuple(int(n) for n in steps), tuple(float(e) for e in ends))
        ratio = choose_up_ratio(spec, height, width, layout.steps, base_steps, speedup, flops_convention, fixed=up_ratio)
        if ratio is None:
            best = getattr(speedup_of(spec, height, width, layout.steps, 0.1, base_steps), flops_convention)
            raise SpeedupUnreachable(f"layout steps {list(layout.steps)} reaches only {best:.2f}x ({flops_convention} FLOPs) even at up_ratio 0.1, below --speedup {speedup}. Fix: fewer steps, or a lower --speedup")
        layout_kind = "given"
        inner = optimise(NTDMObjective(layout, h0, objective, grid, z_bounds), optimizer, seed=seed, effort="full")

    speed = speedup_of(spec, height, width, layout.steps, ratio, base_steps)
    if speedup is not None and getattr(speed, flops_convention) < speedup:
        raise SpeedupUnreachable(f"steps {list(layout.steps)} with up_ratio {ratio} reach {getattr(speed, flops_convention):.2f}x ({flops_convention} FLOPs), below --speedup {speedup}. Fix: a smaller --up-ratio, fewer steps or a lower target")

    starts = stage_starts(list(layout.ends), inner.c)
    problem = NTDMObjective(layout, h0, objective, grid, z_bounds)
    schedule = {
        "version": 1,
        "model": spec.name,
        "height": height,
        "width": width,
        "base_steps": base_steps,
        "stages": [Stage(steps=n, start=s, end=e, shift=h).model_dump() for n, s, e, h in zip(layout.steps, starts, layout.ends, inner.shifts)],
        "c": inner.c,
        "up_ratio": ratio,
        "divergence": Divergence(js_distance=inner.js_distance, js_divergence=inner.js_divergence, objective=objective).model_dump(),
        "flops_speedup": FlopsSpeedup(total=speed.total, linear=speed.linear).model_dump(),
        "transitions": [transition(e, inner.c, k + 1).model_dump() for k, e in enumerate(layout.ends[:-1])],
        "calibration": Calibration(
            optimizer=optimizer,
            layout=layout_kind,
            target_speedup=speedup,
            flops_convention=flops_convention,
            seed=seed,
            h0=h0,
            grid=problem.grid,
            z_bounds=problem.z_bounds,
            tool_version=tool_version(),
            created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        ).model_dump(),
    }
    return schedule_from_dict(schedule, f"calibrated for {spec.name}")
