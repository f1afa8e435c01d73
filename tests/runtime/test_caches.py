"""diffusers' step caches through RALU's three stages (FLUX and SD3, tiny models, CPU).

What is checked for every cache kind that fits (:mod:`ralu.runtime.cache`): all three stages
of the shipped 7x FLUX and 3x SD3 schedules run at batch 2 (FLUX with and without true CFG,
SD3 with CFG); every forward runs in a cache context named after its stage and branch; a cache
set never to skip gives exactly the output of no cache; image i of a batch equals image i alone with skipping active; a cache that does
skip changes the output (so the comparisons above are not vacuous).
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.hooks.hooks import StateManager
from sd3_models import pipeline_components, text_inputs

from ralu.runtime import RALUFluxPipeline, RALUStableDiffusion3Pipeline, ScheduleError
from ralu.runtime.cache import disable_cache, enable_cache, mag_cache_config
from ralu.runtime.schedule import load_schedule, schedule_from_dict

SIZE = 128
#: The shipped schedules every cache runs through (all their stages and steps), moved to SIZE.
SHIPPED = {"flux": "flux-dev-7x", "sd3": "sd3-medium-3x"}
#: The caches each family runs (FirstBlockCache does not run on SD3, see ralu.runtime.cache).
KINDS = {"flux": ["first_block", "taylorseer", "magcache"], "sd3": ["taylorseer", "magcache"]}


def shipped(family: str):
    """The family's shipped schedule at the tiny models' size (stages, steps, shifts, c and up-ratio kept)."""
    return schedule_from_dict({**load_schedule(SHIPPED[family]).model_dump(), "height": SIZE, "width": SIZE}, f"{SHIPPED[family]} at {SIZE} px")


def steps_of(schedule) -> list[int]:
    return [stage.steps for stage in schedule.stages]


def never_skip(kind: str, steps: list[int]):
    """A config of ``kind`` that computes every block at every step."""
    return {
        "first_block": lambda: FirstBlockCacheConfig(threshold=0.0),
        "taylorseer": lambda: TaylorSeerCacheConfig(disable_cache_before_step=100, taylor_factors_dtype=torch.float32),
        # Ratios away from 1 accumulate an error above a threshold of 0 at once.
        "magcache": lambda: mag_cache_config([[1.1] * n for n in steps], threshold=0.0, retention_ratio=0.0),
    }[kind]()


def skipping(kind: str, steps: list[int]):
    """A config of ``kind`` that skips work at some steps, with decisions no image changes
    (FirstBlockCache decides on the whole batch: a threshold above any change skips always)."""
    return {
        "first_block": lambda: FirstBlockCacheConfig(threshold=1e9),
        "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32),
        "magcache": lambda: mag_cache_config([[1.0] * n for n in steps], threshold=0.5, retention_ratio=0.0, max_skip_steps=2),
    }[kind]()


def generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def context_names(transformer):
    """The cache context of the current forward, read from the cache hooks' state managers."""
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in (registry.hooks.values() if registry is not None else ()):
            for attr in vars(hook).values():
                if isinstance(attr, StateManager) and attr._context is not None:
                    return attr._context.name
    return None


class ContextLog:
    """Image tokens and cache context of every transformer forward."""

    def __init__(self, transformer):
        self.calls = []
        self.handle = transformer.register_forward_pre_hook(lambda module, args, kwargs: self.calls.append((kwargs["hidden_states"].shape, context_names(transformer))), with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ----------------------------------------------------------------------------------------
# The two families, each as ``run(config, batch_indices) -> latents``.
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux():
    from conftest import (
        tiny_flux_scheduler,
        tiny_flux_transformer,
        tiny_vae,
    )

    pipe = RALUFluxPipeline(scheduler=tiny_flux_scheduler(), vae=tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tiny_flux_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe, shipped("flux")


def flux_inputs(true_cfg: bool) -> dict:
    g = torch.Generator().manual_seed(3)
    inputs = {"prompt_embeds": torch.randn(2, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g)}
    if true_cfg:
        inputs.update(negative_prompt_embeds=torch.randn(2, 8, 32, generator=g), negative_pooled_prompt_embeds=torch.randn(2, 32, generator=g), true_cfg_scale=2.0)
    return inputs


@pytest.fixture(scope="module")
def sd3():
    pipe = RALUStableDiffusion3Pipeline(**pipeline_components("sd3"))
    pipe.set_progress_bar_config(disable=True)
    return pipe, shipped("sd3")


def run(family, config, images=(0, 1), true_cfg=False, schedule=None):
    """Latents of the given images of the batch (seeds 10 + i), with ``config`` enabled (None:
    no cache); the cache is disabled afterwards."""
    pipe, default = family
    inputs = flux_inputs(true_cfg) if isinstance(pipe, RALUFluxPipeline) else text_inputs(2)
    inputs = {key: (value[list(images)] if isinstance(value, torch.Tensor) else value) for key, value in inputs.items()}
    if config is not None:
        enable_cache(pipe.transformer, config)
    try:
        with ContextLog(pipe.transformer) as log:
            out = pipe(**inputs, schedule=schedule or default, generator=generators(*(10 + i for i in images)), output_type="latent").images
    finally:
        if config is not None:
            disable_cache(pipe.transformer)
    return out, log.calls


CASES = [(name, true_cfg, kind) for name, true_cfg in [("flux", False), ("flux", True), ("sd3", True)] for kind in KINDS[name]]


@pytest.fixture(params=CASES, ids=[f"{name}{'-true-cfg' if cfg and name == 'flux' else ''}-{kind}" for name, cfg, kind in CASES])
def case(request, flux, sd3):
    name, true_cfg, kind = request.param
    return (flux if name == "flux" else sd3), true_cfg, name, kind


def test_never_skipping_cache_equals_no_cache(case):
    family, true_cfg, name, kind = case
    want, _ = run(family, None, true_cfg=true_cfg)
    steps = steps_of(family[1])
    got, calls = run(family, never_skip(kind, steps), true_cfg=true_cfg)
    assert torch.equal(got, want)
    # Every forward in a context named after its stage and branch.
    branches = {"flux": ["cond", "uncond"] if true_cfg else ["cond"], "sd3": ["cond_uncond"]}[name]
    expected = [f"stage{stage}-{branch}" for stage, steps in zip((1, 2, 3), steps) for _ in range(steps) for branch in branches]
    assert [context for _, context in calls] == expected


def test_image_of_a_batch_equals_the_image_alone(case):
    family, true_cfg, _, kind = case
    cache = skipping(kind, steps_of(family[1]))
    batch, _ = run(family, cache, true_cfg=true_cfg)
    plain, _ = run(family, None, true_cfg=true_cfg)
    assert not torch.allclose(batch, plain, atol=1e-6), "the cache must skip work for this test to mean anything"
    for i in (0, 1):
        alone, _ = run(family, skipping(kind, steps_of(family[1])), images=(i,), true_cfg=true_cfg)
        assert torch.allclose(batch[i], alone[0], atol=1e-5)


def test_unfit_caches_are_refused(flux, sd3):
    pipe, schedule = flux
    with pytest.raises(ValueError, match="FasterCacheConfig does not fit"):
        enable_cache(pipe.transformer, FasterCacheConfig(spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 0))
    with pytest.raises(ValueError, match="PyramidAttentionBroadcastConfig does not fit"):
        enable_cache(pipe.transformer, PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 0))
    with pytest.raises(ValueError, match="FirstBlockCache does not run on SD3Transformer2DModel"):
        enable_cache(sd3[0].transformer, FirstBlockCacheConfig())
    with pytest.raises(ValueError, match="FirstBlockCache does not run on SD3Transformer2DModel"):
        sd3[0].plan(with_cache(sd3[1], {"kind": "first_block"}))  # what ralu-generate checks before loading work
    with pytest.raises(ValueError, match="FirstBlockCache does not run on SD3Transformer2DModel"):
        run(sd3, None, schedule=with_cache(sd3[1], {"kind": "first_block"}))
    # MagCache ratios of another step grid (diffusers interpolates them to num_inference_steps).
    pipe.transformer.enable_cache(mag_cache_config([[1.0] * 28]))
    try:
        with pytest.raises(ValueError, match="28 magnitude ratios but the schedule takes 10 steps"):
            pipe(**flux_inputs(False), schedule=schedule, generator=generators(1, 2), output_type="latent")
    finally:
        pipe.transformer.disable_cache()


@pytest.mark.parametrize("config", [FirstBlockCacheConfig(), mag_cache_config([[1.0] * 6])], ids=["first_block", "mag"])
def test_caches_needing_block_metadata_are_refused_where_diffusers_has_none(config):
    """Chroma's blocks are not in diffusers 0.42.1's block registry: FirstBlockCache and
    MagCache would fail with diffusers' 'Model class ... not registered' mid-call; the refusal
    comes before any compute, and TaylorSeer, which needs no block metadata, still enables."""
    from chroma_models import tiny_transformer

    transformer = tiny_transformer()
    with pytest.raises(ValueError, match=rf"^{type(config).__name__} does not run on ChromaTransformer2DModel: .*diffusers has none for ChromaSingleTransformerBlock, ChromaTransformerBlock\. Fix: use TaylorSeerCacheConfig$"):
        enable_cache(transformer, config)
    enable_cache(transformer, TaylorSeerCacheConfig(disable_cache_before_step=1))
    disable_cache(transformer)


# ----------------------------------------------------------------------------------------
# The schedule file's cache section.
# ----------------------------------------------------------------------------------------


def with_cache(schedule, cache: dict):
    return schedule_from_dict({**schedule.model_dump(), "cache": cache}, "<test>")


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_schedule_cache_section_is_applied(flux, sd3, name):
    family = flux if name == "flux" else sd3
    pipe, schedule = family
    cached = with_cache(schedule, {"kind": "taylorseer", "cache_interval": 2, "disable_cache_before_step": 1})
    want, _ = run(family, TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1))
    got, calls = run(family, None, schedule=cached)
    assert torch.equal(got, want) and not torch.allclose(got, run(family, None)[0], atol=1e-6)
    assert calls[0][1] == ("stage1-cond" if name == "flux" else "stage1-cond_uncond")
    assert getattr(pipe.transformer, "_cache_config", None) is None  # disabled after the call
    ratios = with_cache(schedule, {"kind": "magcache", "threshold": 0.0, "retention_ratio": 0.0, "mag_ratios": [[1.1] * n for n in steps_of(schedule)]})
    assert torch.equal(run(family, None, schedule=ratios)[0], run(family, None)[0])
    with pytest.raises(ValueError, match=re.escape(f"mag_ratios has [2, 2] ratios per stage but the schedule takes {steps_of(schedule)}")):
        run(family, None, schedule=with_cache(schedule, {"kind": "magcache", "mag_ratios": [[1.0] * 2] * 2}))


def test_schedule_cache_section_errors(flux):
    _, schedule = flux
    with pytest.raises(ScheduleError, match=r"cache kind 'faster' is unknown\. Fix: use one of"):
        with_cache(schedule, {"kind": "faster"})
    with pytest.raises(ScheduleError, match=r"does not read \['cache_interval'\]"):
        with_cache(schedule, {"kind": "first_block", "cache_interval": 2})
    with pytest.raises(ScheduleError, match="needs mag_ratios"):
        with_cache(schedule, {"kind": "magcache"})
    with pytest.raises(ScheduleError, match="threshold"):
        with_cache(schedule, {"kind": "first_block", "threshold": -1})
    with pytest.raises(ScheduleError, match="version"):
        with_cache(schedule, {"kind": "first_block", "version": 2})
    loaded = with_cache(schedule, {"kind": "taylorseer", "cache_interval": 3})
    assert loaded.cache.diffusers_config().cache_interval == 3
    assert schedule_from_dict(loaded.model_dump(), "<again>") == loaded


def test_ralu_generate_applies_the_schedule_cache(saved_flux_pipeline, make_schedule, tmp_path):
    import numpy as np
    from PIL import Image

    from ralu.runtime.cli import main
    from ralu.runtime.schedule import save_schedule

    schedule = make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (3, 1.0, 2.2)], c=0.04, up_ratio=0.3, height=64, width=64)
    plain = save_schedule(schedule, tmp_path / "plain.json")
    cached = save_schedule(with_cache(schedule, {"kind": "first_block", "threshold": 1.0}), tmp_path / "cached.json")
    images = []
    for name, path in (("plain", plain), ("cached", cached)):
        args = ["--model", str(saved_flux_pipeline), "--schedule", str(path), "--prompt", "a cat", "--device", "cpu", "--out", str(tmp_path / name)]
        assert main(args) == 0
        (png,) = sorted((tmp_path / name).glob("*.png"))
        images.append(np.asarray(Image.open(png)).astype(int))
    assert np.abs(images[0] - images[1]).max() > 0  # the cache skipped work


@pytest.mark.parametrize("kind", KINDS["sd3"])
def test_sd3_skip_layer_guidance_has_its_own_context(sd3, kind):
    """The skip-layer forward (positive half, blocks skipped) runs in its own context, so it
    neither reads nor overwrites the CFG batch's cache: never skipping equals no cache."""
    pipe, schedule = sd3
    slg = {"skip_guidance_layers": [1], "skip_layer_guidance_start": -1.0, "skip_layer_guidance_stop": 2.0}

    def call(config):
        if config is not None:
            enable_cache(pipe.transformer, config)
        try:
            with ContextLog(pipe.transformer) as log:
                out = pipe(**text_inputs(2), schedule=schedule, generator=generators(1, 2), output_type="latent", **slg).images
        finally:
            if config is not None:
                disable_cache(pipe.transformer)
        return out, [context for _, context in log.calls]

    want, _ = call(None)
    got, contexts = call(never_skip(kind, steps_of(schedule)))
    assert torch.equal(got, want)
    assert contexts[:2] == ["stage1-cond_uncond", "stage1-skip_layers"] and contexts[-1] == "stage3-skip_layers"
