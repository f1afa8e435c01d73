"""The quality search on a user's pipeline, without the lab: a tiny FluxPipeline, prompt
embeddings from the caller's encoder, the pixel metric (the product's own tier runs this)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from ralu.calibrate.quality_search import search
from ralu.runtime.schedule import load_schedule, save_schedule

SPEEDUP = 3.0
SIZE = 64


def encode(prompts: list[str]) -> dict:
    """Embeddings that are a fixed function of each prompt (a stand-in for a text encoder)."""
    from conftest import TINY_FLUX_TEXT_DIM

    rows = [torch.Generator().manual_seed(zlib.crc32(prompt.encode())) for prompt in prompts]
    return {
        "prompt_embeds": torch.stack([torch.randn(8, TINY_FLUX_TEXT_DIM, generator=g) for g in rows]),
        "pooled_prompt_embeds": torch.stack([torch.randn(TINY_FLUX_TEXT_DIM, generator=g) for g in rows]),
    }


def test_the_search_runs_on_any_pipeline_and_writes_a_schedule_that_meets_the_budget(flux_models, tmp_path):
    from conftest import tiny_flux_scheduler
    from diffusers import FluxPipeline

    transformer, vae = flux_models
    pipe = FluxPipeline(scheduler=tiny_flux_scheduler(), vae=vae, transformer=transformer, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    result = search(
        pipe, ["a red cat", "a blue dog"], SPEEDUP, seeds=[0, 1], model="flux-dev", height=SIZE, width=SIZE, base_steps=12,
        metric="pixel", encode=encode, trials=3, batch_size=2, cache_dir=tmp_path / "refs", pipeline_id="tiny-flux",
    )
    # Two references (one per prompt and seed) were made with the plain 12-step pipeline and cached.
    assert len(list((tmp_path / "refs").glob("*.pt"))) == 2
    assert result.best_value == pytest.approx(min(v for v in (result.plain_value, result.ralu_value) if v is not None))
    best = load_schedule(str(save_schedule(result.best, tmp_path / "best.json")))
    assert (best.model, best.height, best.width, best.base_steps) == ("flux-dev", SIZE, SIZE, 12)
    assert best.flops_speedup.linear >= SPEEDUP


def tiny_pipe(flux_models):
    from conftest import tiny_flux_scheduler
    from diffusers import FluxPipeline

    transformer, vae = flux_models
    pipe = FluxPipeline(scheduler=tiny_flux_scheduler(), vae=vae, transformer=transformer, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_score_is_the_distance_times_its_spectral_term_and_shows_both_parts(flux_models, tmp_path):
    import json

    from ralu.calibrate.quality_search import SPECTRAL_WEIGHT, spectral_score

    common = dict(seeds=[0, 1], model="flux-dev", height=SIZE, width=SIZE, base_steps=12, metric="pixel", encode=encode, batch_size=1,
                  cache_dir=tmp_path / "refs", pipeline_id="tiny-flux")
    result = search(tiny_pipe(flux_models), ["a red cat", "a blue dog"], SPEEDUP, trials=3, **common)
    sampled = [t for t in result.history if t["state"] == "COMPLETE" and t.get("feasible")]
    assert sampled and result.spectral_weight == SPECTRAL_WEIGHT
    for trial in sampled:
        assert trial["spectral"] > 0.0  # a few steps are not the 12-step samples' spectrum
        assert trial["value"] == pytest.approx(spectral_score(trial["distance"], trial["spectral"], SPECTRAL_WEIGHT))
        assert trial["value"] > trial["distance"]
    summary = json.loads(json.dumps(result.summary()))
    assert summary["best"]["score"] == result.best_value
    assert summary["best"]["score"] == pytest.approx(summary["best"]["distance"] * (1 + SPECTRAL_WEIGHT * summary["best"]["spectral"]))
    assert summary["best"]["schedule"]["stages"] == json.loads(result.best.model_dump_json())["stages"]
    assert "spectral" in result.describe() and f"(1 + {SPECTRAL_WEIGHT:g} x spectral distance" in result.describe()
    # weight 0: the old score, the distance alone (same images, same parts)
    alone = search(tiny_pipe(flux_models), ["a red cat", "a blue dog"], SPEEDUP, trials=1, spectral_weight=0, **common)
    first = alone.history[0]
    assert first["value"] == first["distance"] == pytest.approx(sampled[0]["distance"]) and first["spectral"] == pytest.approx(sampled[0]["spectral"])


def test_a_bad_spectral_weight_is_one_line_and_a_stored_study_keeps_its_weight(flux_models, tmp_path):
    pipe = tiny_pipe(flux_models)
    common = dict(seeds=[0], model="flux-dev", height=SIZE, width=SIZE, base_steps=12, metric="pixel", encode=encode, batch_size=1, pipeline_id="tiny-flux")
    for bad in (-1.0, float("nan"), float("inf"), "four", True):
        with pytest.raises(ValueError, match="spectral_weight=") as error:
            search(pipe, ["a red cat"], SPEEDUP, trials=1, spectral_weight=bad, **common)
        assert "\n" not in str(error.value)
    storage = dict(storage=str(tmp_path / "study.log"), study_name="s", cache_dir=tmp_path / "refs")
    search(pipe, ["a red cat"], SPEEDUP, trials=1, spectral_weight=2.0, **common, **storage)
    with pytest.raises(ValueError, match="spectral weight 2, not 4") as error:
        search(pipe, ["a red cat"], SPEEDUP, trials=2, spectral_weight=4.0, **common, **storage)
    assert "\n" not in str(error.value)
    assert search(pipe, ["a red cat"], SPEEDUP, trials=2, spectral_weight=2.0, **common, **storage).trials >= 2


def test_the_radial_spectrum_sees_lost_detail_on_any_aspect():
    from ralu.calibrate.spectra import radial_power_spectrum, spectral_distance

    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 48)
    smooth = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    spectra = radial_power_spectrum(images)
    assert spectra.shape == (6, 16) and bool((spectra > 0).all())
    assert spectral_distance(images, images) == 0.0
    # blurring removes power at the fine radii (and little at the coarse ones)
    assert spectral_distance(smooth, images) > 0.1
    assert (radial_power_spectrum(smooth).mean(0) / spectra.mean(0))[-4:].max() < 0.5
    # twice the contrast: four times the power at every radius, log10(4) on average
    grey = torch.full_like(images, 0.5)
    assert spectral_distance(grey + 0.4 * (images - 0.5), grey + 0.2 * (images - 0.5)) == pytest.approx(math.log10(4.0))
