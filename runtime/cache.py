"""diffusers' step caches in a RALU run: which fit, how a schedule file asks for one, and
what a pipeline does with it at every stage.

A RALU call changes the token count twice (``M/4``, ``M/4 + 3k``, ``M`` tokens per image), so
a cache that keeps tensors from one step to the next cannot carry them over a stage change.
At the start of every stage :func:`stage_cache` resets every cache hook (step counters restart
with it, so per-step settings act per stage), and every forward runs in a cache context whose
name holds the stage and the branch (:func:`context_name`: ``"stage1-cond"``, ``"stage1-uncond"``
for FLUX's true CFG, whose two branches are separate forwards).

Which of diffusers 0.42's caches fit (checked on the tiny models by ``tests/runtime/test_caches.py``):

* ``FirstBlockCacheConfig``: FLUX.  Not SD3: the last SD3 block (``context_pre_only``) returns
  no text stream, and the cache's tail hook subtracts one (a ``TypeError`` in diffusers 0.42.1).
  Not FLUX.2 either (the hook fails on its blocks with a ``TypeError``; refused up front).
  FirstBlockCache and MagCache read diffusers' metadata of every block: a transformer whose
  blocks diffusers has not registered (Chroma's in 0.42.1) gets TaylorSeer only (refused up front).
* ``TaylorSeerCacheConfig``, ``MagCacheConfig``: FLUX and SD3 (and FLUX.2: ``tests/runtime/test_flux2.py``).  SD3's transformer has no
  ``enable_cache``; :func:`enable_cache` applies the same hook functions
  (``diffusers.hooks.apply_taylorseer_cache``, ``apply_mag_cache``) to it.
* ``PyramidAttentionBroadcastConfig``: not supported.  Its cached attention outputs are kept
  per module, not per cache context, so FLUX's true-CFG branches would reuse each other's
  attention; and it needs the pipeline's current timestep through a callback.
* ``FasterCacheConfig``: not supported.  It assumes the classifier-free-guidance halves are
  one batch it can split (FLUX's true CFG runs them as separate forwards, guidance-distilled
  FLUX has none); on the tiny FLUX it fails with a shape error.
* ``SeaCacheConfig``: not wired.  It needs the step index, sigma and step count in every cache
  context; the FLUX forward helper opens its context with a name only.
* ``TextKVCacheConfig``: a text-stream cache of other model families; nothing to do with steps.

MagCache decides from a table of magnitude ratios, one per step, that depends on the step
grid: RALU's stages walk their own shifted grids, so the 50-step table of a plain sampler does
not describe them.  :func:`mag_cache_config` takes one ratio per step of the whole schedule
(stage after stage, what ``ralu-calibrate --magcache SCHEDULE`` measures) and :func:`stage_cache` hands each
stage its own slice.

Whether a batch changes an image: TaylorSeer and MagCache decide from the step number alone, so image i of a batch equals image i alone.  FirstBlockCache
decides from the mean change over the whole batch: images of a batch skip together.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

#: Version of the schedule file's ``cache`` section this ralu reads.
CACHE_SECTION_VERSION = 1

#: Kinds of cache a schedule file may name, and the diffusers config each becomes.
CACHE_KINDS = {
    "first_block": "FirstBlockCacheConfig",
    "taylorseer": "TaylorSeerCacheConfig",
    "magcache": "MagCacheConfig",
}

#: The settings each kind reads (the others must be left out).
_KIND_FIELDS = {
    "first_block": {"threshold"},
    "taylorseer": {"cache_interval", "disable_cache_before_step", "max_order"},
    "magcache": {"threshold", "max_skip_steps", "retention_ratio", "mag_ratios"},
}

#: Bounds of ``mag_ratios``: at most this many stages and steps per stage (the schedule
#: file's own MAX_STAGES and MAX_STEPS), each ratio in (0, MAX_MAG_RATIO] (measured ratios lie near 1).
MAX_CACHE_STAGES, MAX_CACHE_STEPS, MAX_MAG_RATIO = 8, 1000, 100.0

#: diffusers' config classes a RALU pipeline knows how to run (see the module docstring).
SUPPORTED_CONFIGS = tuple(CACHE_KINDS.values())


class CacheSettings(BaseModel):
    """The optional ``cache`` section of a schedule file: one diffusers step cache for every
    stage of the schedule (settings act per stage; step counters restart at each stage)."""

    # Typed as strictly as the rest of the schedule file: no strings or booleans for numbers,
    # no NaN or infinity (a loadable section always saves to a file that loads back).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    version: Literal[1] = Field(default=CACHE_SECTION_VERSION, description="Version of the cache section; this ralu reads 1.")
    kind: str = Field(max_length=40, description=f"Cache kind: one of {sorted(CACHE_KINDS)}.")
    threshold: StrictFloat | None = Field(
        default=None, ge=0.0, le=1.0,
        description="first_block: relative change of the first block's output under which the other blocks are skipped (0 = never skip); "
        "magcache: accumulated magnitude error allowed while skipping (0 = never skip).",
    )
    cache_interval: StrictInt | None = Field(default=None, ge=1, le=100, description="taylorseer: a full forward every this many steps of a stage.")
    disable_cache_before_step: StrictInt | None = Field(
        default=None, ge=1, le=1000,
        description="taylorseer: steps of a stage always computed in full at its start; at least 1, since the extrapolation needs one computed step (diffusers' default 3).",
    )
    max_order: StrictInt | None = Field(default=None, ge=0, le=4, description="taylorseer: order of the Taylor extrapolation.")
    max_skip_steps: StrictInt | None = Field(default=None, ge=1, le=100, description="magcache: most consecutive skipped steps.")
    retention_ratio: StrictFloat | None = Field(default=None, ge=0.0, le=1.0, description="magcache: fraction of a stage's first steps never skipped.")
    mag_ratios: list[list[Annotated[StrictFloat, Field(gt=0.0, le=MAX_MAG_RATIO)]]] | None = Field(
        default=None, max_length=MAX_CACHE_STAGES,
        description="magcache (required): magnitude ratios, one list per stage with one positive ratio per step of that stage (ralu-calibrate --magcache SCHEDULE).",
    )

    @field_validator("version", mode="before")
    @classmethod
    def _check_version(cls, version):
        if type(version) is not int:  # not true, 1.0 or "1"
            raise ValueError(f"cache version {version!r} is not the integer {CACHE_SECTION_VERSION}. Fix: set \"version\": {CACHE_SECTION_VERSION} or leave it out")
        return version

    @field_validator("mag_ratios")
    @classmethod
    def _check_stage_lengths(cls, ratios):
        if ratios is not None and any(not 1 <= len(stage) <= MAX_CACHE_STEPS for stage in ratios):
            raise ValueError(f"every stage of mag_ratios needs 1 to {MAX_CACHE_STEPS} ratios. Fix: measure them with ralu-calibrate --magcache SCHEDULE")
        return ratios

    @model_validator(mode="after")
    def _check_kind(self) -> CacheSettings:
        if self.kind not in CACHE_KINDS:
            raise ValueError(f"cache kind {self.kind!r} is unknown. Fix: use one of {sorted(CACHE_KINDS)} (see ralu.runtime.cache for the caches that do not fit)")
        others = set().union(*_KIND_FIELDS.values()) - _KIND_FIELDS[self.kind]
        extra = sorted(name for name in others if getattr(self, name) is not None)
        if extra:
            raise ValueError(f"cache kind {self.kind!r} does not read {extra}. Fix: remove them")
        if self.kind == "magcache":
            if self.mag_ratios is None:
                raise ValueError("cache kind 'magcache' needs mag_ratios (one list per stage). Fix: measure them with ralu-calibrate --magcache SCHEDULE")
            if any(not ratio > 0 for stage in self.mag_ratios for ratio in stage):
                raise ValueError("mag_ratios must be positive. Fix: measure them with ralu-calibrate --magcache SCHEDULE")
        return self

    def check_stages(self, steps: list[int]) -> None:
        """Per-stage settings must match the schedule's stages (``steps`` per stage)."""
        if self.mag_ratios is not None and [len(stage) for stage in self.mag_ratios] != list(steps):
            raise ValueError(f"mag_ratios has {[len(stage) for stage in self.mag_ratios]} ratios per stage but the schedule takes {list(steps)} steps. Fix: measure them for this schedule with ralu-calibrate --magcache SCHEDULE")

    def diffusers_config(self):
        """The diffusers config object of these settings (defaults: diffusers' own)."""
        from diffusers import hooks

        given = {name: getattr(self, name) for name in _KIND_FIELDS[self.kind] if getattr(self, name) is not None}
        if self.kind == "first_block":
            return hooks.FirstBlockCacheConfig(**given)
        if self.kind == "taylorseer":
            return hooks.TaylorSeerCacheConfig(**given)
        return mag_cache_config(given.pop("mag_ratios"), **given)


def mag_cache_config(stage_ratios: list[list[float]], **settings):
    """A ``MagCacheConfig`` holding one ratio per step of a whole schedule, stage after stage
    (:func:`stage_cache` gives each stage its slice)."""
    from diffusers.hooks import MagCacheConfig

    flat = [float(ratio) for stage in stage_ratios for ratio in stage]
    return MagCacheConfig(mag_ratios=flat, num_inference_steps=len(flat), **settings)


# ----------------------------------------------------------------------------------------
# A transformer's cache during a call.
# ----------------------------------------------------------------------------------------


def cache_config(transformer):
    """The diffusers cache config enabled on ``transformer``, or None."""
    return getattr(transformer, "_cache_config", None)


#: Caches whose hooks read diffusers' metadata of each transformer block (where its hidden
#: states and text stream are among the arguments and outputs).
BLOCK_METADATA_CACHES = ("FirstBlockCacheConfig", "MagCacheConfig")
#: The attributes holding a transformer's blocks, as diffusers' cache hooks find them.
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def _unregistered_blocks(transformer) -> list[str]:
    """Class names of ``transformer``'s blocks that diffusers' block registry does not know
    (Chroma's in 0.42.1): FirstBlockCache and MagCache would fail on them mid-run."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    missing = set()
    for attribute in _BLOCK_LISTS:
        for block in getattr(transformer, attribute, None) or ():
            try:
                TransformerBlockRegistry.get(type(block))
            except ValueError:
                missing.add(type(block).__name__)
    return sorted(missing)


def _check_fits(transformer, name: str) -> None:
    """Refuse a diffusers cache config (by class name) that does not fit a RALU call on
    ``transformer`` (see the module docstring for why)."""
    if name not in SUPPORTED_CONFIGS:
        raise ValueError(f"{name} does not fit RALU's stages (see ralu.runtime.cache). Fix: use one of {list(SUPPORTED_CONFIGS)}")
    if name == "FirstBlockCacheConfig" and not hasattr(transformer, "enable_cache"):
        raise ValueError(f"FirstBlockCache does not run on {type(transformer).__name__}: its last block returns no text stream, which the cache's tail hook needs. Fix: use TaylorSeerCacheConfig or MagCacheConfig")
    unregistered = _unregistered_blocks(transformer) if name in BLOCK_METADATA_CACHES else []
    if unregistered:
        raise ValueError(
            f"{name} does not run on {type(transformer).__name__}: its hooks need diffusers' metadata of every transformer block, "
            f"and diffusers has none for {', '.join(unregistered)}. Fix: use TaylorSeerCacheConfig"
        )
    if name == "FirstBlockCacheConfig" and type(transformer).__name__ == "Flux2Transformer2DModel":
        # FLUX.2's blocks take and return other tensors than the hooks expect: diffusers 0.42.1's
        # FirstBlockCache fails in the forward with a TypeError.
        raise ValueError("FirstBlockCache does not run on Flux2Transformer2DModel (diffusers' hook fails on its blocks). Fix: use TaylorSeerCacheConfig or MagCacheConfig")


def enable_cache(transformer, config) -> None:
    """``transformer.enable_cache(config)``, also for transformers without diffusers'
    ``CacheMixin`` (SD3: the same hook functions, applied directly)."""
    name = type(config).__name__
    _check_fits(transformer, name)
    if hasattr(transformer, "enable_cache"):
        transformer.enable_cache(config)
        return
    from diffusers import hooks

    if cache_config(transformer) is not None:
        raise ValueError(f"a cache ({type(cache_config(transformer)).__name__}) is already enabled. Fix: disable_cache(transformer) first")
    apply = {
        "TaylorSeerCacheConfig": hooks.apply_taylorseer_cache,
        "MagCacheConfig": hooks.apply_mag_cache,
    }[name]
    apply(transformer, config)
    transformer._cache_config = config


def disable_cache(transformer) -> None:
    """Undo :func:`enable_cache`."""
    if hasattr(transformer, "disable_cache"):
        transformer.disable_cache()
        return
    from diffusers.models.cache_utils import CacheMixin

    if cache_config(transformer) is not None:
        CacheMixin.disable_cache(transformer)


def check_cache(transformer, steps: list[int], settings: CacheSettings | None = None) -> None:
    """Refuse, before any compute, a cache a RALU call with stages of ``steps`` cannot run:
    the transformer's own, or the schedule's ``settings``."""
    config = cache_config(transformer)
    if settings is not None:
        if config is not None:
            raise ValueError(f"the schedule asks for a {settings.kind} cache but the transformer already has {type(config).__name__}. Fix: disable one of them")
        settings.check_stages(steps)
        _check_fits(transformer, CACHE_KINDS[settings.kind])
        return
    if config is None:
        return
    name = type(config).__name__
    _check_fits(transformer, name)
    start = getattr(config, "disable_cache_before_step", None)
    if name == "TaylorSeerCacheConfig" and not (type(start) is int and start >= 1):
        raise ValueError(
            f"TaylorSeerCacheConfig(disable_cache_before_step={start!r}): the Taylor extrapolation needs at least one computed step at the start of "
            "every stage (diffusers fails with 'Cannot predict without prior initialization'). Fix: an integer of at least 1 (diffusers' default is 3)"
        )
    if name == "MagCacheConfig" and not config.calibrate and len(config.mag_ratios) != sum(steps):
        raise ValueError(
            f"MagCacheConfig has {len(config.mag_ratios)} magnitude ratios but the schedule takes {sum(steps)} steps ({' + '.join(map(str, steps))}): "
            "ratios of another step grid do not describe RALU's stages. Fix: measure them with ralu-calibrate --magcache SCHEDULE and pass ralu.runtime.cache.mag_cache_config(ratios)"
        )


def context_name(stage_index: int, branch: str) -> str:
    """Cache context of one branch (``"cond"``, ``"uncond"``, ...) of one stage (0-based)."""
    return f"stage{stage_index + 1}-{branch}"


def cache_context(transformer, name: str):
    """``transformer.cache_context(name)``, also without ``CacheMixin``; nothing when no
    cache is enabled."""
    if cache_config(transformer) is None:
        return nullcontext()
    if hasattr(transformer, "cache_context"):
        return transformer.cache_context(name)
    from diffusers.models.cache_utils import CacheMixin

    return CacheMixin.cache_context(transformer, name)


@contextmanager
def stage_cache(transformer, first_step: int, steps: int):
    """Around one stage (its steps ``first_step .. first_step + steps - 1`` of the schedule):
    the cache starts empty, and MagCache reads this stage's slice of its ratio table."""
    config = cache_config(transformer)
    if config is None:
        yield
        return
    from diffusers.models.cache_utils import CacheMixin

    CacheMixin._reset_stateful_cache(transformer)  # nothing survives a token-count change
    if type(config).__name__ != "MagCacheConfig" or config.calibrate:
        yield
        return
    saved = config.mag_ratios, config.num_inference_steps
    config.mag_ratios, config.num_inference_steps = saved[0][first_step : first_step + steps], steps
    try:
        yield
    finally:
        config.mag_ratios, config.num_inference_steps = saved


@contextmanager
def schedule_cache(transformer, settings: CacheSettings | None):
    """For one call: the schedule file's cache enabled on ``transformer`` (and disabled after);
    nothing when the schedule has none (:func:`check_cache` refuses it next to a cache the
    caller enabled)."""
    if settings is None:
        yield
        return
    enable_cache(transformer, settings.diffusers_config())
    try:
        yield
    finally:
        disable_cache(transformer)
