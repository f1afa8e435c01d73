"""What a schedule means for one call: stage roles, sigma grids, token counts, checks.

Family-independent and cheap (numpy only).  A pipeline calls :func:`make_plan` before any
compute, so every input error is raised up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .models import check_resolution, pixel_size, resolution_multiple, stage_image_tokens, upsampled_tokens
from .schedule import C_RANGE, Schedule, ScheduleError, TransitionCoefficients

#: Stage roles by number of stages: low-res, mixed (edge tokens upsampled), full-res.
STAGE_ROLES: dict[int, tuple[str, ...]] = {
    1: ("full",),
    2: ("low", "full"),
    3: ("low", "mixed", "full"),
}


@dataclass(frozen=True)
class StagePlan:
    """One stage of one call."""

    index: int
    role: str
    #: The ``steps + 1`` diffusers sigmas (sigma = 1 - t) the Euler steps walk through.
    sigmas: np.ndarray
    #: Image tokens per image in this stage.
    tokens: int

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


@dataclass(frozen=True)
class Plan:
    schedule: Schedule
    stages: tuple[StagePlan, ...]
    #: ``transitions[k]`` puts the latent back on the path between stage k and k + 1.
    transitions: tuple[TransitionCoefficients, ...]
    #: Low-res token grid (gh, gw) = full-res latent size / 4.
    grid: tuple[int, int]
    #: Low-res tokens upsampled in the mixed stage: floor(up_ratio * gh * gw).
    k: int

    @property
    def c(self) -> float:
        return self.schedule.c

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    @property
    def full_tokens(self) -> int:
        return 4 * self.grid[0] * self.grid[1]


def check_schedule(schedule: Schedule, family: str, height: int, width: int) -> None:
    """The schedule must be for this pipeline family and made for exactly this resolution.

    Resolution rule: a schedule's shifts are calibrated against the base model's shift at
    the schedule's resolution, and re-deriving them is a calibration (``ralu-calibrate``),
    not something a sampler may guess; so a schedule runs only at the height and width it
    was made for.
    """
    if schedule.family != family:
        raise ScheduleError(
            f"schedule for model {schedule.model!r} (family {schedule.family!r}) cannot run in a {family!r} pipeline. "
            f"Fix: use a schedule calibrated for a {family} model"
        )
    if len(schedule.stages) not in STAGE_ROLES:
        raise ScheduleError(
            f"schedule has {len(schedule.stages)} stages; the runtime runs 1 (full), 2 (low, full) or 3 "
            "(low, mixed, full). Fix: recalibrate with at most 3 stages"
        )
    if (schedule.height, schedule.width) != (height, width):
        raise ScheduleError(
            f"schedule was calibrated for {schedule.height}x{schedule.width} (height x width) but {height}x{width} "
            "was asked; its shifts depend on the resolution. Fix: leave height/width unset (the schedule's "
            f"resolution is used), or calibrate a schedule for {height}x{width} with ralu-calibrate"
        )


def _check_generator(generator) -> None:
    """``generator`` is None, a ``torch.Generator`` or a list of them (a seed is not one)."""
    import torch

    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, list) and all(isinstance(g, torch.Generator) for g in generator):
        return
    raise ValueError(f"generator={generator!r:.60} is not a torch.Generator or a list of them. Fix: pass torch.Generator().manual_seed(seed), one per image for a list")


def count_images(prompt, prompt_embeds, num_images_per_prompt, generator) -> tuple[int, int, int]:
    """``(prompts, images per prompt, images)`` of a call, as diffusers counts them; a list
    of generators must hold one generator per image."""
    if isinstance(prompt, str):
        batch_size = 1
    elif prompt is not None:
        batch_size = len(prompt)
    else:
        batch_size = prompt_embeds.shape[0]
    if num_images_per_prompt is None:
        num_images_per_prompt = 1
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} is not a positive integer. Fix: pass 1 or more (or leave it unset)")
    per_prompt = int(num_images_per_prompt)
    images = batch_size * per_prompt
    _check_generator(generator)
    if isinstance(generator, list) and len(generator) != images:
        raise ValueError(f"{len(generator)} generators for {images} images. Fix: pass one generator per image (batch size x num_images_per_prompt)")
    return batch_size, per_prompt, images


#: Slack on the [0, 1] range of planned sigmas: the shift and its inverse round by an ulp or two.
_SIGMA_SLACK = 1e-9


def check_plan_numbers(stages: tuple[StagePlan, ...], transitions: tuple[TransitionCoefficients, ...], c: float) -> None:
    """Every sigma and coefficient a call will use must be a finite number in its range.

    A validated schedule always passes; this is the last guard before compute, so that no
    arithmetic surprise in the grids can turn into an all-NaN image instead of an error.
    """
    fix = "Fix: recalibrate the schedule with ralu-calibrate"
    for stage in stages:
        sigmas = stage.sigmas
        if not (np.all(np.isfinite(sigmas)) and np.all(sigmas >= -_SIGMA_SLACK) and np.all(sigmas <= 1.0 + _SIGMA_SLACK)):
            raise ScheduleError(f"stage {stage.index + 1} plans sigmas outside [0, 1] or not finite ({np.array2string(sigmas, threshold=8)}). {fix}")
    for k, coefficients in enumerate(transitions):
        values = coefficients.model_dump()
        if not all(math.isfinite(value) for value in values.values()):
            raise ScheduleError(f"transition {k + 1} has coefficients that are not finite ({values}). {fix}")
    # The noise injection scales by sqrt(1 - 4c) and sqrt(1 - c).  The bound is the schedule
    # file's own (C_RANGE[1] = 1/4, Z = 2): whatever validates also plans, c = 1/4 included.
    if not (math.isfinite(c) and 0.0 < c <= C_RANGE[1]):
        raise ScheduleError(f"c={c} is outside (0, 1/4]: the noise coefficients sqrt(1 - 4c) would not be real. {fix}")


def make_plan(schedule: Schedule, family: str, height: int, width: int, vae_scale_factor: int = 8) -> Plan:
    """Check the request and lay out the stages of one call at ``height x width`` pixels."""
    multiple = resolution_multiple(vae_scale_factor)
    check_resolution(height, width, multiple)
    height, width = pixel_size("height", height), pixel_size("width", width)
    check_schedule(schedule, family, height, width)
    grid = (height // multiple, width // multiple)
    low_tokens = grid[0] * grid[1]
    roles = STAGE_ROLES[len(schedule.stages)]
    tokens = stage_image_tokens(4 * low_tokens, schedule.up_ratio, len(roles))
    stages = tuple(
        StagePlan(index=i, role=role, sigmas=schedule.sigmas(i), tokens=count) for i, (role, count) in enumerate(zip(roles, tokens))
    )
    k = upsampled_tokens(low_tokens, schedule.up_ratio)
    transitions = tuple(schedule.transitions)
    check_plan_numbers(stages, transitions, schedule.c)
    return Plan(schedule=schedule, stages=stages, transitions=transitions, grid=grid, k=k)
