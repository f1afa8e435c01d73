"""``pipe.transformer.compile()`` through RALU's three stages (tiny models, CPU).

Every stage's forward goes through the transformer's own ``forward`` (SD3's mixed stage too),
so a compiled transformer runs compiled in every stage.  Each stage has its own token count,
so a call compiles one graph per stage; a second call (other noise, same schedule: the mixed
stage's count ``M/4 + 3k`` does not depend on the image) compiles nothing.  Counted with
dynamo's own counters.  Backend ``aot_eager``: it traces through AOTAutograd like inductor
does but runs the traced ops eagerly, so the test stays well under a minute on a CPU
(inductor would compile C++ kernels for minutes).
"""

from __future__ import annotations

import copy

import pytest
import torch
from sd3_models import pipeline_components, text_inputs
from torch._dynamo.utils import counters

from ralu.runtime import RALUFluxPipeline, RALUStableDiffusion3Pipeline

SIZE = 128


def flux_case():
    from conftest import (
        build_schedule,
        tiny_flux_scheduler,
        tiny_flux_transformer,
        tiny_vae,
    )

    pipe = RALUFluxPipeline(scheduler=tiny_flux_scheduler(), vae=tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tiny_flux_transformer())
    g = torch.Generator().manual_seed(0)
    inputs = {"prompt_embeds": torch.randn(2, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g)}
    return pipe, build_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (3, 1.0, 2.2)], height=SIZE, width=SIZE), inputs


def sd3_case():
    from conftest import build_schedule

    components = pipeline_components("sd3")
    # Its own transformer: the shared one of the other tests must not stay compiled.
    components["transformer"] = copy.deepcopy(components["transformer"])
    pipe = RALUStableDiffusion3Pipeline(**components)
    return pipe, build_schedule([(2, 0.3, 5.0), (2, 0.5, 2.5), (3, 1.0, 2.0)], c=0.05, height=SIZE, width=SIZE, model="sd3-medium"), text_inputs(2)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", [flux_case, sd3_case], ids=["flux", "sd3"])
@pytest.mark.slow
def test_compiled_transformer_compiles_each_stage_once(case, fresh_dynamo):
    pipe, schedule, inputs = case()
    pipe.set_progress_bar_config(disable=True)

    def call(seed):
        generator = [torch.Generator().manual_seed(seed + i) for i in range(2)]
        return pipe(**inputs, schedule=schedule, generator=generator, output_type="latent").images

    eager = call(0)
    pipe.transformer.compile(backend="aot_eager")
    compiled = call(0)
    assert torch.allclose(compiled, eager, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3  # one per stage token count (M/4, M/4 + 3k, M), no graph breaks
    assert not counters["graph_break"]
    again = call(7)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
    assert not torch.equal(again, compiled)
