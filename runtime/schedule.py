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
import reprlib
import stat
import tempfile
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, field_validator, model_validator

from .cache import CacheSettings
from .models import MODEL_FAMILIES, RESOLUTION_MULTIPLE

SCHEDULE_VERSION = 1

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

    # The bounds follow from e in [0, 1] and c <= 1/4 (delta >= 2 (1 - e), so delta + e >= 1).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    after_stage: StrictInt = Field(ge=1, description="1-based index of the stage that ends here.")
    end: StrictFloat = Field(ge=0.0, le=1.0, description="Progress time e_k where stage k stops.")
    start: StrictFloat = Field(ge=0.0, le=1.0, description="Progress time s_{k+1} = e_k / (delta_k + e_k) where stage k+1 restarts.")
    signal_scale: StrictFloat = Field(ge=0.0, le=1.0, description="a = 1 / (delta_k + e_k) = s_{k+1} / e_k, multiplies the upsampled latent: the signal the transition keeps.")
    noise_scale: StrictFloat = Field(ge=0.0, le=1.0, description="b = 1 - s_{k+1}, multiplies the injected noise.")
    overlap: StrictFloat = Field(ge=0.0, le=1.0, description="e_k - s_{k+1}: the span of progress time that is denoised twice.")


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


def kept_signal(end: float, c: float) -> float:
    """The signal a transition at ``end`` keeps: ``a = 1 / (delta + e)``, the factor on the
    upsampled latent (``signal_scale``).  Since ``s = a e``, it is also ``s / e``: the
    fraction of the progress the stages before reached that the next stage starts from, so
    "restarts below A e" and "keeps less than A" are one test.  The same arithmetic as
    :func:`transition`, so a bound checked here holds in the file."""
    return 1.0 / ((1.0 - end) / math.sqrt(c) + end)


def largest_z(end: float, min_signal: float) -> float:
    """The largest ``Z = 1/sqrt(c)`` at which a transition at ``end`` keeps at least
    ``min_signal`` (:func:`kept_signal`): ``1 / (Z (1 - e) + e) >= A`` is
    ``Z <= (1/A - e) / (1 - e)``, infinite for ``A = 0``.  Rounding is resolved downwards,
    so ``kept_signal(end, 1 / largest_z(end, A)**2) >= A`` holds exactly."""
    if min_signal <= 0.0:
        return math.inf
    z = (1.0 / min_signal - end) / (1.0 - end)
    while z > 0.0 and kept_signal(end, 1.0 / z**2) < min_signal:
        z = math.nextafter(z, 0.0)
    return z


def transition(end: float, c: float, after_stage: int = 1) -> TransitionCoefficients:
    """NT-DM noise matching at a resolution change (docs/method.md §3).

    ``delta = (1 - e) / sqrt(c)``, ``s = e / (delta + e)``, ``a = 1 / (delta + e)``,
    ``b = delta / (delta + e)``.
    """
    if not 0.0 < c <= 0.25:
        raise ScheduleError(f"noise strength c={c} is outside (0, 1/4]; the correlated noise covariance I - cJ is only PSD there")
    start = float(restart_time(end, c))
    return TransitionCoefficients(
        after_stage=after_stage,
        end=end,
        start=start,
        signal_scale=kept_signal(end, c),
        noise_scale=1.0 - start,
        overlap=end - start,
    )


def stage_starts(ends: list[float], c: float) -> list[float]:
    """Start of every stage: 0 for the first, the re-noised start for each later one."""
    return [0.0] + [transition(e, c).start for e in ends[:-1]]


# ----------------------------------------------------------------------------------------
# The file format.
# ----------------------------------------------------------------------------------------

# Bounds on every number in a schedule file, declared here once and carried into
# schedules/schema.json by the Field constraints below.  They keep everything derived from a
# schedule (sigmas, transition coefficients, token counts) finite and the work of one call
# bounded, and they are far wider than anything ralu-calibrate writes.

#: Largest height and width in pixels: 4096 x 4096 is already 65536 FLUX tokens, 16x what
#: FLUX.1-dev and SD3 were trained at.
MAX_RESOLUTION = 4096
#: Most Euler steps of one stage, and of the baseline: the models are trained on 1000
#: discrete timesteps, so more steps cannot resolve anything new.
MAX_STEPS = 1000
#: Most stages a file may hold (the runtime itself runs at most 3; ``plan.STAGE_ROLES``).
MAX_STAGES = 8
#: Stage shifts h_k: the calibrator searches [0.5, 10]; a factor 1000 either way of 1 keeps
#: ``shift_sigma``/``unshift_sigma`` well conditioned (no overflow, no division by zero).
SHIFT_RANGE = (1e-3, 1e3)
#: The base model's own shift h0 (provenance, and SD3's skip-layer window): FLUX's grows as
#: exp(mu) with mu linear in the token count, about 1e5 at MAX_RESOLUTION squared.
BASE_SHIFT_RANGE = (1e-3, 1e6)
#: Z = 1 / sqrt(c).  Z >= 2 is c <= 1/4 (the noise covariance I - cJ is PSD only there);
#: the calibrator's default search range is [2, 100].
Z_RANGE = (2.0, 1e4)
#: c = 1 / Z^2 follows from Z_RANGE.
C_RANGE = (1.0 / Z_RANGE[1] ** 2, 1.0 / Z_RANGE[0] ** 2)
#: Largest FLOPs speed-up: RALU's last stage runs at full resolution, so one call costs at
#: least one baseline step and the speed-up is at most base_steps <= MAX_STEPS.
MAX_SPEEDUP = float(MAX_STEPS)
#: Longest free-text field (names, versions, timestamps).
MAX_TEXT = 200
#: Longest command a schedule file records (paths of a shared study may be long).
MAX_COMMAND = 2000

#: Every model of the file: unknown fields are errors, NaN and infinity are refused.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

#: One value of Z = 1 / sqrt(c).
_Z = Annotated[StrictFloat, Field(ge=Z_RANGE[0], le=Z_RANGE[1])]


class Stage(BaseModel):
    """One resolution stage: ``steps`` Euler steps from progress time ``start`` to ``end``
    on a grid shifted by ``shift``."""

    model_config = _STRICT

    steps: StrictInt = Field(ge=1, le=MAX_STEPS, description="Number of model evaluations (Euler steps) in this stage.")
    start: StrictFloat = Field(ge=0.0, le=1.0, description="Progress time where the stage starts (0 = noise).")
    end: StrictFloat = Field(ge=0.0, le=1.0, description="Progress time where the stage ends (1 = data).")
    shift: StrictFloat = Field(ge=SHIFT_RANGE[0], le=SHIFT_RANGE[1], description="Time shift h_k of this stage's sigma grid.")


class Divergence(BaseModel):
    """How far the realised timestep distribution P is from the target P_target."""

    model_config = _STRICT

    js_distance: StrictFloat = Field(ge=0.0, le=1.0, description="Jensen-Shannon DISTANCE (sqrt of the divergence, natural log; at most sqrt(ln 2)): the paper's 'JSD'.")
    js_divergence: StrictFloat = Field(ge=0.0, le=1.0, description="Jensen-Shannon divergence (natural log; at most ln 2) = js_distance**2.")
    objective: Literal["continuous", "discrete"] = Field(description="Which form of P produced these numbers.")


class FlopsSpeedup(BaseModel):
    """Baseline FLOPs / RALU FLOPs for one image, end to end, on the real architecture."""

    model_config = _STRICT

    total: StrictFloat = Field(gt=0.0, le=MAX_SPEEDUP, description="Linear + attention FLOPs.")
    linear: StrictFloat = Field(gt=0.0, le=MAX_SPEEDUP, description="Linear and conv layers only (the paper's convention).")


class Calibration(BaseModel):
    """Provenance: how the schedule was produced."""

    model_config = _STRICT

    optimizer: str = Field(max_length=MAX_TEXT, description="'global' or 'paper' (the inner search of shifts and c).")
    layout: Literal["given", "searched"] = Field(description="Whether steps/ends were given or found by the outer search.")
    target_speedup: StrictFloat | None = Field(default=None, gt=1.0, le=MAX_SPEEDUP, description="The --speedup target of the outer search, if any.")
    flops_convention: Literal["total", "linear"] = Field(description="Convention the speed-up target was checked in.")
    seed: StrictInt | None = Field(ge=0, le=2**64 - 1, description="Seed of the search.")
    h0: StrictFloat = Field(ge=BASE_SHIFT_RANGE[0], le=BASE_SHIFT_RANGE[1], description="Shift of the base model's own schedule at this resolution.")
    grid: StrictInt = Field(ge=2, le=10**6, description="Grid points (continuous) or bins (discrete) of the divergence.")
    z_bounds: tuple[_Z, _Z] = Field(description="Search range [low, high] of Z = 1/sqrt(c); equal values mean c was fixed.")
    min_signal: StrictFloat = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="Least signal a (signal_scale) every transition was required to keep, an upper bound on Z within z_bounds; 0 = none (also files written before the option).",
    )
    tool_version: str = Field(max_length=MAX_TEXT, description="ralu version that wrote the file.")
    created: str = Field(max_length=MAX_TEXT, description="UTC creation time, ISO 8601.")
    # Added later: absent (None) in files written before them, which still load.
    command: str | None = Field(
        default=None, max_length=MAX_COMMAND,
        description="The ralu-calibrate command that writes this file (for a Python call, the equivalent command).",
    )
    objective: str | None = Field(
        default=None, max_length=MAX_TEXT,
        description="What the inner and outer searches minimised: 'continuous', 'discrete' (JS distances), 'progress' (docs/method.md §4b) or 'quality' (measured on images).",
    )
    progress_model: str | None = Field(
        default=None, max_length=MAX_TEXT,
        description="Version of the fitted progress model (calibrate/progress_model.json) in force: what J and the RALU-or-plain verdict used.",
    )

    @field_validator("z_bounds")
    @classmethod
    def _check_z_bounds(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not bounds[0] <= bounds[1]:
            raise ValueError(f"z_bounds={list(bounds)} has low > high. Fix: swap them")
        return bounds


class Schedule(BaseModel):
    """A calibrated RALU schedule.  Load with :func:`load_schedule`, save with
    :func:`save_schedule`; the JSON Schema is ``schedules/schema.json``.  Every number must be
    finite and of the declared type (no strings or booleans for numbers) and within its bounds."""

    model_config = _STRICT

    version: StrictInt = Field(
        json_schema_extra={"const": SCHEDULE_VERSION},
        description=f"Schedule format version, the integer {SCHEDULE_VERSION} (checked before anything else).",
    )
    model: str = Field(max_length=MAX_TEXT, description=f"Model the schedule was calibrated for: one of {sorted(MODEL_FAMILIES)}.")
    height: StrictInt = Field(ge=RESOLUTION_MULTIPLE, le=MAX_RESOLUTION, multiple_of=RESOLUTION_MULTIPLE, description="Image height in pixels.")
    width: StrictInt = Field(ge=RESOLUTION_MULTIPLE, le=MAX_RESOLUTION, multiple_of=RESOLUTION_MULTIPLE, description="Image width in pixels.")
    base_steps: StrictInt = Field(ge=1, le=MAX_STEPS, description="Steps of the baseline sampler the speed-up is measured against.")
    stages: list[Stage] = Field(min_length=1, max_length=MAX_STAGES, description="Stages from lowest to full resolution.")
    c: StrictFloat = Field(
        json_schema_extra={"minimum": C_RANGE[0], "maximum": C_RANGE[1]},
        description="Noise strength of the correlated noise, in (0, 1/4]; Z = 1/sqrt(c).",
    )
    up_ratio: StrictFloat = Field(ge=0.0, le=1.0, description="Fraction of low-res tokens upsampled early (mixed stage).")
    divergence: Divergence
    flops_speedup: FlopsSpeedup
    transitions: list[TransitionCoefficients] = Field(max_length=MAX_STAGES - 1, description="What each stage change does (derived from ends and c; checked on load).")
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

    @field_validator("version")
    @classmethod
    def _check_version(cls, version: int) -> int:
        problem = _version_problem(version)
        if problem is not None:
            raise ValueError(problem)
        return version

    @model_validator(mode="after")
    def _check_consistency(self) -> Schedule:
        # Comparisons are written ``not (ok)`` so that a NaN, should one ever get here, fails them.
        if self.model not in MODEL_FAMILIES:
            raise ValueError(f"model {self.model!r} is unknown. Fix: use one of {sorted(MODEL_FAMILIES)}")
        if not C_RANGE[0] <= self.c <= C_RANGE[1]:
            raise ValueError(
                f"c={self.c} is outside [{C_RANGE[0]:g}, 0.25]: the noise covariance I - cJ is only PSD for c in (0, 1/4], "
                f"and c below {C_RANGE[0]:g} (Z above {Z_RANGE[1]:g}) injects no correlation worth the name. "
                f"Fix: recalibrate; Z = 1/sqrt(c) must lie in [{Z_RANGE[0]:g}, {Z_RANGE[1]:g}]"
            )
        ends = [stage.end for stage in self.stages]
        for k in range(1, len(ends)):
            if not ends[k] > ends[k - 1]:
                raise ValueError(f"stages.{k}.end={ends[k]} does not increase past stages.{k - 1}.end={ends[k - 1]}. Fix: ends must be strictly increasing")
        if not abs(ends[-1] - 1.0) <= _TOLERANCE:
            raise ValueError(f"stages.{len(ends) - 1}.end={ends[-1]} must be 1.0: the last stage has to finish at the data. Fix: set the last end to 1.0")
        for k, (stage, expected) in enumerate(zip(self.stages, stage_starts(ends, self.c))):
            if not abs(stage.start - expected) <= _TOLERANCE:
                how = "the first stage starts from pure noise" if k == 0 else f"s_{k + 1} = e_{k} / (delta_{k} + e_{k}) with delta_{k} = (1 - e_{k}) / sqrt(c)"
                raise ValueError(f"stages.{k}.start={stage.start} is inconsistent with c and the previous end (expected {expected:.9f}: {how}). Fix: recalibrate, or correct start or c")
            if not stage.start < stage.end:
                raise ValueError(f"stages.{k}: start={stage.start} is not before end={stage.end}. Fix: recalibrate with a larger gap between ends or a smaller c")
        expected_transitions = [transition(e, self.c, k + 1) for k, e in enumerate(ends[:-1])]
        if len(self.transitions) != len(expected_transitions):
            raise ValueError(f"transitions has {len(self.transitions)} entries, expected {len(expected_transitions)} (one per stage change). Fix: recalibrate")
        for k, (got, want) in enumerate(zip(self.transitions, expected_transitions)):
            for key, value in want.model_dump().items():
                if not abs(getattr(got, key) - value) <= _TOLERANCE:
                    raise ValueError(f"transitions.{k}.{key}={getattr(got, key)} is inconsistent with c and the ends (expected {value:.9f}). Fix: recalibrate")
        for k, want in enumerate(expected_transitions):
            if not want.signal_scale >= self.calibration.min_signal:
                raise ValueError(
                    f"transitions.{k} keeps signal a = {want.signal_scale:.6f}, below calibration.min_signal={self.calibration.min_signal:g} "
                    "the file claims. Fix: recalibrate, or correct calibration.min_signal"
                )
        return self

    def sigmas(self, stage_index: int) -> np.ndarray:
        """The ``steps + 1`` diffusers sigmas of one stage (0-based index)."""
        stage = self.stages[stage_index]
        return stage_sigmas(stage.steps, stage.start, stage.end, stage.shift)


# ----------------------------------------------------------------------------------------
# Loading and saving.
# ----------------------------------------------------------------------------------------


#: Largest schedule file read (a schedule is about 2 kB): a bigger one is not a schedule.
MAX_FILE_BYTES = 1 << 20

#: Validation problems spelled out in one error message; the rest are counted.
_MAX_PROBLEMS = 5

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 2, 40, 40, 4, 4

_FIXES = {
    "missing": "add the field (see schedules/schema.json)",
    "extra_forbidden": f"remove it: schedule format version {SCHEDULE_VERSION} has no such field",
    "finite_number": "use a finite number (NaN and infinity are not allowed)",
    "multiple_of": f"use a multiple of {RESOLUTION_MULTIPLE}: the latent is halved for the low-res stage and cut into 2x2 tokens",
    **dict.fromkeys(
        ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_long", "string_too_long"),
        "stay within the bounds in schedules/schema.json, or regenerate the file with ralu-calibrate",
    ),
}


def _one_line(text: str) -> str:
    """``text`` with control characters escaped: an error message stays on one line."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _short(value) -> str:
    """A bounded, one-line repr (safe on huge or deeply nested values)."""
    return _one_line(_SHORT.repr(value))


def _version_problem(version) -> str | None:
    """Why ``version`` (a file's raw ``version`` value) cannot be read by this ralu, or None.

    Only the integer ``SCHEDULE_VERSION`` is accepted: no ``"1"``, ``1.0`` or ``true``.  A
    larger integer is a file from a newer ralu, and the fix is to upgrade.
    """
    if type(version) is int and version == SCHEDULE_VERSION:
        return None
    if type(version) is int and version > SCHEDULE_VERSION:
        return (
            f"field 'version' is {_short(version)}: the file is from a newer ralu (this ralu reads version {SCHEDULE_VERSION}). "
            "Fix: upgrade ralu (pip install -U ralu), or regenerate the file with this ralu's ralu-calibrate"
        )
    return (
        f"field 'version' is {_short(version)}, not the integer {SCHEDULE_VERSION} (this ralu reads version {SCHEDULE_VERSION}). "
        f"Fix: set \"version\": {SCHEDULE_VERSION}, or regenerate the file with ralu-calibrate"
    )


def _format_problem(item: dict) -> str:
    """One validation problem: ``field=value: what is wrong. Fix: ...`` (our own checks
    name their fields and values themselves)."""
    where = _one_line(".".join(str(part)[:40] for part in item["loc"]))
    message = item["msg"].removeprefix("Value error, ")
    if "Fix:" not in message:
        message += ". Fix: " + _FIXES.get(item["type"], "correct the value (see schedules/schema.json) or regenerate the file with ralu-calibrate")
    if item["type"] in ("missing", "extra_forbidden"):
        return f"field '{where}': {message}"
    if item["type"] == "value_error":
        return f"field '{where}': {message}" if where else message
    return f"{where}={_short(item['input'])}: {message}"


def _format_validation_error(source: str, error: ValidationError) -> str:
    """All problems of one validation on one line (a CLI prints it as its one error line)."""
    problems = [_format_problem(item) for item in error.errors()]
    shown = "; ".join(problems[:_MAX_PROBLEMS])
    more = f"; and {len(problems) - _MAX_PROBLEMS} more" if len(problems) > _MAX_PROBLEMS else ""
    return _one_line(f"schedule {source} is invalid: {shown}{more}")


def schedule_from_dict(data: dict, source: str = "<dict>") -> Schedule:
    """Validate a parsed schedule, raising :class:`ScheduleError` that names field and fix.

    The version is checked first: a file of another version gets that one message rather
    than a list of fields its format does not share with this one.
    """
    source = _one_line(source)
    if not isinstance(data, dict):
        raise ScheduleError(f"schedule {source} is not a JSON object. Fix: regenerate it with ralu-calibrate")
    if "version" not in data:
        raise ScheduleError(f"schedule {source} has no field 'version'. Fix: add \"version\": {SCHEDULE_VERSION}, or regenerate the file with ralu-calibrate")
    problem = _version_problem(data["version"])
    if problem is not None:
        raise ScheduleError(f"schedule {source} is not readable: {problem}")
    try:
        return Schedule.model_validate(data)
    except ValidationError as error:
        raise ScheduleError(_format_validation_error(source, error)) from None
    except RecursionError:
        raise ScheduleError(f"schedule {source} is nested too deeply to be a schedule. Fix: regenerate it with ralu-calibrate") from None


def shipped_schedules() -> list[str]:
    """Names of the schedules shipped with ralu (``load_schedule(name)`` loads them)."""
    folder = resources.files("ralu.schedules")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json") and p.name != "schema.json")


def load_schedule(source: str | os.PathLike | Schedule | dict) -> Schedule:
    """Load a schedule from a shipped name (``"flux-dev-7x"``), a file path, a parsed dict,
    or pass a :class:`Schedule` through."""
    if isinstance(source, Schedule):
        return source
    if isinstance(source, dict):
        return schedule_from_dict(source)
    if source is None:
        raise ScheduleError(f"a schedule is required: a shipped name (one of {shipped_schedules()}), a path to a schedule JSON file, or a Schedule")
    if not isinstance(source, (str, os.PathLike)):
        raise ScheduleError(f"a schedule is a shipped name, a path, a dict or a Schedule, not {type(source).__name__}. Fix: pass one of those")
    path = Path(source)
    if _is_file(path):
        raw, where = _read_bounded(path, _one_line(str(path))), _one_line(str(path))
    else:
        name = str(source).removesuffix(".json")
        shipped = resources.files("ralu.schedules").joinpath(f"{name}.json")
        if name == "schema" or os.sep in name or not _is_file(shipped):
            raise ScheduleError(f"no schedule file {_short(str(source))} and no shipped schedule of that name. Fix: pass a path to a schedule JSON file or one of {shipped_schedules()}")
        raw, where = shipped.read_bytes(), f"'{name}' (shipped)"
    return schedule_from_dict(_parse_json(raw, where), where)


def _is_file(path) -> bool:
    """``path.is_file()``, False for names the OS refuses (too long, NUL bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _read_bounded(path: Path, where: str) -> bytes:
    """The bytes of a schedule file, refusing unreadable and implausibly large files."""
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise ScheduleError(f"schedule {where} cannot be read ({error.strerror or error}). Fix: check the path and its permissions") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ScheduleError(f"schedule {where} is larger than {MAX_FILE_BYTES} bytes, far more than a schedule file holds. Fix: pass the right file")
    return raw


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list) -> dict:
    """``json`` object hook: a key given twice is ambiguous, not silently the last one."""
    data = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKey(key)
        data[key] = value
    return data


def _parse_json(raw: bytes, where: str):
    """Parsed JSON of a schedule file; every way the bytes can fail is a ScheduleError naming the file."""
    fix = "Fix: regenerate it with ralu-calibrate"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ScheduleError(f"schedule {where} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); is it a schedule JSON file? {fix}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as error:
        raise ScheduleError(f"schedule {where} gives the key {_short(error.args[0])} twice in one object. Fix: keep one of them") from None
    except json.JSONDecodeError as error:
        raise ScheduleError(f"schedule {where} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}; truncated?). {fix}") from None
    except RecursionError:
        raise ScheduleError(f"schedule {where} is nested too deeply to be a schedule. {fix}") from None
    except ValueError as error:  # e.g. an integer literal beyond Python's digit limit
        raise ScheduleError(f"schedule {where} is not a usable JSON document ({_short(str(error))}). {fix}") from None


class OutputPathError(ValueError):
    """A file ralu was asked to write cannot be written as a regular file: the path exists
    and is not one (a device, FIFO, socket or folder), is a symbolic link, or is a name the
    OS refuses.  Raised before anything is created or written."""


#: What ``stat`` calls the kinds of file a write refuses to replace.
_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def _path_text(path) -> str:
    """A path for a one-line message: control characters escaped, a huge one shortened."""
    text = _one_line(os.fsdecode(path))
    return text if len(text) <= 200 else f"{text[:120]}...{text[-60:]}"


def check_output_file(path: str | os.PathLike, what: str = "") -> None:
    """Refuse, with a one-line :class:`OutputPathError`, a write target that exists and is not
    a regular file, or that is a symbolic link (to anything, even a regular file).

    ralu's writes replace the target by a rename; a rename would turn ``/dev/null`` or a FIFO
    into an ordinary file and replace a link by a file.  ralu neither follows nor replaces a
    link: the error names what the link points to, so the user can write there directly
    (docs/hardening.md).  Only the last component is checked; links among the folders above
    are followed as usual.  ``what`` (an option name such as ``--out``) starts the message.
    """
    label = f"{what} {_path_text(path)}" if what else _path_text(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise OutputPathError(f"{label}: a part of its folder path is not a folder but a file. Fix: choose a path inside a folder") from None
    except ValueError:  # an embedded NUL byte
        raise OutputPathError(f"{label} holds a NUL byte, which no file name can. Fix: choose another file name") from None
    except OSError as error:  # a name too long, a loop of links, no permission to look
        raise OutputPathError(f"{label} cannot be used as a file name ({error.strerror or error}). Fix: choose a shorter or reachable file name") from None
    if stat.S_ISLNK(info.st_mode):
        target = _path_text(os.path.realpath(path))
        raise OutputPathError(
            f"{label} is a symbolic link (to {target}); ralu neither writes through a link nor replaces it. "
            f"Fix: pass the file it points to ({target}), or remove the link"
        )
    if stat.S_ISDIR(info.st_mode):
        raise OutputPathError(f"{label} is a folder. Fix: give a file name, e.g. {_path_text(os.path.join(os.fspath(path), 'out'))}")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a regular file")
        raise OutputPathError(f"{label} exists and is {kind}; ralu replaces only regular files. Fix: choose another file name")


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Write a file through a temporary file in the same folder and a rename: readers see
    the old file or the new one, never a partial one.  ``write(stream)`` writes the content
    to a binary stream.

    The target is checked first (:func:`check_output_file`): one that exists and is not a
    regular file, or is a symbolic link, is refused before anything is created.  The file
    gets the mode a plain ``open(path, "w")`` would give it: an existing file keeps its
    mode, a new one gets ``0o666`` less the umask (``mkstemp`` alone would leave 0600).
    """
    path = Path(path)
    check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_current_umask()
    # The temporary name is the target's plus ~20 characters: keep it within NAME_MAX (255)
    # for a target whose own name is close to it.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name[:120]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`write_atomic` of ``data``."""
    return write_atomic(path, lambda stream: stream.write(data))


def _current_umask() -> int:
    # The umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_schedule(schedule: Schedule | dict, path: str | os.PathLike) -> Path:
    """Validate and write a schedule (a :class:`Schedule` or a schedule dict) atomically."""
    if isinstance(schedule, Schedule):
        schedule = schedule.model_dump()
    elif not isinstance(schedule, dict):
        raise ScheduleError(f"save_schedule takes a Schedule or a schedule dict, not {type(schedule).__name__}. Fix: pass load_schedule(...)'s result or a dict")
    schedule = schedule_from_dict(schedule, str(path))
    # The optional cache section is written only when set: files without one stay as they were.
    omit = {"cache"} if schedule.cache is None else None
    return write_text_atomic(path, schedule.model_dump_json(indent=2, exclude=omit) + "\n")


def schedule_json_schema() -> dict:
    """The JSON Schema of the schedule file (shipped as ``schedules/schema.json``)."""
    schema = Schedule.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"RALU schedule, version {SCHEDULE_VERSION}"
    return schema
