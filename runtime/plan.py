"""What a schedule means for one call: stage roles, sigma grids, token counts, checks.

Family-independent and cheap (numpy only).  A pipeline calls :func:`make_plan` before any
compute, so every input error is raised up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .schedule import RESOLUTION_MULTIPLE, Schedule, ScheduleError, TransitionCoefficients

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


def pixel_size(label: str, value) -> int:
    """``value`` as a whole number of pixels: ints, and floats with no fractional part (a
    habit of callers that compute sizes, e.g. ``256.0``); anything else is refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{label}={value!r} must be an integer number of pixels. Fix: pass e.g. {label}=1024")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise ValueError(f"{label}={value!r} must be an integer number of pixels. Fix: pass e.g. {label}={max(1, round(value))}")
    return int(value)


def check_resolution(height, width, multiple: int = RESOLUTION_MULTIPLE) -> None:
    """Height and width must be whole (:func:`pixel_size`), positive multiples of ``multiple``
    (32 for an 8x VAE: the latent is halved for stage 1 and cut into 2x2 tokens)."""
    for label, value in (("height", height), ("width", width)):
        value = pixel_size(label, value)
        if value <= 0 or value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            raise ValueError(
                f"{label}={value!r} must be a positive multiple of {multiple}: the latent is halved for the "
                f"low-res stage and cut into 2x2 tokens. Fix: use e.g. {label}={nearest}"
            )


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


def count_images(prompt, prompt_embeds, num_images_per_prompt, generator) -> tuple[int, int, int]:
    """``(prompts, images per prompt, images)`` of a call, as diffusers counts them; a list
    of generators must hold one generator per image."""
    if isinstance(prompt, str):
        batch_size = 1
    elif prompt is not None:
        batch_size = len(prompt)
    else:
        batch_size = prompt_embeds.shape[0]
    per_prompt = num_images_per_prompt or 1
    images = batch_size * per_prompt
    if isinstance(generator, list) and len(generator) != images:
        raise ValueError(f"{len(generator)} generators for {images} images. Fix: pass one generator per image (batch size x num_images_per_prompt)")
    return batch_size, per_prompt, images


def make_plan(schedule: Schedule, family: str, height: int, width: int, vae_scale_factor: int = 8) -> Plan:
    """Check the request and lay out the stages of one call at ``height x width`` pixels."""
    check_resolution(height, width, 4 * vae_scale_factor)
    height, width = pixel_size("height", height), pixel_size("width", width)
    check_schedule(schedule, family, height, width)
    grid = (height // (4 * vae_scale_factor), width // (4 * vae_scale_factor))
    low_tokens = grid[0] * grid[1]
    k = math.floor(schedule.up_ratio * low_tokens)
    tokens = {"low": low_tokens, "mixed": low_tokens + 3 * k, "full": 4 * low_tokens}
    roles = STAGE_ROLES[len(schedule.stages)]
    stages = tuple(
        StagePlan(index=i, role=role, sigmas=schedule.sigmas(i), tokens=tokens[role]) for i, role in enumerate(roles)
    )
    return Plan(schedule=schedule, stages=stages, transitions=tuple(schedule.transitions), grid=grid, k=k)
