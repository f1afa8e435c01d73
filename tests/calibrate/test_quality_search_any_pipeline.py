"""The quality search on a user's pipeline, without the lab: a tiny FluxPipeline, prompt
embeddings from the caller's encoder, the pixel metric (the product's own tier runs this)."""

from __future__ import annotations

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
