"""The RALU schedule file: the one contract between ``ralu.calibrate`` (writes) and
``ralu.runtime`` (reads).

Convention: ``start``/``end`` of a stage are *progress times* t in [0, 1] (t = 0 is pure
noise, t = 1 is data), as in the paper.  diffusers' sigma is ``1 - t``; the conversion
happens in :func:`stage_sigmas` and nowhere else.

Pure Python + numpy + pydantic: importing this module must stay cheap (no torch, no scipy).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .cache import CacheSettings

SCHEDULE_VERSION = 1

#: Model names a schedule may name, and the pipeline family that runs them.
MODEL_FAMILIES: dict[str, str] = {
    "flux-dev": "flux",
    "sd3-medium": "sd3",
    "sd3.5-medium": "sd3",
    "sd3.5-large": "sd3",
}

#: Height and width must be multiples of this: the latent (/8) is halved for stage 1 and
#: then patchified 2x2 (FLUX packing or SD3 patch embedding).
RESOLUTION_MULTIPLE = 32

_TOLERANCE = 1e-6


class ScheduleError(ValueError):
    """A schedule is malformed, of an unknown version, or not usable as asked."""


# ----------------------------------------------------------------------------------------
# The math that both halves share: shifted sigma grids and the NT-DM transition.
# ----------------------------------------------------------------------------------------


def shift_sigma(u: np.ndarray | float, shift: float) -> np.ndarray | float:
    """Time-shift of flow-matching schedulers: ``h u / (1 + (h - 1) u)``."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def unshift_sigma(sigma: np.ndarray | float, shift: float) -> np.ndarray | float:
    """Inverse of :func:`shift_sigma`."""
    return sigma / (shift - (shift - 1.0) * sigma)


def stage_sigmas(steps: int, start: float, end: float, shift: float) -> np.ndarray:
    """The ``steps + 1`` sigmas one stage walks through, from ``1 - start`` to ``1 - end``.

    Points are uniform in the un-shifted variable between the inverse-shifted stage
    bounds, then shifted, so the last Euler step lands exactly on the stage end.  With
    ``start = 0, end = 1`` and ``shift = exp(mu)`` this is exactly diffusers' FLUX grid.
    """
    u = np.linspace(unshift_sigma(1.0 - start, shift), unshift_sigma(1.0 - end, shift), steps + 1)
    return shift_sigma(u, shift)


class TransitionCoefficients(BaseModel):
    """How the latent is put back on the flow path when stage k (ending at ``end``) hands
    over to stage k+1: ``x_start = signal_scale * Up(x_end) + noise_scale * z``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    after_stage: int = Field(description="1-based index of the stage that ends here.")
    end: float = Field(description="Progress time e_k where stage k stops.")
    start: float = Field(description="Progress time s_{k+1} = e_k / (delta_k + e_k) where stage k+1 restarts.")
    signal_scale: float = Field(description="a = 1 / (delta_k + e_k), multiplies the upsampled latent.")
    noise_scale: float = Field(description="b = 1 - s_{k+1}, multiplies the injected noise.")
    overlap: float = Field(description="e_k - s_{k+1}: the span of progress time that is denoised twice.")


def restart_time(end, c):
    """``s = e / (delta + e)`` with ``delta = (1 - e) / sqrt(c)``: where the next stage
    restarts after a transition at ``end``.  Works on floats and numpy arrays alike."""
    return restart_time_z(end, 1.0 / np.sqrt(c))


def restart_time_z(end, z):
    """:func:`restart_time` in the calibration's parameter ``Z = 1/sqrt(c)``:
    ``s = e / (Z (1 - e) + e)``.  Written in this order because it is the published
    optimiser's arithmetic: its L-BFGS-B takes finite-difference gradients, so an objective
    that differs in the last bit already sends it along another path."""
    return end / (z * (1.0 - end) + end)


def transition(end: float, c: float, after_stage: int = 1) -> TransitionCoefficients:
    """NT-DM noise matching at a resolution change (METHOD.md section 3).

    ``delta = (1 - e) / sqrt(c)``, ``s = e / (delta + e)``, ``a = 1 / (delta + e)``,
    ``b = delta / (delta + e)``.
    """
    if not 0.0 < c <= 0.25:
        raise ScheduleError(f"noise strength c={c} is outside (0, 1/4]; the correlated noise covariance I - cJ is only PSD there")
    delta = (1.0 - end) / math.sqrt(c)
    start = float(restart_time(end, c))
    return TransitionCoefficients(
        after_stage=after_stage,
        end=end,
        start=start,
        signal_scale=1.0 / (delta + end),
        noise_scale=1.0 - start,
        overlap=end - start,
    )


def stage_starts(ends: list[float], c: float) -> list[float]:
    """Start of every stage: 0 for the first, the re-noised start for each later one."""
    return [0.0] + [transition(e, c).start for e in ends[:-1]]


# ----------------------------------------------------------------------------------------
# The file format.
# ----------------------------------------------------------------------------------------


class Stage(BaseModel):
    """One resolution stage: ``steps`` Euler steps from progress time ``start`` to ``end``
    on a grid shifted by ``shift``."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1, description="Number of model evaluations (Euler steps) in this stage.")
    start: float = Field(ge=0.0, le=1.0, description="Progress time where the stage starts (0 = noise).")
    end: float = Field(ge=0.0, le=1.0, description="Progress time where the stage ends (1 = data).")
    shift: float = Field(gt=0.0, description="Time shift h_k of this stage's sigma grid.")


class Divergence(BaseModel):
    """How far the realised timestep distribution P is from the target P_target."""

    model_config = ConfigDict(extra="forbid")

    js_distance: float = Field(ge=0.0, description="Jensen-Shannon DISTANCE (sqrt of the divergence, natural log): the paper's 'JSD'.")
    js_divergence: float = Field(ge=0.0, description="Jensen-Shannon divergence (natural log) = js_distance**2.")
    objective: Literal["continuous", "discrete"] = Field(description="Which form of P produced these numbers.")


class FlopsSpeedup(BaseModel):
    """Baseline FLOPs / RALU FLOPs for one image, end to end, on the real architecture."""

    model_config = ConfigDict(extra="forbid")

    total: float = Field(gt=0.0, description="Linear + attention FLOPs.")
    linear: float = Field(gt=0.0, description="Linear and conv layers only (the paper's convention).")


class Calibration(BaseModel):
    """Provenance: how the schedule was produced."""

    model_config = ConfigDict(extra="forbid")

    optimizer: str = Field(description="'global' or 'paper' (the inner search of shifts and c).")
    layout: Literal["given", "searched"] = Field(description="Whether steps/ends were given or found by the outer search.")
    target_speedup: float | None = Field(default=None, description="The --speedup target of the outer search, if any.")
    flops_convention: Literal["total", "linear"] = Field(description="Convention the speed-up target was checked in.")
    seed: int | None = Field(description="Seed of the search.")
    h0: float = Field(gt=0.0, description="Shift of the base model's own schedule at this resolution.")
    grid: int = Field(ge=2, description="Grid points (continuous) or bins (discrete) of the divergence.")
    z_bounds: tuple[float, float] = Field(description="Search range of Z = 1/sqrt(c); equal values mean c was fixed.")
    tool_version: str = Field(description="ralu version that wrote the file.")
    created: str = Field(description="UTC creation time, ISO 8601.")


class Schedule(BaseModel):
    """A calibrated RALU schedule.  Load with :func:`load_schedule`, save with
    :func:`save_schedule`; the JSON Schema is ``schedules/schema.json``."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(description=f"Schedule format version; this ralu reads {SCHEDULE_VERSION}.")
    model: str = Field(description=f"Model the schedule was calibrated for: one of {sorted(MODEL_FAMILIES)}.")
    height: int = Field(gt=0, description="Image height in pixels.")
    width: int = Field(gt=0, description="Image width in pixels.")
    base_steps: int = Field(ge=1, description="Steps of the baseline sampler the speed-up is measured against.")
    stages: list[Stage] = Field(min_length=1, description="Stages from lowest to full resolution.")
    c: float = Field(description="Noise strength of the correlated noise, in (0, 1/4]; Z = 1/sqrt(c).")
    up_ratio: float = Field(ge=0.0, le=1.0, description="Fraction of low-res tokens upsampled early (mixed stage).")
    divergence: Divergence
    flops_speedup: FlopsSpeedup
    transitions: list[TransitionCoefficients] = Field(description="What each stage change does (derived from ends and c; checked on load).")
    calibration: Calibration
    cache: CacheSettings | None = Field(default=None, description="Optional diffusers step cache for every stage (ralu.runtime.cache).")

    @property
    def family(self) -> str:
        """Pipeline family: 'flux' or 'sd3'."""
        return MODEL_FAMILIES[self.model]

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    @property
    def z(self) -> float:
        """Z = 1 / sqrt(c), the form the published script stores."""
        return 1.0 / math.sqrt(self.c)

    @model_validator(mode="after")
    def _check_consistency(self) -> "Schedule":
        if self.version != SCHEDULE_VERSION:
            raise ValueError(f"version {self.version} is unknown: this ralu reads version {SCHEDULE_VERSION}. Fix: regenerate the file with this ralu's ralu-calibrate, or install the ralu that wrote it")
        if self.model not in MODEL_FAMILIES:
            raise ValueError(f"model {self.model!r} is unknown. Fix: use one of {sorted(MODEL_FAMILIES)}")
        for name, value in (("height", self.height), ("width", self.width)):
            if value % RESOLUTION_MULTIPLE:
                raise ValueError(f"{name}={value} is not a multiple of {RESOLUTION_MULTIPLE} (the half-size stage needs it). Fix: calibrate for a {name} divisible by {RESOLUTION_MULTIPLE}")
        if not 0.0 < self.c <= 0.25:
            raise ValueError(f"c={self.c} is outside (0, 1/4] (the noise covariance I - cJ is not PSD beyond 1/4). Fix: recalibrate; Z = 1/sqrt(c) must be >= 2")
        ends = [stage.end for stage in self.stages]
        for k in range(1, len(ends)):
            if not ends[k] > ends[k - 1]:
                raise ValueError(f"stages.{k}.end={ends[k]} does not increase past stages.{k - 1}.end={ends[k - 1]}. Fix: ends must be strictly increasing")
        if abs(ends[-1] - 1.0) > _TOLERANCE:
            raise ValueError(f"stages.{len(ends) - 1}.end={ends[-1]} must be 1.0: the last stage has to finish at the data. Fix: set the last end to 1.0")
        for k, (stage, expected) in enumerate(zip(self.stages, stage_starts(ends, self.c))):
            if abs(stage.start - expected) > _TOLERANCE:
                how = "the first stage starts from pure noise" if k == 0 else f"s_{k + 1} = e_{k} / (delta_{k} + e_{k}) with delta_{k} = (1 - e_{k}) / sqrt(c)"
                raise ValueError(f"stages.{k}.start={stage.start} is inconsistent with c and the previous end (expected {expected:.9f}: {how}). Fix: recalibrate, or correct start or c")
            if not stage.start < stage.end:
                raise ValueError(f"stages.{k}: start={stage.start} is not before end={stage.end}. Fix: recalibrate with a larger gap between ends or a smaller c")
        expected_transitions = [transition(e, self.c, k + 1) for k, e in enumerate(ends[:-1])]
        if len(self.transitions) != len(expected_transitions):
            raise ValueError(f"transitions has {len(self.transitions)} entries, expected {len(expected_transitions)} (one per stage change). Fix: recalibrate")
        for k, (got, want) in enumerate(zip(self.transitions, expected_transitions)):
            for key, value in want.model_dump().items():
                if abs(getattr(got, key) - value) > _TOLERANCE:
                    raise ValueError(f"transitions.{k}.{key}={getattr(got, key)} is inconsistent with c and the ends (expected {value:.9f}). Fix: recalibrate")
        return self

    def sigmas(self, stage_index: int) -> np.ndarray:
        """The ``steps + 1`` diffusers sigmas of one stage (0-based index)."""
        stage = self.stages[stage_index]
        return stage_sigmas(stage.steps, stage.start, stage.end, stage.shift)


# ----------------------------------------------------------------------------------------
# Loading and saving.
# ----------------------------------------------------------------------------------------


def _format_validation_error(source: str, error: ValidationError) -> str:
    fixes = {
        "missing": "add the field (see schedules/schema.json)",
        "extra_forbidden": "remove it: schedule format version 1 has no such field",
    }
    lines = [f"schedule {source} is invalid:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if "Fix:" not in message:
            message += ". Fix: " + fixes.get(item["type"], "correct the value (see schedules/schema.json) or regenerate the file with ralu-calibrate")
        lines.append(f"  field '{where}': {message}")
    return "\n".join(lines)


def schedule_from_dict(data: dict, source: str = "<dict>") -> Schedule:
    """Validate a parsed schedule, raising :class:`ScheduleError` that names field and fix."""
    if not isinstance(data, dict):
        raise ScheduleError(f"schedule {source} is not a JSON object. Fix: regenerate it with ralu-calibrate")
    try:
        return Schedule.model_validate(data)
    except ValidationError as error:
        raise ScheduleError(_format_validation_error(source, error)) from None


def shipped_schedules() -> list[str]:
    """Names of the schedules shipped with ralu (``load_schedule(name)`` loads them)."""
    folder = resources.files("ralu.schedules")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json") and p.name != "schema.json")


def load_schedule(source: "str | os.PathLike | Schedule | dict") -> Schedule:
    """Load a schedule from a shipped name (``"flux-dev-7x"``), a file path, a parsed dict,
    or pass a :class:`Schedule` through."""
    if isinstance(source, Schedule):
        return source
    if isinstance(source, dict):
        return schedule_from_dict(source)
    if source is None:
        raise ScheduleError(f"a schedule is required: a shipped name (one of {shipped_schedules()}), a path to a schedule JSON file, or a Schedule")
    path = Path(source)
    if path.is_file():
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        name = str(source).removesuffix(".json")
        shipped = resources.files("ralu.schedules").joinpath(f"{name}.json")
        if name == "schema" or os.sep in name or not shipped.is_file():
            raise ScheduleError(f"no schedule file {str(source)!r} and no shipped schedule of that name. Fix: pass a path to a schedule JSON file or one of {shipped_schedules()}")
        text, where = shipped.read_text(encoding="utf-8"), f"'{name}' (shipped)"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ScheduleError(f"schedule {where} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}; truncated?). Fix: regenerate it with ralu-calibrate") from None
    return schedule_from_dict(data, where)


def write_text_atomic(path: "str | os.PathLike", text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_schedule(schedule: Schedule, path: "str | os.PathLike") -> Path:
    """Validate and write a schedule atomically."""
    schedule = schedule_from_dict(schedule.model_dump(), str(path))
    return write_text_atomic(path, schedule.model_dump_json(indent=2) + "\n")


def schedule_json_schema() -> dict:
    """The JSON Schema of the schedule file (shipped as ``schedules/schema.json``)."""
    schema = Schedule.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"RALU schedule, version {SCHEDULE_VERSION}"
    return schema
