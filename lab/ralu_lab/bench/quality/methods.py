"""The rows of the quality harness: how each method samples and what it runs, the peers' step
counts matched to a FLOPs target (testbed v2 plans them per architecture:
:func:`ralu_lab.bench.quality.v2.plan.plan_arch`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ralu.runtime.models import stage_image_tokens
from ralu.runtime.schedule import stage_sigmas
from ralu_lab.bench.quality.config import (
    BASE_STEPS,
    BOTTLENECK_RESTARTS,
    BOTTLENECK_ROLES,
    BOTTLENECK_SHIFT_FACTORS,
    BOTTLENECK_STEPS,
    METHOD_LABELS,
)
from ralu_lab.bench.quality.cost import TestbedCost


@dataclass
class Method:
    """One row of the table: how to sample, and what it costs."""

    key: str  # "baseline", "base-steps", ..., "schedule:NAME"
    budget: float  # nominal budget (1 for the baseline)
    label: str
    #: "pipeline" (plain FluxPipeline, ``steps``), "ralu" (RALUFluxPipeline, ``schedule``),
    #: "staged" (the harness's own Euler sampler, ``stages``)
    kind: str
    steps: int | None = None
    schedule: Any = None
    paper_compat: bool = False
    #: staged: [(role "full"/"half", sigmas)], transition rule "renoise" or "continue"
    stages: list = field(default_factory=list)
    transition: str = "renoise"
    #: analytic image-token counts of every forward (checked against the hook's record)
    forwards: list = field(default_factory=list)
    details: dict = field(default_factory=dict)


def shifted_sigmas(steps: int, sigma_start: float, sigma_end: float, shift: float):
    """``steps + 1`` sigmas from ``sigma_start`` to ``sigma_end``: uniform in the un-shifted
    variable, then shifted (the runtime's stage grid; with 1 -> 0 and shift exp(mu) exactly
    FluxPipeline's grid)."""
    return stage_sigmas(steps, 1.0 - sigma_start, 1.0 - sigma_end, shift)


def ralu_forwards(schedule, full_tokens: int) -> list[int]:
    tokens = stage_image_tokens(full_tokens, schedule.up_ratio, len(schedule.stages))
    return [n for n, stage in zip(tokens, schedule.stages) for _ in range(stage.steps)]


def closest(candidates, cost_of, target: float):
    """The candidate whose total-FLOPs cost is closest to ``target`` (first on ties)."""
    return min(candidates, key=lambda c: abs(cost_of(c).total - target))


def bottleneck_method(budget: float, target: float, cost: TestbedCost, h0: float, full: int, half: int, full_px: int = 32) -> Method:
    """Bottleneck Sampling at a FLOPs target: the FLUX default steps 6/20/8 scaled (and
    rounded) to the budget (``full_px``: the full-size image side, for the description)."""
    def steps_for(alpha):
        return tuple(max(1, round(n * alpha)) for n in BOTTLENECK_STEPS)

    def cost_of(steps):
        return cost.of([full if role == "full" else half for role, n in zip(BOTTLENECK_ROLES, steps) for _ in range(n)])

    candidates = list(dict.fromkeys(steps_for(a) for a in np.linspace(0.02, 3.0, 600)))
    steps = closest(candidates, cost_of, target)
    shifts = tuple(f * h0 for f in BOTTLENECK_SHIFT_FACTORS)
    ends = BOTTLENECK_RESTARTS[1:] + (0.0,)
    stages = [(role, shifted_sigmas(n, s, e, h)) for role, n, s, e, h in zip(BOTTLENECK_ROLES, steps, BOTTLENECK_RESTARTS, ends, shifts)]
    forwards = [full if role == "full" else half for role, n in zip(BOTTLENECK_ROLES, steps) for _ in range(n)]
    return Method(
        "bottleneck", budget, METHOD_LABELS["bottleneck"], "staged", stages=stages, transition="renoise", forwards=forwards,
        details={
            "steps": list(steps), "resolutions": [f"{full_px} px", f"{full_px // 2} px", f"{full_px} px"], "shifts": [round(h, 4) for h in shifts],
            "sigma_ranges": [[s, e] for s, e in zip(BOTTLENECK_RESTARTS, ends)],
            "describe": (f"{'/'.join(map(str, steps))} steps at {full_px}/{full_px // 2}/{full_px} px, shifts {'/'.join(f'{h:.2f}' for h in shifts)} "
                         f"(3, 2, 3 x h0), sigma 1 -> 0.8, 0.8 -> 0.6, 0.6 -> 0; at each change the Tweedie estimate is "
                         "resized (2x2 mean down, nearest up) and re-noised with fresh noise to the restart level"),
        },
    )


def naive_method(budget: float, target: float, cost: TestbedCost, h0: float, full: int, half: int, switch_t: float, full_px: int = 32) -> Method:
    """Naive two-stage upsampling: the base h0 grid of N steps, the steps until progress
    time ``switch_t`` at half size, then the noisy latent nearest-upsampled and continued at
    full size from the same sigma, no re-noising; N chosen to match the FLOPs target."""

    def split(n):
        sigmas = shifted_sigmas(n, 1.0, 0.0, h0)
        low = int(sum(1 for s in sigmas[1:] if s >= 1.0 - switch_t - 1e-12))
        low = min(max(low, 1), n - 1)
        return sigmas, low

    def cost_of(n):
        _, low = split(n)
        return cost.of([half] * low + [full] * (n - low))

    n = closest(list(range(2, 4 * BASE_STEPS)), cost_of, target)
    sigmas, low = split(n)
    stages = [("half", sigmas[: low + 1]), ("full", sigmas[low:])]
    return Method(
        "naive-upsample", budget, METHOD_LABELS["naive-upsample"], "staged", stages=stages, transition="continue",
        forwards=[half] * low + [full] * (n - low),
        details={
            "steps": [low, n - low], "switch_sigma": float(sigmas[low]), "shift": round(h0, 4),
            "describe": (f"{n} steps on the base grid (shift h0 = {h0:.3f}); the first {low} (down to sigma {sigmas[low]:.3f}, "
                         f"progress t = {1 - sigmas[low]:.3f}) at {full_px // 2} px, then the noisy latent nearest-upsampled and the "
                         f"remaining {n - low} steps at {full_px} px, no re-noising"),
        },
    )


def ralu_method(key: str, budget: float, schedule, full: int, paper_compat: bool, label: str | None = None, extra: dict | None = None) -> Method:
    stages = ", ".join(f"{s.steps}@[{s.start:.3f},{s.end:.2f}] h={s.shift:.3f}" for s in schedule.stages)
    return Method(
        key, budget, label or METHOD_LABELS.get(key, key), "ralu", schedule=schedule, paper_compat=paper_compat,
        forwards=ralu_forwards(schedule, full),
        details={
            "steps": [s.steps for s in schedule.stages], "ends": [s.end for s in schedule.stages],
            "shifts": [round(s.shift, 4) for s in schedule.stages], "z": round(schedule.z, 3), "c": schedule.c,
            "up_ratio": schedule.up_ratio, "js_distance": schedule.divergence.js_distance,
            "calibration_h0": schedule.calibration.h0, "paper_compat": paper_compat,
            "describe": f"stages {stages}; Z = {schedule.z:.2f}, r = {schedule.up_ratio}" + (", paper_compat=True" if paper_compat else ", exact noise"),
            **(extra or {}),
        },
    )

