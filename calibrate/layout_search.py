"""The outer search: which three-stage layout meets a FLOPs speed-up target with the lowest
objective.  Optuna (TPE, seeded) over a small space; each trial runs a quick inner search of
shifts and Z, the winner a full one.

**Budget-filling layouts** (:mod:`.budget`, as the quality search draws them): a trial draws
the weight of each stage's share of the steps, the up-ratio r and the stage ends; its steps
are as many as the budget affords in those proportions.  Every draw so meets the target and
spends it.  (Before, each stage's steps were drawn on their own: most draws missed the target
or left budget unspent, and a rule, speed-up at most 10 % above the target, had to keep the JS
objectives, which do not see how many steps a layout takes, from answering 7x with a 12x
layout.  On testbed v2 the quality search found its best schedules only once it drew layouts
this way: reports/experiments/quality-search-v2/budget-filling/.)

The up-ratio r is drawn among UP_RATIO_CHOICES (``--up-ratio`` fixes it): more tokens
upsampled early costs steps elsewhere, a trade the progress objective weighs (docs/method.md
§4b) and the JS objectives see only through the steps left.

**Stage ends** are searched on a 0.05 grid within ``FIRST_END_RANGE`` and ``SECOND_END_RANGE``:
the range of the measured schedules the progress model is fitted to (docs/method.md §4b,
"fitted terms").  Beyond it the fitted J prefers ever later ends, where no measurement checks
it (its residuals already grow with the second end inside the range).

``start_layouts`` (``calibrate`` passes the model's published presets, with their own steps
and up-ratio) are the study's first trials, so the search returns a layout at least as good,
by its own objective, as any of them that meets the target.

With ``min_signal`` every trial's inner search caps Z so that each transition keeps that
signal (:func:`ralu.calibrate.search.z_ceiling`); a layout whose cap falls below the
lowest Z searched is infeasible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import optuna
from optuna.study import MaxTrialsCallback

from ralu.runtime.models import ModelSpec

from . import study as shared
from .budget import STAGE_WEIGHT, budget_steps
from .densities import RESOLUTION_GAP, SHIFT_RATIO
from .flops import pricing as flops
from .search import Z_BOUNDS, InnerResult, NTDMObjective, Objective, SignalUnreachable, StageLayout, optimise, z_ceiling

#: Candidate up-sampling ratios, largest first (a given layout takes the largest meeting its target).
UP_RATIO_CHOICES = (0.30, 0.25, 0.20, 0.15, 0.10)
#: Ends are searched on this grid: e1 in FIRST_END_RANGE, e2 - e1 in SECOND_GAP_RANGE, and e2
#: at most SECOND_END_MAX (see the module docstring).
END_STEP = 0.05
FIRST_END_RANGE = (0.10, 0.35)
SECOND_GAP_RANGE = (0.05, 0.30)
SECOND_END_MAX = 0.60
#: Trial attribute holding the steps of an enqueued start layout (it keeps its own).
GIVEN_STEPS_ATTR = "given_steps"

Convention = Literal["total", "linear"]


def infeasible_floor(objective: Objective) -> float:
    """Value above every feasible trial's, from which infeasible trials are ranked: a JS
    distance is at most sqrt(ln 2) < 1; the progress error of a runnable layout (one step
    per stage, restarts below the data) stays far below 1e3."""
    return 1e3 if objective == "progress" else 1.0


def speedup_of(spec: ModelSpec, height: int, width: int, steps, up_ratio: float, base_steps: int) -> flops.Flops:
    return flops.flops_speedup(spec.name, height, width, list(steps), up_ratio, base_steps=base_steps)


def choose_up_ratio(spec: ModelSpec, height: int, width: int, steps, base_steps: int, target: float | None, convention: Convention, fixed: float | None = None) -> float | None:
    """A given layout's up-ratio: the largest r in UP_RATIO_CHOICES meeting the target, or None.

    A ``fixed`` ratio (``--up-ratio``) is the only candidate when given."""
    candidates = UP_RATIO_CHOICES if fixed is None else (fixed,)
    if target is None or len(steps) != 3:
        return candidates[0]
    for ratio in candidates:
        if getattr(speedup_of(spec, height, width, steps, ratio, base_steps), convention) >= target:
            return ratio
    return None


def largest_speedup(spec: ModelSpec, height: int, width: int, base_steps: int, convention: Convention, n_stages: int = 3) -> float:
    """The best any layout can do: one step per stage at the smallest allowed ratio."""
    return getattr(flops.max_speedup(spec.name, height, width, min(UP_RATIO_CHOICES), n_stages=n_stages, base_steps=base_steps), convention)


@dataclass
class LayoutSearchResult:
    layout: StageLayout
    up_ratio: float
    inner: InnerResult
    speedup: flops.Flops
    trials: int
    feasible_trials: int
    history: list[dict] = field(default_factory=list)


def on_end_grid(value: float) -> bool:
    return abs(value / END_STEP - round(value / END_STEP)) < 1e-9


def layout_params(layout: StageLayout, up_ratio: float) -> dict[str, float] | None:
    """The trial parameters of a start layout (its steps travel as GIVEN_STEPS_ATTR; the
    weights are its shares, clipped into the drawn range), or None when its ends or
    up-ratio lie outside the searched space."""
    if len(layout.steps) != 3 or up_ratio not in UP_RATIO_CHOICES:
        return None
    first, gap = layout.ends[0], round(layout.ends[1] - layout.ends[0], 2)
    inside = FIRST_END_RANGE[0] <= first <= FIRST_END_RANGE[1] and SECOND_GAP_RANGE[0] <= gap <= SECOND_GAP_RANGE[1] and layout.ends[1] <= SECOND_END_MAX + 1e-9
    if not (on_end_grid(first) and on_end_grid(gap) and inside):
        return None
    weights = [min(max(n / layout.steps[-1], STAGE_WEIGHT[0]), STAGE_WEIGHT[1]) for n in layout.steps[:-1]]
    return {"weight_1": weights[0], "weight_2": weights[1], "up_ratio": up_ratio, "end_1": float(first), "gap_2": float(gap)}


def search_layout(
    spec: ModelSpec,
    height: int,
    width: int,
    target: float,
    *,
    h0: float,
    base_steps: int,
    convention: Convention = "linear",
    objective: Objective = "continuous",
    grid: int | None = None,
    z_bounds: tuple[float, float] = Z_BOUNDS,
    optimizer: Literal["global", "paper"] = "global",
    up_ratio: float | None = None,
    resolution_gap: float = RESOLUTION_GAP,
    shift_ratio: float = SHIFT_RATIO,
    min_signal: float = 0.0,
    start_layouts: tuple[tuple[StageLayout, float], ...] = (),
    trials: int = 80,
    seed: int = 0,
    storage: str | None = None,
    study_name: str | None = None,
    show_progress: bool = True,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> LayoutSearchResult:
    """Minimise the objective over budget-filling three-stage layouts meeting ``target``.

    ``start_layouts``: (layout, up-ratio) pairs run first with their own steps.  ``trials``
    is the number of finished trials the study ends with: with a shared ``storage`` it counts
    those of earlier runs and of other workers (see :mod:`ralu.calibrate.study`)."""
    # The kept signal rises with the first end, so the latest first end is the best case.
    best_case = z_ceiling((FIRST_END_RANGE[1], 1.0), min_signal)
    if best_case < z_bounds[0]:
        raise SignalUnreachable(
            f"--min-signal {min_signal:g} needs Z <= {best_case:.4g} even with the latest first end searched ({FIRST_END_RANGE[1]:g}), "
            f"below the lowest Z searched, {z_bounds[0]:g}. Fix: a lower --min-signal (0 for no limit) or a lower --z-bounds LOW"
        )
    # No layout takes more steps than the whole budget spent on its cheapest (low-res) stage.
    limit = 4 * max(1, math.ceil(base_steps / target)) + 3
    floor = infeasible_floor(objective)
    inner_cache: dict[tuple, InnerResult] = {}

    def speed(steps: tuple[int, ...], ratio: float) -> float:
        return getattr(speedup_of(spec, height, width, steps, ratio, base_steps), convention)

    def inner_search(steps: tuple[int, ...], ends: tuple[float, ...], ratio: float) -> InnerResult:
        key = (steps, ends, ratio)
        if key not in inner_cache:
            problem = NTDMObjective(StageLayout(steps, ends), h0, objective, grid, z_bounds, up_ratio=ratio, gap=resolution_gap, min_signal=min_signal, shift_ratio=shift_ratio)
            inner_cache[key] = optimise(problem, optimizer, seed=seed, effort="quick")
        return inner_cache[key]

    def run_trial(trial: optuna.Trial) -> float:
        weights = (trial.suggest_float("weight_1", *STAGE_WEIGHT, log=True), trial.suggest_float("weight_2", *STAGE_WEIGHT, log=True), 1.0)
        ratio = up_ratio if up_ratio is not None else trial.suggest_categorical("up_ratio", list(UP_RATIO_CHOICES))
        first = round(trial.suggest_float("end_1", *FIRST_END_RANGE, step=END_STEP), 2)
        gap = round(trial.suggest_float("gap_2", *SECOND_GAP_RANGE, step=END_STEP), 2)
        ends = (first, round(first + gap, 2), 1.0)
        given = trial.user_attrs.get(GIVEN_STEPS_ATTR)
        steps = tuple(int(n) for n in given) if given is not None else budget_steps(lambda s, r: speed(tuple(s), r), target, weights, ratio, limit)
        if steps is None:
            # Not even one step per stage meets the target: rank by the shortfall, above every
            # feasible value (see infeasible_floor).
            trial.set_user_attr("feasible", False)
            return floor + max(0.0, target - speed((1, 1, 1), ratio)) / target
        trial.set_user_attr("steps", list(steps))
        twin = shared.find_twin(trial, f"steps {list(steps)} ends {list(ends)} up_ratio {ratio:g}")
        if twin is not None:
            # Evaluated already (by this or another worker): reuse, do not recompute.
            for key, value in twin.user_attrs.items():
                if key not in (shared.LAYOUT_ATTR, shared.SAME_AS_ATTR):
                    trial.set_user_attr(key, value)
            trial.set_user_attr(shared.SAME_AS_ATTR, twin.user_attrs.get(shared.SAME_AS_ATTR, twin.number))
            return twin.value
        reached = speed(steps, ratio)
        if reached < target:  # a start layout's own steps
            trial.set_user_attr("feasible", False)
            return floor + (target - reached) / target
        ceiling = z_ceiling(ends, min_signal)
        if ceiling < z_bounds[0] or ends[1] > SECOND_END_MAX + 1e-9:
            # No Z in range keeps the signal asked for, or the second end lies beyond the
            # searched range: rank by how far.
            trial.set_user_attr("feasible", False)
            return floor + max(0.0, (z_bounds[0] - ceiling) / z_bounds[0]) + max(0.0, ends[1] - SECOND_END_MAX)
        inner = inner_search(steps, ends, ratio)
        full = speedup_of(spec, height, width, steps, ratio, base_steps)
        trial.set_user_attr("feasible", True)
        trial.set_user_attr("up_ratio", ratio)
        trial.set_user_attr("speedup_total", full.total)
        trial.set_user_attr("speedup_linear", full.linear)
        return inner.js_distance

    # Errors only: a trial interrupted by Ctrl-C would otherwise log its traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = shared.open_study(storage, study_name, seed)
    done = shared.count(study, optuna.trial.TrialState.COMPLETE)
    log(f"searching stage layouts for {target}x ({convention} FLOPs), {trials} trials, seed {seed}")
    if storage is not None and len(study.trials):
        log(f"resuming study {study_name!r} in {storage}: {done} finished trials, {shared.count(study, optuna.trial.TrialState.RUNNING)} running elsewhere")
    callbacks = [MaxTrialsCallback(trials, states=(optuna.trial.TrialState.COMPLETE,))]
    if on_trial:
        callbacks.append(lambda _study, trial: on_trial(trial))
    if trials > done:
        # No more start layouts than trials left to run: an enqueued layout that never runs
        # would stay in the study and be counted as a trial.
        for layout, ratio in start_layouts[: trials - done]:
            params = layout_params(layout, ratio if up_ratio is None else up_ratio)
            if params is not None:
                if up_ratio is not None:
                    params.pop("up_ratio")
                study.enqueue_trial(params, user_attrs={GIVEN_STEPS_ATTR: list(layout.steps)}, skip_if_exists=True)
        with shared.stop_on_ctrl_c(study):
            study.optimize(run_trial, n_trials=trials - done, show_progress_bar=show_progress, callbacks=callbacks)
    shared.wait_for_running(study, log)

    # The study's first finished trials by number, so that every worker of a shared study
    # summarises the same ones: a worker still drawing when another's wait ended starts a
    # trial numbered past all of these (see ralu.calibrate.study).
    finished = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.number)
    counted = finished[: max(trials, done)]
    feasible = [t for t in counted if t.user_attrs.get("feasible")]
    if not feasible:
        keeping = f" keeping signal >= {min_signal:g} at every transition" if min_signal > 0 else ""
        raise ValueError(f"no layout among {len(counted)} trials reached {target}x ({convention} FLOPs){keeping}. Fix: raise --trials or lower --speedup{' or --min-signal' if keeping else ''}")
    best = min(feasible, key=lambda t: (t.value, t.number))
    steps = tuple(best.user_attrs["steps"])
    first = round(best.params["end_1"], 2)
    layout = StageLayout(steps, (first, round(first + best.params["gap_2"], 2), 1.0))
    ratio = best.user_attrs["up_ratio"]
    problem = NTDMObjective(layout, h0, objective, grid, z_bounds, up_ratio=ratio, gap=resolution_gap, min_signal=min_signal, shift_ratio=shift_ratio)
    inner = optimise(problem, optimizer, seed=seed, effort="full")
    history = [{"number": t.number, "value": t.value, **t.params, **t.user_attrs} for t in counted]
    return LayoutSearchResult(layout, ratio, inner, speedup_of(spec, height, width, steps, ratio, base_steps), len(counted), len(feasible), history)
