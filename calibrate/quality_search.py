"""Quality in the loop: an Optuna search over whole schedules scored on images.

Every candidate (one, two or three stages; steps per stage within the FLOPs budget; stage
ends; shifts; Z = 1/sqrt(c); up-ratio) samples the search's prompts and seeds through the
RALU pipeline, and is scored by its distance to the base model's samples of the same
prompts and seeds (``base_steps`` steps, generated once and cached on disk).  Among the
first candidates are the plain fewer-steps sampler and two-stage layouts, so the search can
answer "fewer steps" when that is what the images say.

* Metric: a callable ``metric(images, references) -> (n,)`` distances (images in [0, 1],
  ``(n, 3, H, W)``), ``"pixel"`` (default, no weights: RMS pixel difference), or a folder
  holding a feature model saved with ``torch.export.save`` as ``features.pt2`` (features'
  mean squared difference).  A set-level callable (``set_level = True``, e.g. a Frechet
  distance) scores the whole set.
* Spectral term: the score is ``distance * (1 + spectral_weight * spectral)``, ``spectral``
  the distance between the mean radial power spectra (luma, Hann window) of the candidate's
  images and of the references (:func:`spectral_distance`, the quality testbed's definition
  in the product's own code), so that a candidate that smooths away the model's fine detail
  pays for it even where the distance does not see it.  The factor is relative, so one
  weight serves every metric; :data:`SPECTRAL_WEIGHT` says why 4.  0 is the distance alone.
* Target: the pipeline, prompts, reference key, metric and cost ``speedup_of`` are
  arguments; nothing here knows a particular model.  A named target (``--pipeline NAME``,
  e.g. the lab's quality testbed) plugs in through :mod:`ralu.calibrate.plugins`.
* Steps: a drawn layout is a number of stages and the weight of each stage's share of the
  steps; its steps are as many as the budget affords in those proportions
  (:func:`budget_steps`), so every draw is feasible and spends the budget.  Known schedules
  given as candidates keep their own steps.
* Pruning: each trial reports its running mean after every batch of images; Optuna's
  median pruner stops trials clearly worse than the finished ones.
* Shared and resumable: with ``storage`` the study lives in a journal file or database
  (:mod:`ralu.calibrate.study`): several processes work on one study, a rerun resumes it,
  and no parameter set is evaluated twice.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from ralu.runtime.models import get_model, stage_image_tokens
from ralu.runtime.schedule import Schedule, schedule_from_dict, stage_starts, transition

from . import study as shared
from .budget import STAGE_WEIGHT, SpeedupOf, budget_steps
from .fewer_steps import ONE_STAGE_C, plain_schedule
from .flops import pricing
from .search import CONTINUOUS_GRID, MIN_SIGNAL, SHIFT_BOUNDS, Z_BOUNDS, NTDMObjective, StageLayout, check_min_signal, z_ceiling
from .spectra import radial_power_spectrum, spectral_distance

#: Up-ratios and end grid of the search (the layout search's).
UP_RATIOS = (0.1, 0.15, 0.2, 0.25, 0.3)
END_STEP = 0.05
TWO_STAGE_END = (0.1, 0.7)
FIRST_END = (0.1, 0.5)
SECOND_GAP = (0.05, 0.3)
#: A candidate that misses the budget scores this plus its shortfall (never sampled).
INFEASIBLE = 1e6
#: Trial attribute holding the steps of an enqueued candidate (a known schedule keeps its own).
GIVEN_STEPS_ATTR = "given_steps"
#: Trials the median pruner lets finish before it prunes anything.
PRUNER_STARTUP = 4

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def pixel_distance(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """RMS difference per image on [0, 1] pixels (a PSNR of ``-20 log10`` of it): needs no weights."""
    return (images.double() - references.double()).pow(2).flatten(1).mean(dim=1).sqrt()


def feature_distance(features: Callable[[torch.Tensor], torch.Tensor]) -> Metric:
    """Mean squared difference of ``features(images)`` per image pair."""

    def metric(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            a, b = features(images).double(), features(references).double()
        return (a - b).pow(2).flatten(1).mean(dim=1)

    return metric


# The spectral term: mean radial power spectra of two image sets (ralu.calibrate.spectra).
#: Weight of the spectral term (score = distance * (1 + weight * spectral)).  Held out, the
#: FLUX 7x budget-filling pick made 12-15 % less power than the 50-step samples at middle
#: and fine radii (spectral distance 0.059 to them, against 0.028-0.030 for the schedules
#: that keep the model's spectrum; reports/experiments/quality-search-v2/budget-filling/
#: fidelity-7x.md), which FD alone did not penalise.  At 4 that excess costs 11 % of the
#: score, (1 + 4 * 0.059) / (1 + 4 * 0.029) = 1.11: the FD margin by which the pick won its
#: search (144.3 against the published preset's 160.3).  So a smoothing that large has to be
#: bought with at least that much FD.
SPECTRAL_WEIGHT = 4.0


def check_spectral_weight(weight, name: str = "spectral_weight=") -> float:
    """``weight`` as a float when it is a finite number >= 0; a one-line ValueError naming it
    as ``name`` (the keyword, or a command-line option) otherwise."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(weight, bool) or not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name}{weight!r} must be a finite number >= 0 (0: the distance alone). Fix: e.g. {name}{SPECTRAL_WEIGHT:g}")
    return value


def spectral_score(distance: float, spectral: float, weight: float) -> float:
    """The search's score: ``distance * (1 + weight * spectral)``."""
    return distance * (1.0 + weight * spectral)


#: A feature model in a metric folder: an exported program (``torch.export.save``) mapping
#: images in [0, 1] ``(n, 3, H, W)`` to features.
FEATURE_FILE = "features.pt2"
#: Named metrics (the callables' builders); any callable works too.
METRICS = {"pixel": lambda: pixel_distance}


def load_metric(metric: str | os.PathLike | Metric | None) -> Metric:
    """A metric from a callable, a name of :data:`METRICS` (None: ``"pixel"``) or a folder
    with a :data:`FEATURE_FILE`.  A callable returns per-image distances ``(n,)``;
    one with ``set_level = True`` returns one number for the whole set, and is then
    re-evaluated on every image so far after each batch."""
    if callable(metric):
        return metric
    if metric is None:
        metric = "pixel"
    if isinstance(metric, str) and metric in METRICS:
        return METRICS[metric]()
    model_file = Path(metric) / FEATURE_FILE
    if not model_file.is_file():
        raise ValueError(f"metric {str(metric)!r} is neither one of {sorted(METRICS)} nor a folder holding {FEATURE_FILE}. Fix: pass one of those")
    try:
        model = torch.export.load(str(model_file)).module()
    except Exception as error:  # torch's own load errors are many and unrelated
        raise ValueError(f"cannot load the feature model {model_file}: {str(error).splitlines()[0]}. Fix: save it with torch.export.save") from None
    return feature_distance(model)


# ----------------------------------------------------------------------------------------
# Schedules from parameters
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One point of the search space."""

    steps: tuple[int, ...]
    ends: tuple[float, ...]
    shifts: tuple[float, ...]
    z: float
    up_ratio: float

    def key(self) -> str:
        """Identity of the parameter set (what two trials must share to be twins)."""
        return json.dumps({"steps": self.steps, "ends": [round(e, 4) for e in self.ends], "shifts": [round(h, 4) for h in self.shifts],
                           "z": round(self.z, 3), "up_ratio": self.up_ratio})


def candidate_of(schedule: Schedule) -> Candidate:
    """The search-space point of an existing schedule (a published preset, the calibrator's
    answer), so that a search can start from it; stage ends are kept to 2 decimals, the
    search's own resolution."""
    stages = schedule.stages
    n = len(stages)
    return Candidate(tuple(s.steps for s in stages), tuple(round(s.end, 2) for s in stages), tuple(float(s.shift) for s in stages),
                     float(schedule.z) if n > 1 else Z_BOUNDS[0], float(schedule.up_ratio) if n == 3 else 0.0)


def candidate_schedule(model: str, height: int, width: int, base_steps: int, h0: float, candidate: Candidate, tool_version: str = "0+unknown",
                       min_signal: float = 0.0) -> Schedule:
    """A validated schedule for ``candidate`` (one stage: :func:`plain_schedule`'s form with its shift)."""
    name = get_model(model).name
    c = ONE_STAGE_C if len(candidate.steps) == 1 else 1.0 / candidate.z**2
    layout = StageLayout(candidate.steps, candidate.ends)
    distance = float(NTDMObjective(layout, h0).distance(np.array([[*candidate.shifts, 1.0 / math.sqrt(c)]]))[0])
    speed = pricing.flops_speedup(name, height, width, list(candidate.steps), candidate.up_ratio, base_steps)
    starts = stage_starts(list(candidate.ends), c)
    data = {
        "version": 1, "model": name, "height": height, "width": width, "base_steps": base_steps,
        "stages": [{"steps": n, "start": s, "end": e, "shift": h} for n, s, e, h in zip(candidate.steps, starts, candidate.ends, candidate.shifts)],
        "c": c,
        "up_ratio": candidate.up_ratio,  # 0 unless three stages: only the mixed stage uses it
        "divergence": {"js_distance": distance, "js_divergence": distance**2, "objective": "continuous"},
        "flops_speedup": {"total": speed.total, "linear": speed.linear},
        "transitions": [transition(e, c, k + 1).model_dump() for k, e in enumerate(candidate.ends[:-1])],
        "calibration": {
            "optimizer": "quality search", "layout": "searched", "target_speedup": None, "flops_convention": "linear", "seed": None,
            "h0": float(h0), "grid": CONTINUOUS_GRID, "z_bounds": [Z_BOUNDS[0], Z_BOUNDS[1]], "min_signal": min_signal, "tool_version": tool_version,
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        },
    }
    return schedule_from_dict(data, "quality-search candidate")


# ----------------------------------------------------------------------------------------
# Images: the candidate's and the cached references
# ----------------------------------------------------------------------------------------


def to_ralu(pipe):
    """The RALU pipeline of the same family sharing ``pipe``'s components."""
    from ralu.runtime import RALUFluxPipeline, RALUStableDiffusion3Pipeline

    if isinstance(pipe, (RALUFluxPipeline, RALUStableDiffusion3Pipeline)):
        return pipe
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    for plain, ralu in ((FluxPipeline, RALUFluxPipeline), (StableDiffusion3Pipeline, RALUStableDiffusion3Pipeline)):
        if isinstance(pipe, plain):
            converted = ralu.from_pipe(pipe, vae=pipe.vae, dtype=pipe.transformer.dtype)
            converted.set_progress_bar_config(disable=True)
            return converted
    raise ValueError(f"a {type(pipe).__name__}: the quality search runs FLUX and SD3 pipelines. Fix: pass a FluxPipeline, StableDiffusion3Pipeline or a RALU one")


class ReferenceCache:
    """Base-model samples on disk, one file per (pipeline, prompt, seed, size, steps, guidance)."""

    def __init__(self, folder: str | os.PathLike, pipeline_id: str):
        self.folder = Path(folder)
        self.pipeline_id = pipeline_id

    def path(self, prompt: str, seed: int, height: int, width: int, steps: int, guidance: float) -> Path:
        key = json.dumps([self.pipeline_id, prompt, int(seed), height, width, steps, float(guidance)])
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def load(self, path: Path) -> torch.Tensor | None:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError):  # absent, or unreadable: regenerate
            return None

    def store(self, path: Path, image: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(handle)
        try:
            torch.save(image.clone(), temporary)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)


@dataclass
class ImageSet:
    """The prompts and seeds a search scores on, and how to call the pipeline for them."""

    prompts: list[str]
    seeds: list[int]
    #: prompts -> keyword arguments of the pipeline call (default ``prompt=``)
    encode: Callable[[list[str]], dict] | None = None
    guidance_scale: float = 3.5
    batch_size: int = 8
    call_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prompts or len(self.prompts) != len(self.seeds):
            raise ValueError(f"{len(self.prompts)} prompts and {len(self.seeds)} seeds: give one seed per prompt, at least one of each")

    def batches(self) -> list[range]:
        return [range(i, min(i + self.batch_size, len(self.prompts))) for i in range(0, len(self.prompts), self.batch_size)]


class Sampler:
    """Runs schedules through a RALU pipeline on an :class:`ImageSet`; references cached."""

    def __init__(self, pipe, images: ImageSet, model: str, height: int, width: int, h0: float, base_steps: int, cache: ReferenceCache | None,
                 reference_seed_offset: int = 0):
        self.pipe = to_ralu(pipe)
        self.model = model
        self.offset = int(reference_seed_offset)
        self.images = images
        self.height, self.width = height, width
        self.h0, self.base_steps = h0, base_steps
        self.cache = cache

    def sample(self, schedule: Schedule, indices: Sequence[int], seed_offset: int = 0) -> torch.Tensor:
        """Images ``(n, 3, H, W)`` in [0, 1]; image i from its own generator (batch-independent)."""
        prompts = [self.images.prompts[i] for i in indices]
        device = self.pipe._execution_device
        generators = [torch.Generator("cpu").manual_seed(int(self.images.seeds[i]) + seed_offset) for i in indices]
        inputs = self.images.encode(prompts) if self.images.encode else {"prompt": prompts}
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with torch.no_grad():
            out = self.pipe(**inputs, schedule=schedule, height=self.height, width=self.width, guidance_scale=self.images.guidance_scale,
                            generator=generators, output_type="pt", **self.images.call_kwargs).images
        return out.float().cpu().clamp(0.0, 1.0)

    def references(self, indices: Sequence[int]) -> torch.Tensor:
        """Base-model samples (``base_steps`` steps on the base grid: FluxPipeline exactly; SD3: docs/diffusers.md §4)
        of the same prompts, from seed + ``reference_seed_offset``; from the cache when there."""
        paths = [
            self.cache.path(self.images.prompts[i], self.images.seeds[i] + self.offset, self.height, self.width, self.base_steps, self.images.guidance_scale) if self.cache else None
            for i in indices
        ]
        found = [self.cache.load(p) if p is not None else None for p in paths]
        missing = [i for i, image in zip(indices, found) if image is None]
        if missing:
            base = plain_schedule(self.model, self.base_steps, self.height, self.width, self.h0, self.base_steps)
            made = self.sample(base, missing, self.offset)
            for i, image in zip(missing, made):
                position = list(indices).index(i)
                found[position] = image
                if paths[position] is not None:
                    self.cache.store(paths[position], image)
        return torch.stack(found)


# ----------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """Best schedule overall, best plain and best RALU one, with their scores."""

    best: Schedule
    best_value: float
    plain: Schedule | None
    plain_value: float | None
    ralu: Schedule | None
    ralu_value: float | None
    trials: int
    pruned: int
    history: list[dict]
    #: speed-up of best / plain / ralu in the search's own cost model
    speedups: dict = field(default_factory=dict)
    #: the parts of the score of best / plain / ralu: ``{"distance": ..., "spectral": ...}``
    parts: dict = field(default_factory=dict)
    #: score = distance * (1 + spectral_weight * spectral)
    spectral_weight: float = 0.0

    @property
    def plain_wins(self) -> bool:
        return len(self.best.stages) == 1

    def describe(self) -> str:
        lines = [f"quality search: {self.trials} trials ({self.pruned} pruned); score = distance to the base model's samples x "
                 f"(1 + {self.spectral_weight:g} x spectral distance to them), lower is better"]
        for key, label, schedule, value in (("plain", "best plain (fewer steps)", self.plain, self.plain_value), ("ralu", "best RALU (2-3 stages)", self.ralu, self.ralu_value)):
            if schedule is None:
                lines.append(f"  {label}: none finished")
                continue
            stages = ", ".join(f"{s.steps}@[{s.start:.3f},{s.end:.2f}] h={s.shift:.2f}" for s in schedule.stages)
            extra = f", Z = {schedule.z:.2f}, r = {schedule.up_ratio:g}" if len(schedule.stages) > 1 else ""
            lines.append(f"  {label}: {value:.5f}{self._parts(self.parts.get(key, {}))}  ({stages}{extra}; speed-up {self.speedups.get(key, float('nan')):.2f}x)")
        for trial in self.history:
            source = trial.get(SOURCE_ATTR)
            if source in (None, *OWN_SEED_SOURCES):
                continue
            if trial["state"] == "COMPLETE" and trial.get("feasible"):
                outcome = f"{trial['value']:.5f}{self._parts(trial)}"
            elif trial["state"] == "COMPLETE":
                outcome = "outside the budget or the signal floor"
            else:
                outcome = trial["state"].lower()
            lines.append(f"  {source} (trial {trial['number']}): {outcome}")
        if self.plain_wins:
            lines.append("  the plain fewer-steps sampler scores best on these images: RALU's low-resolution stages do not pay for themselves here; the written schedule is that one-stage schedule")
        else:
            lines.append("  RALU scores best on these images")
        return "\n".join(lines)

    @staticmethod
    def _parts(record: dict) -> str:
        if not all(name in record for name in SCORE_PARTS):
            return ""
        return f" (distance {record['distance']:.5f}, spectral {record['spectral']:.4f})"

    def summary(self) -> dict:
        """The answer as JSON-ready data: the score's definition, and the best, best plain and
        best RALU schedules each with its score, the score's parts and its speed-up."""
        out = {"score": "distance * (1 + spectral_weight * spectral)", "spectral_weight": self.spectral_weight,
               "trials": self.trials, "pruned": self.pruned, "plain_wins": self.plain_wins}
        for key, schedule, value in (("best", self.best, self.best_value), ("plain", self.plain, self.plain_value), ("ralu", self.ralu, self.ralu_value)):
            out[key] = None if schedule is None else {
                "score": value, **self.parts.get(key, {}), "speedup": self.speedups.get(key),
                "schedule": schedule.model_dump(mode="json", exclude={"cache"} if schedule.cache is None else None),
            }
        return out


def default_speedup_of(model: str, height: int, width: int, base_steps: int, convention: str = "linear") -> SpeedupOf:
    name = get_model(model).name
    return lambda steps, ratio: getattr(pricing.flops_speedup(name, height, width, list(steps), ratio, base_steps), convention)


def _suggest(trial: optuna.Trial, h0: float, fill: Callable[[tuple[float, ...], float], tuple[int, ...] | None], min_signal: float = 0.0) -> Candidate | None:
    """The trial's candidate; None when its layout cannot meet the budget.  ``fill(weights,
    up_ratio)`` gives the steps (:func:`budget_steps`); an enqueued candidate brings its own
    (``GIVEN_STEPS_ATTR``)."""
    n_stages = trial.suggest_categorical("stages", [1, 2, 3])
    ratio = trial.suggest_categorical("up_ratio", list(UP_RATIOS)) if n_stages == 3 else 0.0
    given = trial.user_attrs.get(GIVEN_STEPS_ATTR)
    if given is not None:
        steps = tuple(int(n) for n in given)
    else:
        steps = fill((*(trial.suggest_float(f"weight_{k + 1}_of_{n_stages}", *STAGE_WEIGHT, log=True) for k in range(n_stages - 1)), 1.0), ratio)
    if n_stages == 1:
        ends: tuple[float, ...] = (1.0,)
    elif n_stages == 2:
        ends = (round(trial.suggest_float("end_1", *TWO_STAGE_END, step=END_STEP), 2), 1.0)
    else:
        first = round(trial.suggest_float("end_1", *FIRST_END, step=END_STEP), 2)
        ends = (first, round(first + trial.suggest_float("gap_2", *SECOND_GAP, step=END_STEP), 2), 1.0)
    shifts = tuple(trial.suggest_float(f"shift_{k + 1}", *SHIFT_BOUNDS, log=True) for k in range(n_stages))
    # Z is drawn below the cap that keeps min_signal at every transition (none for 0).
    z_high = min(Z_BOUNDS[1], max(Z_BOUNDS[0], z_ceiling(ends, min_signal)))
    z = trial.suggest_float("z", Z_BOUNDS[0], z_high, log=True) if n_stages > 1 else Z_BOUNDS[0]
    return None if steps is None else Candidate(steps, ends, shifts, z, ratio)


def seed_candidates(h0: float, plain_steps: int, speedup_of: SpeedupOf, target: float, max_steps: int) -> list[Candidate]:
    """The search's own first candidates: the plain sampler, and two-stage layouts with part
    of the budget at low resolution, that fit the budget."""
    seeds = [Candidate((plain_steps,), (1.0,), (h0,), Z_BOUNDS[0], 0.0)]
    for low_share in (0.3, 0.5):
        for end in (0.3, 0.5):
            full = max(1, plain_steps - 1 - round(low_share * plain_steps / 2))
            for low in range(max_steps, 0, -1):
                if speedup_of((low, full), 0.0) >= target:
                    seeds.append(Candidate((low, full), (end, 1.0), (h0, h0), 10.0, 0.0))
                    break
    return seeds


def search(
    pipe,
    prompts: Sequence[str],
    speedup: float,
    *,
    seeds: Sequence[int] | None = None,
    model: str | None = None,
    height: int | None = None,
    width: int | None = None,
    h0: float | None = None,
    base_steps: int | None = None,
    metric: str | os.PathLike | Metric | None = None,
    encode: Callable[[list[str]], dict] | None = None,
    guidance_scale: float = 3.5,
    batch_size: int = 8,
    speedup_of: SpeedupOf | None = None,
    trials: int = 40,
    seed: int = 0,
    storage: str | None = None,
    study_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    pipeline_id: str | None = None,
    extra_candidates: Sequence[Candidate | Schedule | tuple[str, Candidate | Schedule]] = (),
    reference_seed_offset: int = 0,
    min_signal: float = MIN_SIGNAL,
    spectral_weight: float = SPECTRAL_WEIGHT,
    show_progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
    **call_kwargs,
) -> SearchResult:
    """Search whole schedules for ``speedup`` (FLOPs speed-up at least this) on images.

    ``pipe`` is a FLUX or SD3 pipeline (plain or RALU); ``prompts`` with one seed each
    (default 0, 1, ...).  ``height``/``width`` default to the pipeline's default size,
    ``h0`` to the model's base shift there, ``base_steps`` to the model's baseline.
    ``speedup_of(steps, up_ratio)`` prices a layout (default: the FLOPs model of ``model``).
    References go to ``cache_dir`` (default: not kept) under ``pipeline_id`` (default: the
    pipeline's ``name_or_path``).  ``reference_seed_offset`` (default 0: the same seeds)
    draws the references from other seeds: with a set distance (a ``set_level`` metric) that
    compares distributions without rewarding a candidate for retracing the base model's
    path image by image.  ``min_signal``: every candidate's transitions keep at least this
    signal (Z is drawn below the cap of docs/method.md §4; a given candidate above it is
    infeasible; 0: no cap).  ``spectral_weight``: the score is ``distance * (1 +
    spectral_weight * spectral)`` (:data:`SPECTRAL_WEIGHT`; 0: the distance alone), both
    parts recorded on every trial; a stored study keeps the weight it was started with.
    Extra keyword arguments go to every pipeline call.
    """
    ralu = to_ralu(pipe)
    family = "flux" if type(ralu).__name__.startswith("RALUFlux") else "sd3"
    spec = get_model(model or ("flux-dev" if family == "flux" else "sd3-medium"))
    if height is None or width is None:
        size = ralu.default_sample_size * ralu.vae_scale_factor
        height, width = height or size, width or size
    h0 = spec.base_shift(height, width) if h0 is None else float(h0)
    base_steps = spec.base_steps if base_steps is None else int(base_steps)
    if not (isinstance(speedup, (int, float)) and math.isfinite(speedup) and speedup > 1.0):
        raise ValueError(f"speedup={speedup!r} must be a number above 1. Fix: e.g. speedup=4")
    if int(trials) < 1:
        raise ValueError(f"trials={trials!r} must be at least 1")
    min_signal = check_min_signal(min_signal)
    spectral_weight = check_spectral_weight(spectral_weight)
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    images = ImageSet(list(prompts), seeds, encode, guidance_scale, int(batch_size), dict(call_kwargs))
    speedup_of = speedup_of or default_speedup_of(spec.name, height, width, base_steps)
    pipeline_id = pipeline_id or str(getattr(ralu.config, "_name_or_path", "") or type(ralu).__name__)
    cache = ReferenceCache(cache_dir, pipeline_id) if cache_dir is not None else None
    sampler = Sampler(ralu, images, spec.name, height, width, h0, base_steps, cache, reference_seed_offset)
    measure = load_metric(metric)
    set_level = bool(getattr(measure, "set_level", False))

    plain_steps = 1
    while plain_steps < base_steps and speedup_of((plain_steps + 1,), 0.0) >= speedup:
        plain_steps += 1
    if speedup_of((plain_steps,), 0.0) < speedup:
        raise ValueError(f"not even 1 step reaches {speedup}x. Fix: a lower speedup")
    limit = 4 * base_steps

    def fill(weights: tuple[float, ...], up_ratio: float) -> tuple[int, ...] | None:
        return budget_steps(speedup_of, speedup, weights, up_ratio, limit)
    batches = images.batches()
    log(f"quality search for {speedup}x: {len(images.prompts)} images in {len(batches)} batches, {trials} trials, seed {seed}; the plain sampler affords {plain_steps} steps")
    references = [sampler.references(list(b)) for b in batches]
    reference_spectra = [radial_power_spectrum(r) for r in references]

    def objective(trial: optuna.Trial) -> float:
        candidate = _suggest(trial, h0, fill, min_signal)
        if candidate is None:
            trial.set_user_attr("feasible", False)
            return INFEASIBLE + speedup
        for name, value in (("steps", list(candidate.steps)), ("ends", list(candidate.ends)), ("z", candidate.z), ("up_ratio", candidate.up_ratio)):
            trial.set_user_attr(name, value)
        speed = speedup_of(candidate.steps, candidate.up_ratio)
        trial.set_user_attr("speedup", speed)
        if speed < speedup:
            trial.set_user_attr("feasible", False)
            return INFEASIBLE + (speedup - speed)
        ceiling = z_ceiling(candidate.ends, min_signal)
        if candidate.z > ceiling:  # an enqueued candidate, or no Z in range keeps the signal
            trial.set_user_attr("feasible", False)
            return INFEASIBLE + (candidate.z - ceiling) / candidate.z
        twin = shared.find_twin(trial, candidate.key())
        if twin is not None:
            trial.set_user_attr(shared.SAME_AS_ATTR, twin.user_attrs.get(shared.SAME_AS_ATTR, twin.number))
            trial.set_user_attr("feasible", twin.user_attrs.get("feasible", False))
            for name in SCORE_PARTS:
                if name in twin.user_attrs:
                    trial.set_user_attr(name, twin.user_attrs[name])
            return twin.value
        schedule = candidate_schedule(spec.name, height, width, base_steps, h0, candidate, min_signal=min_signal)
        made, distances, spectra = [], [], []
        for step, (indices, refs) in enumerate(zip(batches, references)):
            made.append(sampler.sample(schedule, list(indices)))
            spectra.append(radial_power_spectrum(made[-1]))
            if set_level:
                distance = float(measure(torch.cat(made), torch.cat(references[: step + 1])))
            else:
                distances.append(measure(made[-1], refs).double().reshape(-1))
                distance = float(torch.cat(distances).mean())
            spectral = spectral_distance(torch.cat(spectra), torch.cat(reference_spectra[: step + 1]))
            value = spectral_score(distance, spectral, spectral_weight)
            trial.set_user_attr("distance", distance)
            trial.set_user_attr("spectral", spectral)
            trial.set_user_attr("images_scored", sum(len(b) for b in batches[: step + 1]))
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        trial.set_user_attr("feasible", True)
        return value

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # A set-level distance of the first batch alone is too noisy to prune on.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP, n_warmup_steps=1 if set_level else 0)
    study = shared.open_study(storage, study_name, seed, pruner=pruner)
    keep_spectral_weight(study, spectral_weight, storage)
    for params, attrs in first_trials(seed_candidates(h0, plain_steps, speedup_of, speedup, limit), extra_candidates):
        study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=True)  # workers starting together enqueue each once
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done = sum(shared.count(study, s) for s in finished)
    if storage is not None and done:
        log(f"resuming study {study_name!r} in {storage}: {done} finished trials")
    if trials > done:
        with shared.stop_on_ctrl_c(study):
            study.optimize(objective, n_trials=trials - done, show_progress_bar=show_progress,
                           callbacks=[MaxTrialsCallback(trials, states=finished)])
    shared.wait_for_running(study, log)
    return _result(study, spec.name, height, width, base_steps, h0, min_signal, spectral_weight)


#: Trial attributes holding the two parts of a sampled trial's score (after its last batch).
SCORE_PARTS = ("distance", "spectral")
#: Study attribute holding the spectral weight its scores were made with.
SPECTRAL_WEIGHT_ATTR = "spectral_weight"


def keep_spectral_weight(study: optuna.Study, weight: float, storage: str | None) -> None:
    """Record ``weight`` on a new study; refuse, in one line, to resume one scored with
    another (a study from before the spectral term has weight 0), since scores made with two
    weights do not compare."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    stored = study.user_attrs.get(SPECTRAL_WEIGHT_ATTR, 0.0 if finished else None)
    if stored is None:
        study.set_user_attr(SPECTRAL_WEIGHT_ATTR, weight)
    elif float(stored) != weight:
        raise ValueError(f"study {study.study_name!r} in {storage} was scored with spectral weight {float(stored):g}, not {weight:g}. "
                         f"Fix: pass spectral weight {float(stored):g} to resume it, or a new study name")


#: Trial attribute naming where an enqueued candidate came from ("plain sampler", "published 7x preset", ...).
SOURCE_ATTR = "source"
#: Sources of the search's own first trials (:func:`seed_candidates`): the plain sampler, two-stage layouts.
OWN_SEED_SOURCES = ("plain sampler", "two-stage seed")


def first_trials(seeds: list[Candidate], extra: Sequence) -> list[tuple[dict, dict]]:
    """(parameters, trial attributes) of the trials a search starts with: its own seeds,
    then the caller's candidates (a :class:`Candidate`, a :class:`Schedule`, or ``(name,
    either)``).  Each keeps its own steps (``GIVEN_STEPS_ATTR``) and names its source."""
    named = [(OWN_SEED_SOURCES[0] if len(c.steps) == 1 else OWN_SEED_SOURCES[1], c) for c in seeds]
    for item in extra:
        name, item = item if isinstance(item, tuple) else ("given", item)
        named.append((name, candidate_of(item) if isinstance(item, Schedule) else item))
    return [(_params(c), {SOURCE_ATTR: name, GIVEN_STEPS_ATTR: list(c.steps)}) for name, c in named]


def _params(candidate: Candidate) -> dict:
    """The Optuna parameters of ``candidate`` other than its steps (those travel as ``GIVEN_STEPS_ATTR``)."""
    params: dict = {"stages": len(candidate.steps)}
    for k, h in enumerate(candidate.shifts):
        params[f"shift_{k + 1}"] = h
    if len(candidate.steps) > 1:
        params["end_1"], params["z"] = candidate.ends[0], candidate.z
    if len(candidate.steps) == 3:
        params["gap_2"], params["up_ratio"] = round(candidate.ends[1] - candidate.ends[0], 2), candidate.up_ratio
    return params


def _candidate(trial: optuna.trial.FrozenTrial) -> Candidate:
    n = trial.params["stages"]
    shifts = tuple(trial.params[f"shift_{k + 1}"] for k in range(n))
    return Candidate(tuple(trial.user_attrs["steps"]), tuple(trial.user_attrs["ends"]), shifts, trial.user_attrs["z"], trial.user_attrs["up_ratio"])


def _result(study: optuna.Study, model: str, height: int, width: int, base_steps: int, h0: float, min_signal: float = 0.0,
            spectral_weight: float = 0.0) -> SearchResult:
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE and t.user_attrs.get("feasible")]
    if not complete:
        raise ValueError(f"no candidate among {len(study.trials)} trials met the budget and finished. Fix: raise the number of trials or lower the speed-up")

    speedups, parts = {}, {}

    def best_of(key, trials):
        if not trials:
            return None, None
        best = min(trials, key=lambda t: (t.value, t.number))
        speedups[key] = best.user_attrs["speedup"]
        parts[key] = {name: best.user_attrs[name] for name in SCORE_PARTS if name in best.user_attrs}
        return candidate_schedule(model, height, width, base_steps, h0, _candidate(best), min_signal=min_signal), float(best.value)

    best, best_value = best_of("best", complete)
    plain, plain_value = best_of("plain", [t for t in complete if t.params["stages"] == 1])
    ralu, ralu_value = best_of("ralu", [t for t in complete if t.params["stages"] > 1])
    history = [{"number": t.number, "state": t.state.name, "value": t.value, **t.params, **t.user_attrs} for t in study.trials]
    pruned = sum(t.state == TrialState.PRUNED for t in study.trials)
    return SearchResult(best, best_value, plain, plain_value, ralu, ralu_value, len(study.trials), pruned, history, speedups, parts, spectral_weight)


# ----------------------------------------------------------------------------------------
# Helpers of a target (:mod:`ralu.calibrate.plugins`): a cost per layout, a weights key
# ----------------------------------------------------------------------------------------


def layout_speedup(cost, full_tokens: int, base_steps: int) -> SpeedupOf:
    """``speedup_of(steps, up_ratio)``: the base model's ``base_steps`` full-size forwards over a
    layout's forwards (its stages at their token counts), priced by ``cost`` (its ``of(token_counts).total``: the FLOPs of those forwards)."""
    baseline = cost.of([full_tokens] * base_steps).total

    def speedup_of(steps, ratio):
        tokens = stage_image_tokens(full_tokens, ratio, len(steps))
        return baseline / cost.of([n for n, k in zip(tokens, steps) for _ in range(k)]).total

    return speedup_of


def weights_id(module: torch.nn.Module) -> str:
    """A short hash of a module's weights (the reference cache's key for a pipeline without a name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
