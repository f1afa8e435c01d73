"""The model registry (ralu.runtime.models) against diffusers and the shipped schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ralu.runtime.models import (
    MODEL_FAMILIES,
    MODELS,
    RESOLUTION_MULTIPLE,
    check_resolution,
    get_model,
    stage_image_tokens,
)
from ralu.runtime.plan import make_plan
from ralu.runtime.schedule import load_schedule, shipped_schedules, stage_sigmas

FLUX = get_model("flux-dev")
#: FLUX.1-dev's published scheduler_config.json: base_image_seq_len, max_image_seq_len,
#: base_shift, max_shift.
FLUX_DEV_SCHEDULER = (256, 4096, 0.5, 1.15)


@pytest.mark.parametrize("tokens", [64, 256, 1024, 1330, 1945, 4096, 6400])
def test_mu_rule_is_diffusers_calculate_shift(tokens):
    assert FLUX.scheduler.dynamic.mu(tokens) == pytest.approx(calculate_shift(tokens, *FLUX_DEV_SCHEDULER), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("size, tokens", [(512, 1024), (1024, 4096), (1344, 7056)])
def test_flux_base_shift_is_exp_mu_of_the_image_tokens(size, tokens):
    assert FLUX.image_tokens(size, size) == tokens
    assert FLUX.base_shift(size, size) == pytest.approx(math.exp(calculate_shift(tokens, *FLUX_DEV_SCHEDULER)), rel=1e-12)


def test_flux_scheduler_config_gives_fluxpipelines_grid_at_the_base_shift():
    # FluxPipeline: sigmas linspace(1, 1/N, N) and mu from the scheduler's own config.
    steps, size = 50, 1024
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX.scheduler.config())
    config = scheduler.config
    mu = calculate_shift(FLUX.image_tokens(size, size), config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    want = stage_sigmas(steps, 0.0, 1.0, FLUX.base_shift(size, size))
    np.testing.assert_allclose(scheduler.sigmas.numpy(), want, atol=1e-6)


@pytest.mark.parametrize("name", ["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_sd3_shift_is_static(name):
    spec = get_model(name)
    scheduler = FlowMatchEulerDiscreteScheduler(**spec.scheduler.config())
    assert not scheduler.config.use_dynamic_shifting and scheduler.config.shift == 3.0
    assert spec.base_shift(512, 512) == spec.base_shift(1024, 1024) == 3.0


@pytest.mark.parametrize("name", shipped_schedules())
def test_shipped_schedules_record_the_registrys_facts(name):
    schedule = load_schedule(name)
    spec = get_model(schedule.model)
    assert schedule.calibration.h0 == spec.base_shift(schedule.height, schedule.width)
    assert schedule.base_steps == spec.base_steps
    assert schedule.family == spec.family


def test_families_and_aliases():
    assert MODEL_FAMILIES == {"flux-dev": "flux", "sd3-medium": "sd3", "sd3.5-medium": "sd3", "sd3.5-large": "sd3", "chroma": "chroma",
                             "flux-kontext-dev": "flux-kontext",
                             "flux2-dev": "flux2", "flux2-klein-base-4b": "flux2-klein", "qwen-image": "qwen-image"}
    assert get_model("flux") is FLUX and get_model("sd3").name == "sd3-medium"
    assert get_model("kontext").name == "flux-kontext-dev"
    assert get_model("chroma1-hd").name == "chroma"
    assert get_model("qwen").name == "qwen-image"
    assert get_model("flux2").name == "flux2-dev" and get_model("flux2-klein").name == "flux2-klein-base-4b"
    with pytest.raises(ValueError, match=r"unknown model 'sdxl'\. Fix: use one of"):
        get_model("sdxl")


def test_vae_and_resolution_rule():
    for spec in MODELS.values():
        # FLUX.2's VAE has 32 latent channels; every other model's 16.
        channels = 32 if spec.family.startswith("flux2") else 16
        assert (spec.vae_scale_factor, spec.latent_channels, spec.resolution_multiple) == (8, channels, 32)
    assert RESOLUTION_MULTIPLE == 32
    # FLUX packs 2x2 patches of the 16-channel latent into one 64-channel token.
    assert FLUX.architecture.transformer["in_channels"] == 4 * FLUX.latent_channels


@pytest.mark.parametrize("height, width", [(1000, 1024), (1024, 0), (1000.0, 1024)])
def test_check_resolution_rejects_with_the_fix(height, width):
    with pytest.raises(ValueError, match=r"must be a positive multiple of 32.*Fix: use e\.g\."):
        check_resolution(height, width)


@pytest.mark.parametrize("height, width", [(True, 1024), (1024, 1024.5), (1024, "1024"), (float("nan"), 1024)])
def test_check_resolution_rejects_what_is_not_a_whole_number_of_pixels(height, width):
    with pytest.raises(ValueError, match=r"must be an integer number of pixels.*Fix: pass e\.g\."):
        check_resolution(height, width)


def test_check_resolution_accepts_integral_floats():
    check_resolution(1024.0, np.float32(512.0))


def test_check_resolution_accepts_numpy_integers():
    check_resolution(np.int64(512), 1024)


def test_stage_tokens_are_what_a_plan_runs(make_schedule):
    schedule = make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (3, 1.0, 2.2)], up_ratio=0.3, height=128, width=192)
    plan = make_plan(schedule, "flux", 128, 192)
    full = FLUX.image_tokens(128, 192)
    assert [stage.tokens for stage in plan.stages] == stage_image_tokens(full, 0.3, 3) == [24, 24 + 3 * 7, 96]
    assert plan.full_tokens == full and plan.k == 7
    assert stage_image_tokens(full, 0.3, 2) == [24, 96] and stage_image_tokens(full, 0.3, 1) == [96]
    with pytest.raises(ValueError, match="4 stages"):
        stage_image_tokens(full, 0.3, 4)
