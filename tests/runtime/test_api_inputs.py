"""Issue 26, item 8: the Python API's inputs that RALU used to leave to chance are refused with
one clear error before any compute (docs/hardening.md lists what is left to diffusers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_flux_scheduler

from ralu.runtime import RALUFluxPipeline


@pytest.fixture
def ralu_flux(flux_models):
    transformer, vae = flux_models
    pipe = RALUFluxPipeline(scheduler=tiny_flux_scheduler(), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def call(ralu_flux, flux_embeds, make_schedule):
    schedule = make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (2, 1.0, 2.2)], c=0.04, up_ratio=0.3, height=64, width=64)

    def run(**kwargs):
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        return ralu_flux(**flux_embeds(), schedule=schedule, height=64, width=64, output_type="latent", **kwargs).images

    return run


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_images_per_prompt": -1}, "num_images_per_prompt=-1"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt=0"),
        ({"num_images_per_prompt": 1.5}, "num_images_per_prompt=1.5"),
        ({"generator": "seed"}, "not a torch.Generator"),
        ({"generator": 3}, "not a torch.Generator"),
        ({"paper_compat": 0}, "paper_compat=0"),
        ({"latents": np.zeros((1, 16, 64), dtype=np.float32)}, "latents of type ndarray"),
        ({"latents": [[0.0]]}, "latents of type list"),
        ({"latents": torch.zeros(1, 16, 64, device="meta")}, "meta device"),
        ({"latents": torch.full((1, 16, 64), float("nan"))}, "NaN or infinity"),
        ({"callback_on_step_end": lambda pipe, step, t, kw: 1}, "not a dict"),
        ({"callback_on_step_end": lambda pipe, step, t, kw: {"latents": kw["latents"].numpy()}}, "type ndarray"),
        ({"callback_on_step_end": lambda pipe, step, t, kw: {"latents": kw["latents"] * float("inf")}}, "NaN or infinity"),
    ],
)
def test_api_inputs_are_refused_with_one_clear_error(call, kwargs, words):
    with pytest.raises(ValueError) as caught:
        call(**kwargs)
    assert words in str(caught.value) and "Fix:" in str(caught.value), str(caught.value)


def test_good_api_inputs_still_run(call):
    latents = call(num_images_per_prompt=np.int64(2), generator=[torch.Generator().manual_seed(i) for i in range(2)], paper_compat=False)
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()
    assert torch.equal(call(callback_on_step_end=lambda pipe, step, t, kw: kw), call())
