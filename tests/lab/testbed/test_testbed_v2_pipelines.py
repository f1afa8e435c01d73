"""Testbed v2's networks in the real diffusers pipelines: a factor-2 AutoencoderKL under
FluxPipeline and StableDiffusion3Pipeline, and RALU schedules end to end (untrained models)."""

from __future__ import annotations

import json

import pytest
import torch

from ralu.runtime import RALUFluxPipeline, RALUStableDiffusion3Pipeline
from ralu.runtime.models import resolution_multiple
from ralu_lab.testbed.v2 import data
from ralu_lab.testbed.v2 import model as tb


@pytest.fixture(scope="module")
def autoencoder():
    vae = tb.build_autoencoder(0).eval()
    vae.register_to_config(**tb.latent_statistics(vae, n=64, batch=64))
    return vae


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_autoencoder_is_a_factor_2_latent_space_with_measured_normalisation(autoencoder):
    images, _ = data.make_batch(21, 48)
    with torch.no_grad():
        latents = tb.images_to_latents(autoencoder, images)
        decoded = tb.latents_to_images(autoencoder, latents)
    assert latents.shape == (48, tb.LATENT_CHANNELS, 32, 32) and decoded.shape == images.shape
    # scaling_factor / shift_factor were measured on other scenes: about zero mean, unit variance here
    assert abs(latents.mean().item()) < 0.1 and abs(latents.std().item() - 1.0) < 0.1
    assert tb.VAE_SCALE_FACTOR == 2 and tb.FULL_TOKENS == 256


@pytest.mark.parametrize("arch", tb.ARCHITECTURES)
def test_pipelines_derive_the_vae_factor_and_the_runtime_rule_follows(arch, autoencoder):
    pipe = tb.make_pipeline(arch, tb.build_transformer(arch), autoencoder)
    assert pipe.vae_scale_factor == 2
    assert resolution_multiple(pipe.vae_scale_factor) == 8  # 64 px is a valid size
    ralu = (RALUFluxPipeline if arch == "flux" else RALUStableDiffusion3Pipeline).from_pipe(pipe)
    plan = ralu.plan(tb.testbed_schedule(_schedule(arch)))
    assert plan.grid == (8, 8) and plan.full_tokens == tb.FULL_TOKENS
    assert plan.stages[0].tokens == tb.FULL_TOKENS // 4


def _schedule(arch):
    return "flux-dev-7x" if arch == "flux" else "sd3-medium-3x"


def test_flux_calls_guide_for_real_as_fluxpipeline_does(autoencoder):
    pipe = tb.make_pipeline("flux", tb.build_transformer("flux", seed=1), autoencoder)
    labels = data.balanced_labels(2, seed=3)
    call = tb.call_inputs("flux", labels)
    assert call["true_cfg_scale"] == tb.TRUE_CFG_SCALE["flux"] > 1 and "negative_prompt_embeds" in call
    forwards = []
    handle = pipe.transformer.register_forward_hook(lambda *_: forwards.append(1))
    try:
        pipe(**call, num_inference_steps=3, generator=generators(2), output_type="pt")
    finally:
        handle.remove()
    assert len(forwards) == 3 * tb.GUIDANCE_BRANCHES["flux"]  # a conditional and an unconditional forward per step


@pytest.mark.parametrize("arch", tb.ARCHITECTURES)
def test_base_and_ralu_pipelines_run_end_to_end(arch, autoencoder):
    pipe = tb.make_pipeline(arch, tb.build_transformer(arch, seed=1), autoencoder)
    labels = data.balanced_labels(2, seed=3)
    base = pipe(**tb.call_inputs(arch, labels), num_inference_steps=3, generator=generators(2), output_type="pt").images
    assert base.shape == (2, 3, 64, 64) and torch.isfinite(base).all()

    ralu = (RALUFluxPipeline if arch == "flux" else RALUStableDiffusion3Pipeline).from_pipe(pipe)
    ralu.set_progress_bar_config(disable=True)
    assert ralu.vae is autoencoder and ralu.transformer is pipe.transformer
    schedule = tb.testbed_schedule(_schedule(arch))
    assert (schedule.height, schedule.width) == (64, 64)
    out = ralu(**tb.call_inputs(arch, labels), schedule=schedule, generator=generators(2), output_type="pt").images
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    k = ralu.selected_tokens.shape[1]
    assert k == int(schedule.up_ratio * 64)
    if arch == "sd3":  # the two conventions of low-res positions are different models of the same stage
        stretched = ralu(**tb.call_inputs(arch, labels), schedule=schedule, generator=generators(2), output_type="pt", low_res_positions="stretch").images
        assert torch.isfinite(stretched).all() and not torch.allclose(stretched, out)


def test_schedules_of_the_other_family_or_base_shift_are_refused():
    with pytest.raises(ValueError, match="cannot drive the sd3"):
        tb.testbed_schedule("flux-dev-7x", arch="sd3")
    assert tb.base_shift("flux") == pytest.approx(3.1582, abs=1e-3) and tb.base_shift("sd3") == 3.0
    with pytest.raises(ValueError, match="unknown testbed v2 architecture"):
        tb.build_transformer("sdxl")


def test_missing_weights_name_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_generator --arch sd3"):
        tb.load_transformer("sd3", tmp_path)
    with pytest.raises(FileNotFoundError, match="train_autoencoder"):
        tb.load_autoencoder(tmp_path)


def test_regime_check_runs_and_reports_its_criteria(autoencoder):
    from ralu_lab.testbed.v2 import evaluate
    from ralu_lab.testbed.v2.classifier import Classifier

    pipe = tb.make_pipeline("sd3", tb.build_transformer("sd3", seed=2), autoencoder)
    torch.manual_seed(0)
    result = evaluate.regime_check(pipe, "sd3", Classifier().eval(), n=4, reference_n=16, autoencoder=autoencoder, baseline_steps=4, few_steps=(1, 2))
    assert set(result["checks"]) == {"baseline draws what was asked", "few steps visibly worse (tightest budget)"}
    assert result["checks"]["baseline draws what was asked"] is False  # an untrained model draws noise
    assert {"real scenes", "autoencoder reconstructions", "baseline, 4 steps", "1 steps", "2 steps"} == set(result["rows"])
    row = result["rows"]["1 steps"]
    assert {"accuracy", "fd", "spectral_distance", "blocking", "psnr", "ssim"} <= set(row)
    assert result["rows"]["baseline, 4 steps"]["psnr"] == 100.0
    assert result["comparisons"]["2 steps"]["fine accuracy"]["verdict"] in ("baseline better", "2 steps better", "not separable")
    json.dumps(result)  # JSON-ready


def test_every_network_fits_25_mb_of_float32_weights():
    from ralu_lab.testbed.v2.classifier import Classifier

    networks = [tb.build_autoencoder(), Classifier(), tb.build_transformer("flux"), tb.build_transformer("sd3")]
    sizes = [4 * sum(p.numel() for p in net.parameters()) for net in networks]
    assert max(sizes) < 25e6, sizes


def test_an_image_does_not_depend_on_its_batch(autoencoder):
    from ralu_lab.testbed.v2 import evaluate

    pipe = tb.make_pipeline("flux", tb.build_transformer("flux", seed=3), autoencoder)
    labels = data.balanced_labels(3, seed=4)
    together = evaluate.generate(pipe, "flux", labels, seed=5, steps=2, batch_size=3)
    alone = evaluate.generate(pipe, "flux", labels, seed=5, steps=2, batch_size=1)
    assert torch.allclose(together, alone, atol=1e-4)
    assert not torch.allclose(together[0], together[1], atol=1e-2)
