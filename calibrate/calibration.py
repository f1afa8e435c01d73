"""One call from a model and a target (or a layout) to a validated :class:`Schedule`."""

from __future__ import annotations

import datetime as _dt
import math
import numbers
import shlex
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

import numpy as np

from ralu.runtime.models import check_resolution, get_model
from ralu.runtime.plan import STAGE_ROLES
from ralu.runtime.schedule import (
    BASE_SHIFT_RANGE,
    MAX_RESOLUTION,
    MAX_STEPS,
    Z_RANGE,
    Calibration,
    Divergence,
    FlopsSpeedup,
    Schedule,
    Stage,
    schedule_from_dict,
    stage_starts,
    transition,
)

from .densities import RESOLUTION_GAP, SHIFT_RATIO
from .layout_search import Convention, choose_up_ratio, largest_speedup, search_layout, speedup_of
from .presets import PRESETS
from .progress_model import load_progress_model
from .search import DEFAULT_TRIALS, MIN_SIGNAL, OBJECTIVES, Z_BOUNDS, NTDMObjective, Objective, StageLayout, check_min_signal, default_objective, optimise

#: The file format's bounds (declared once, in ralu.runtime.schedule): a calibration that
#: could not be saved is refused before any work.
H0_RANGE = BASE_SHIFT_RANGE
Z_LIMIT = Z_RANGE[1]
MAX_SIDE = MAX_RESOLUTION
#: The runtime runs 1 (full), 2 (low, full) or 3 (low, mixed, full resolution) stages.
MAX_STAGES = max(STAGE_ROLES)
#: --shift-ratio: rho h0 must stay a shift the densities can use (docs/method.md §4b).
SHIFT_RATIO_RANGE = (0.05, 10.0)
#: Seeds go to numpy's and Optuna's generators, which take 0 <= seed < 2**32.
SEED_RANGE = (0, 2**32 - 1)


def tool_version() -> str:
    try:
        return version("ralu")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


class SpeedupUnreachable(ValueError):
    """The requested speed-up exceeds what any layout can reach."""


def published_layouts(model: str) -> tuple[tuple[StageLayout, float], ...]:
    """The stage layouts and up-ratios of ``model``'s published presets: the layout search's first trials."""
    return tuple((StageLayout(p.steps, p.ends), p.up_ratio) for p in PRESETS if p.model == model)


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
    min_signal: float | None = None,
    gap: float = RESOLUTION_GAP,
    shift_ratio: float = SHIFT_RATIO,
    flops_convention: Convention = "linear",
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    storage: str | None = None,
    study_name: str | None = None,
    show_progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Schedule:
    """Calibrate a RALU schedule.

    Give either ``speedup`` (the outer Optuna search picks steps and ends) or ``steps`` and
    ``ends`` (a fixed layout; ``speedup``, if also given, is checked).  ``h0`` defaults to
    the model's real base shift at this resolution.  ``objective="progress"`` minimises the
    progress-aware error of docs/method.md §4b (``gap``: its resolution gap g, ``shift_ratio``:
    its rho; both default to the fitted model's) instead of a
    JS distance; the file then records the schedule's continuous JS distance and names the
    objective in ``calibration.optimizer``.

    ``min_signal`` A: every transition keeps at least the signal A (``signal_scale``
    a = s_{k+1} / e_k), which caps Z (docs/method.md §4).  Default ``MIN_SIGNAL`` (0.1) with
    the global optimizer; 0 (no cap, the published method) with ``optimizer="paper"``.
    """
    spec = get_model(model)
    asked = {"h0": h0, "base_steps": base_steps, "min_signal": min_signal}  # given, or left to their defaults
    height = _whole("height", height, 1, MAX_SIDE)
    width = _whole("width", width, 1, MAX_SIDE)
    check_resolution(height, width)
    base_steps = spec.base_steps if base_steps is None else _whole("base_steps", base_steps, 1, MAX_STEPS)
    h0 = _base_shift(spec, height, width, h0, base_steps)
    _choice("optimizer", optimizer, ("global", "paper"))
    _choice("objective", objective, OBJECTIVES)
    _choice("flops_convention", flops_convention, ("total", "linear"))
    trials = _whole("trials", trials, 1, None)
    seed = _whole("seed", seed, *SEED_RANGE)
    grid = None if grid is None else _whole("grid", grid, 2, 10**6)
    z_bounds = _z_bounds(z_bounds)
    min_signal = _min_signal(min_signal, optimizer)
    gap = _real("gap", gap)
    if gap < 0.0:
        raise ValueError(f"--resolution-gap {gap:g} must be at least 0 (an RMS difference relative to the data's). Fix: e.g. {RESOLUTION_GAP}")
    shift_ratio = _real("shift_ratio", shift_ratio)
    if not SHIFT_RATIO_RANGE[0] <= shift_ratio <= SHIFT_RATIO_RANGE[1]:
        raise ValueError(f"--shift-ratio {shift_ratio:g} must lie in [{SHIFT_RATIO_RANGE[0]:g}, {SHIFT_RATIO_RANGE[1]:g}] (a fraction of the base shift h0). Fix: e.g. {SHIFT_RATIO}")
    if speedup is None and steps is None:
        raise ValueError("give a target (--speedup X) or a layout (--steps N1 N2 N3 --ends e1 e2 1.0)")
    if (steps is None) != (ends is None):
        raise ValueError("--steps and --ends go together: one number of steps and one end per stage")
    if steps is not None and (storage is not None or study_name is not None):
        raise ValueError("storage and study_name belong to the layout search, and a given layout (steps, ends) has none. Fix: drop --storage/--study-name, or search with --speedup alone")
    if steps is not None:
        steps, ends = _stage_steps(steps), _stage_ends(ends)
        if len(steps) != len(ends):
            raise ValueError(f"steps {steps} and ends {ends} differ in length. Fix: give one number of steps and one end per stage")
    if up_ratio is not None:
        up_ratio = _real("up_ratio", up_ratio)
        if not 0.0 <= up_ratio <= 1.0:
            raise ValueError(f"--up-ratio {up_ratio} must lie in [0, 1]")
    if speedup is not None:
        speedup = _real("speedup", speedup)
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
        found = search_layout(
            spec, height, width, speedup, h0=h0, base_steps=base_steps, convention=flops_convention,
            objective=objective, grid=grid, z_bounds=z_bounds, optimizer=optimizer, up_ratio=up_ratio, resolution_gap=gap, shift_ratio=shift_ratio, min_signal=min_signal, trials=trials, seed=seed,
            start_layouts=published_layouts(spec.name), storage=storage, study_name=study_name, show_progress=show_progress, log=log,
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
        inner = optimise(NTDMObjective(layout, h0, objective, grid, z_bounds, up_ratio=ratio, gap=gap, min_signal=min_signal, shift_ratio=shift_ratio), optimizer, seed=seed, effort="full")

    speed = speedup_of(spec, height, width, layout.steps, ratio, base_steps)
    if speedup is not None and getattr(speed, flops_convention) < speedup:
        reached = getattr(speed, flops_convention)
        raise SpeedupUnreachable(
            f"steps {list(layout.steps)} with up_ratio {ratio} reach {reached:.2f}x ({flops_convention} FLOPs), below --speedup {speedup}. "
            "Fix: a smaller --up-ratio, fewer steps or a lower target"
        )

    problem = NTDMObjective(layout, h0, objective, grid, z_bounds, up_ratio=ratio, gap=gap, min_signal=min_signal, shift_ratio=shift_ratio)
    _check_finite(problem, inner, h0)
    starts = stage_starts(list(layout.ends), inner.c)
    if objective == "progress":
        # A one-step stage's grid is its two ends whatever its shift, so J does not see that
        # shift (the optimiser leaves it anywhere): record the shift J prefers, rho h0.
        inner = replace(inner, shifts=tuple(shift_ratio * h0 if n == 1 else h for n, h in zip(layout.steps, inner.shifts)))
    command = equivalent_command(
        spec.name, speedup=speedup, steps=steps, ends=ends, up_ratio=up_ratio, height=height, width=width, h0=None if asked["h0"] is None else h0,
        base_steps=None if asked["base_steps"] is None else base_steps, optimizer=optimizer, objective=objective, z_bounds=z_bounds, min_signal=None if asked["min_signal"] is None else min_signal,
        gap=gap, shift_ratio=shift_ratio, flops_convention=flops_convention, trials=trials, seed=seed, storage=storage, study_name=study_name,
    )
    # The file records JS numbers; a progress-calibrated schedule records its continuous JS
    # distance (what the densities say of it) and names the objective in the optimizer.
    recorded, recorded_objective, optimizer_record = inner.js_distance, objective, optimizer
    if objective == "progress":
        recorded_objective, optimizer_record = "continuous", f"{optimizer}, progress objective"
        recorded = float(NTDMObjective(layout, h0, "continuous", None, z_bounds).distance(np.array([[*inner.shifts, inner.z]]))[0])
    schedule = {
        "version": 1,
        "model": spec.name,
        "height": height,
        "width": width,
        "base_steps": base_steps,
        "stages": [Stage(steps=n, start=s, end=e, shift=h).model_dump() for n, s, e, h in zip(layout.steps, starts, layout.ends, inner.shifts)],
        "c": inner.c,
        "up_ratio": ratio,
        "divergence": Divergence(js_distance=recorded, js_divergence=recorded**2, objective=recorded_objective).model_dump(),
        "flops_speedup": FlopsSpeedup(total=speed.total, linear=speed.linear).model_dump(),
        "transitions": [transition(e, inner.c, k + 1).model_dump() for k, e in enumerate(layout.ends[:-1])],
        "calibration": Calibration(
            optimizer=optimizer_record,
            layout=layout_kind,
            target_speedup=speedup,
            flops_convention=flops_convention,
            seed=seed,
            h0=h0,
            grid=problem.grid,
            z_bounds=problem.z_bounds,
            min_signal=problem.min_signal,
            tool_version=tool_version(),
            created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            command=command,
            objective=objective,
            progress_model=load_progress_model().version,
        ).model_dump(),
    }
    return schedule_from_dict(schedule, f"calibrated for {spec.name}")


def equivalent_command(model: str, *, speedup, steps, ends, up_ratio, height, width, h0, base_steps, optimizer, objective, z_bounds, min_signal, gap, shift_ratio,
                       flops_convention, trials, seed, storage, study_name) -> str:
    """The ``ralu-calibrate`` command that makes the same schedule: the model, the target or
    layout, and every option that differs from its default (``h0``, ``base_steps`` and
    ``min_signal``: None when left to their defaults)."""
    words = ["ralu-calibrate", "--model", model]
    if speedup is not None:
        words += ["--speedup", _word(speedup)]
    if steps is not None:
        words += ["--steps", *(_word(n) for n in steps), "--ends", *(_word(e) for e in ends)]
    options = [
        ("--up-ratio", up_ratio, None), ("--height", height, 1024), ("--width", width, 1024), ("--h0", h0, None), ("--base-steps", base_steps, None),
        ("--optimizer", optimizer, "global"), ("--objective", objective, default_objective(steps is None, optimizer)),
        ("--resolution-gap", gap, RESOLUTION_GAP), ("--shift-ratio", shift_ratio, SHIFT_RATIO), ("--min-signal", min_signal, None),
        ("--flops", flops_convention, "linear"), ("--trials", trials if steps is None else None, DEFAULT_TRIALS if steps is None else None),
        ("--seed", seed, 0), ("--storage", storage, None), ("--study-name", study_name, None),
    ]
    for flag, value, default in options:
        if value != default:
            words += [flag, _word(value)]
    if tuple(z_bounds) != Z_BOUNDS:
        words += ["--z-bounds", *(_word(z) for z in z_bounds)]
    return " ".join(shlex.quote(w) for w in words)


def _word(value) -> str:
    """A value as the command line takes it back exactly: ``7`` for 7.0, every digit otherwise."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


# ----------------------------------------------------------------------------------------
# Argument checks: every input is refused up front with its name and a fix, rather than
# truncated, overflowing mid-search, or turning into NaN in the written file.
# ----------------------------------------------------------------------------------------


def _real(name: str, value) -> float:
    try:
        number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int beyond the float range
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{name}={value!r} must be a finite number. Fix: pass a plain number such as 3.0")
    return number


def _whole(name: str, value, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} must be a whole number. Fix: pass an int such as {low}")
    if value < low or (high is not None and value > high):
        limit = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name}={value} must be {limit}. Fix: pass a value {limit}")
    return int(value)


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is unknown. Fix: use one of {list(allowed)}")


def _sequence(name: str, values) -> list:
    # A string is a sequence too: "235" must not read as [2, 3, 5].
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
        raise ValueError(f"{name}={values!r} must be a list of numbers, one per stage. Fix: e.g. {name}=[2, 3, 5]")
    return list(values)


def _stage_steps(steps) -> list[int]:
    steps = _sequence("steps", steps)
    if not 1 <= len(steps) <= MAX_STAGES:
        raise ValueError(f"steps {steps}: {len(steps)} stages, but the runtime runs 1 to {MAX_STAGES} (low, mixed, full resolution). Fix: give 1 to {MAX_STAGES} stages")
    return [_whole("steps", n, 1, MAX_STEPS) for n in steps]


def _stage_ends(ends) -> list[float]:
    return [_real("ends", e) for e in _sequence("ends", ends)]


def _z_bounds(bounds) -> tuple[float, float]:
    bounds = _sequence("z_bounds", bounds)
    if len(bounds) != 2:
        raise ValueError(f"z_bounds {bounds} must be two numbers, LOW and HIGH. Fix: e.g. z_bounds=({Z_BOUNDS[0]:g}, {Z_BOUNDS[1]:g})")
    low, high = (_real("z_bounds", z) for z in bounds)
    if not Z_BOUNDS[0] <= low <= high <= Z_LIMIT:
        raise ValueError(
            f"Z bounds [{low:g}, {high:g}]: need {Z_BOUNDS[0]:g} <= LOW <= HIGH <= {Z_LIMIT:g} (Z = 1/sqrt(c) >= 2 keeps c <= 1/4; "
            f"beyond {Z_LIMIT:g} every stage restarts from pure noise). Fix: e.g. --z-bounds {Z_BOUNDS[0]:g} {Z_BOUNDS[1]:g}; equal values fix Z"
        )
    return low, high


def _min_signal(value, optimizer: str) -> float:
    if value is None:
        # The published method has no such bound; its runs stay as they were.
        return 0.0 if optimizer == "paper" else MIN_SIGNAL
    return check_min_signal(value)


def _base_shift(spec, height: int, width: int, h0, base_steps: int) -> float:
    """h0: given, or the base model's own shift for the baseline's ``base_steps`` steps (FLUX.2's
    shift depends on the step count)."""
    if h0 is not None:
        h0 = _real("h0", h0)
        if not H0_RANGE[0] <= h0 <= H0_RANGE[1]:
            raise ValueError(f"--h0 {h0:g} is outside [{H0_RANGE[0]:g}, {H0_RANGE[1]:g}], where the divergence can be computed. Fix: a base shift such as 3")
        return h0
    try:
        own = spec.base_shift(height, width, base_steps)
    except OverflowError:
        own = math.inf
    if not H0_RANGE[0] <= own <= H0_RANGE[1]:
        raise ValueError(
            f"{spec.name}'s own base shift at {width}x{height} is {own:.3g}, outside [{H0_RANGE[0]:g}, {H0_RANGE[1]:g}] where the divergence "
            "can be computed (dynamic shifting extrapolated far past its fitted range). Fix: a smaller --height/--width, or give --h0"
        )
    return own


def _check_finite(problem: NTDMObjective, inner, h0: float) -> None:
    """The search must not report a divergence computed from overflowed densities."""
    target, realised = problem.distributions(np.array([*inner.shifts, inner.z]))
    numbers_found = [*inner.shifts, inner.z, inner.js_distance]
    if not (np.isfinite(target).all() and np.isfinite(realised).all() and all(math.isfinite(x) for x in numbers_found)):
        raise ValueError(f"the divergence is not finite for h0 = {h0:g} and this layout (the densities overflow). Fix: a base shift --h0 nearer 3, or another layout")
