"""The outer search: which stage layout (steps per stage, stage ends) meets a FLOPs
speed-up target with the lowest NT-DM divergence.  Optuna (TPE, seeded) over a small
discrete space; each trial runs a quick inner search, the winner a full one.

The up-sampling ratio r does not enter the divergence, only the cost.  Rule: r is the
largest of 0.30, 0.25, ..., 0.10 whose layout still meets the target (more tokens
upsampled early is closer to full-resolution quality); without a target r = 0.30.

The divergence does not see how many steps a layout takes, only how they are spread: left
alone, the search would answer "7x" with a 12x layout of six steps.  A layout that leaves
budget unspent answers a different target, so the search also requires the speed-up to
stay within ``BUDGET_SLACK`` (10 %) above the target: target <= speed-up <= 1.1 target.

``start_layouts`` (``calibrate`` passes the model's published presets) are the study's first
trials, so the search returns a layout at least as good, by its own objective, as any of
them that meets the target; TPE only has to find something better.  Without them an 80-trial
search sometimes settles on a layout worse than the published one at the same target.

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
from .densities import RESOLUTION_GAP
from .flops import pricing as flops
from .search import Z_BOUNDS, InnerResult, NTDMObjective, Objective, SignalUnreachable, StageLayout, optimise, z_ceiling

#: Candidate up-sampling ratios, largest first (see the module docstring for the rule).
UP_RATIO_CHOICES = (0.30, 0.25, 0.20, 0.15, 0.10)
#: Ends are searched on this grid: e1 in [0.10, 0.50], e2 - e1 in [0.05, 0.30].
END_STEP = 0.05
FIRST_END_RANGE = (0.10, 0.50)
SECOND_GAP_RANGE = (0.05, 0.30)
#: A searched layout must spend its FLOPs budget: speed-up <= (1 + BUDGET_SLACK) * target.
BUDGET_SLACK = 0.10

Convention = Literal["total", "linear"]


def infeasible_floor(objective: Objective) -> float:
    """Value above every feasible trial's, from which infeasible trials are ranked: a JS
    distance is at most sqrt(ln 2) < 1; the progress error of a runnable layout (one step
    per stage, restarts below the data) stays far below 1e3."""
    return 1e3 if objective == "progress" else 1.0


def speedup_of(spec: ModelSpec, height: int, width: int, steps, up_ratio: float, base_steps: int) -> flops.Flops:
    return flops.flops_speedup(spec.name, height, width, list(steps), up_ratio, base_steps=base_steps)


def choose_up_ratio(spec: ModelSpec, height: int, width: int, steps, base_steps: int, target: float | None, convention: Convention, fixed: float | None = None) -> float | None:
    """The documented rule: the largest r in UP_RATIO_CHOICES meeting the target, or None.

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


def layout_params(layout: StageLayout, max_steps: int) -> dict[str, float] | None:
    """The trial parameters of ``layout``, or None when it lies outside the searched space."""
    if len(layout.steps) != 3 or max(layout.steps) > max_steps:
        return None
    first, gap = layout.ends[0], round(layout.ends[1] - layout.ends[0], 2)
    on_grid = all(abs(v / END_STEP - round(v / END_STEP)) < 1e-9 for v in (first, gap))
    if not (on_grid and FIRST_END_RANGE[0] <= first <= FIRST_END_RANGE[1] and SECOND_GAP_RANGE[0] <= gap <= SECOND_GAP_RANGE[1]):
        return None
    return {**{f"steps_{k + 1}": int(n) for k, n in enumerate(layout.steps)}, "end_1": float(first), "gap_2": float(gap)}


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
    min_signal: float = 0.0,
    start_layouts: tuple[StageLayout, ...] = (),
    trials: int = 80,
    seed: int = 0,
    storage: str | None = None,
    study_name: str | None = None,
    show_progress: bool = True,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> LayoutSearchResult:
    """Minimise the divergence over three-stage layouts subject to speed-up >= target.

    ``trials`` is the number of finished trials the study ends with: with a shared
    ``storage`` it counts those of earlier runs and of other workers (see
    :mod:`ralu.calibrate.study`)."""
    # The kept signal rises with the first end, so the latest first end is the best case.
    best_case = z_ceiling((FIRST_END_RANGE[1], 1.0), min_signal)
    if best_case < z_bounds[0]:
        raise SignalUnreachable(
            f"--min-signal {min_signal:g} needs Z <= {best_case:.4g} even with the latest first end searched ({FIRST_END_RANGE[1]:g}), "
            f"below the lowest Z searched, {z_bounds[0]:g}. Fix: a lower --min-signal (0 for no limit) or a lower --z-bounds LOW"
        )
    # No stage can usefully take more steps than the whole budget allows at full cost.
    max_steps = max(1, math.ceil(base_steps / target) + 1)
    floor = infeasible_floor(objective)
    inner_cache: dict[tuple, tuple[InnerResult, float, flops.Flops] | None] = {}

    def evaluate(steps: tuple[int, ...], ends: tuple[float, ...]):
        key = (steps, ends)
        if key not in inner_cache:
            ratio = choose_up_ratio(spec, height, width, steps, base_steps, target, convention, fixed=up_ratio)
            if ratio is None:
                inner_cache[key] = None
            else:
                problem = NTDMObjective(StageLayout(steps, ends), h0, objective, grid, z_bounds, up_ratio=ratio, gap=resolution_gap, min_signal=min_signal)
                inner = optimise(problem, optimizer, seed=seed, effort="quick")
                inner_cache[key] = (inner, ratio, speedup_of(spec, height, width, steps, ratio, base_steps))
        return inner_cache[key]

    def run_trial(trial: optuna.Trial) -> float:
        steps = tuple(trial.suggest_int(f"steps_{k + 1}", 1, max_steps) for k in range(3))
        first = round(trial.suggest_float("end_1", *FIRST_END_RANGE, step=END_STEP), 2)
        gap = round(trial.suggest_float("gap_2", *SECOND_GAP_RANGE, step=END_STEP), 2)
        ends = (first, round(first + gap, 2), 1.0)
        twin = shared.find_twin(trial, f"steps {list(steps)} ends {list(ends)}")
        if twin is not None:
            # Evaluated already (by this or another worker): reuse, do not recompute.
            for key, value in twin.user_attrs.items():
                if key not in (shared.LAYOUT_ATTR, shared.SAME_AS_ATTR):
                    trial.set_user_attr(key, value)
            trial.set_user_attr(shared.SAME_AS_ATTR, twin.user_attrs.get(shared.SAME_AS_ATTR, twin.number))
            return twin.value
        ceiling = z_ceiling(ends, min_signal)
        if ceiling < z_bounds[0]:
            # No Z in range keeps the signal asked for: rank by how far the cap falls short.
            trial.set_user_attr("feasible", False)
            return floor + (z_bounds[0] - ceiling) / z_bounds[0]
        found = evaluate(steps, ends)
        if found is None:
            # Infeasible: rank by how far the cheapest ratio falls short, always above any
            # feasible value (see infeasible_floor).
            short = getattr(speedup_of(spec, height, width, steps, up_ratio or min(UP_RATIO_CHOICES), base_steps), convention)
            trial.set_user_attr("feasible", False)
            return floor + max(0.0, target - short) / target
        inner, ratio, speed = found
        overshoot = getattr(speed, convention) / (target * (1.0 + BUDGET_SLACK)) - 1.0
        if overshoot > 0:
            # Too fast: the layout leaves budget unspent (see the module docstring).
            trial.set_user_attr("feasible", False)
            return floor + overshoot
        trial.set_user_attr("feasible", True)
        trial.set_user_attr("up_ratio", ratio)
        trial.set_user_attr("speedup_total", speed.total)
        trial.set_user_attr("speedup_linear", speed.linear)
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
        for layout in start_layouts[: trials - done]:
            params = layout_params(layout, max_steps)
            if params is not None:
                study.enqueue_trial(params, skip_if_exists=True)
        with shared.stop_on_ctrl_c(study):
            study.optimize(run_trial, n_trials=trials - done, show_progress_bar=show_progress, callbacks=callbacks)
    shared.wait_for_running(study, log)

    feasible = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("feasible")]
    if not feasible:
        keeping = f" keeping signal >= {min_signal:g} at every transition" if min_signal > 0 else ""
        raise ValueError(f"no layout among {len(study.trials)} trials reached {target}x ({convention} FLOPs){keeping}. Fix: raise --trials or lower --speedup{' or --min-signal' if keeping else ''}")
    best = min(feasible, key=lambda t: (t.value, t.number))
    steps = tuple(best.params[f"steps_{k + 1}"] for k in range(3))
    first = round(best.params["end_1"], 2)
    layout = StageLayout(steps, (first, round(first + best.params["gap_2"], 2), 1.0))
    ratio = best.user_attrs["up_ratio"]
    inner = optimise(NTDMObjective(layout, h0, objective, grid, z_bounds, up_ratio=ratio, gap=resolution_gap, min_signal=min_signal), optimizer, seed=seed, effort="full")
    history = [
        {"number": t.number, "value": t.value, **t.params, **t.user_attrs}
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE
    ]
    return LayoutSearchResult(layout, ratio, inner, speedup_of(spec, height, width, steps, ratio, base_steps), len(study.trials), len(feasible), history)
