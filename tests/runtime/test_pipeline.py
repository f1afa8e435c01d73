"""What every RALU pipeline shares (ralu.runtime.pipeline), checked on both families."""

from __future__ import annotations

import re

import pytest
import torch

SIZE = 64  # latent 8x8: 2x2 low-res tokens, 4 per image in the first stage
STAGES = [(1, 0.3, 3.0), (1, 0.5, 2.5), (1, 1.0, 2.0)]


@pytest.fixture(params=["flux", "sd3"])
def family_call(request, flux_pipe, flux_embeds, make_schedule):
    """``call(**kwargs)``: a one-image call of a tiny three-stage RALU pipeline of the family."""
    if request.param == "flux":
        from ralu.runtime import RALUFluxPipeline

        pipe, inputs, model = RALUFluxPipeline.from_pipe(flux_pipe), flux_embeds(1), "flux-dev"
    else:
        from sd3_models import pipeline_components, text_inputs

        from ralu.runtime import RALUStableDiffusion3Pipeline

        pipe, inputs, model = RALUStableDiffusion3Pipeline(**pipeline_components("sd3")), text_inputs(1), "sd3-medium"
    pipe.set_progress_bar_config(disable=True)
    schedule = make_schedule(STAGES, up_ratio=0.5, height=SIZE, width=SIZE, model=model)

    def call(**kwargs):
        return pipe(**inputs, schedule=schedule, generator=[torch.Generator().manual_seed(0)], output_type="latent", **kwargs)

    return call


@pytest.mark.parametrize(
    ("edit", "returned"),
    [(lambda latents: latents[:, :2], (1, 2, 64)), (lambda latents: latents.flatten(1), (1, 256))],
    ids=["fewer-tokens", "same-size-other-shape"],
)
def test_callback_must_return_latents_of_the_shape_it_was_given(family_call, edit, returned):
    def callback(pipe, step, timestep, callback_kwargs):
        return {"latents": edit(callback_kwargs["latents"])}

    expected = f"callback_on_step_end returned latents of shape {returned} at step 0 (stage 1/3, low); expected (1, 4, 64)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        family_call(callback_on_step_end=callback)


def test_callback_may_replace_latents_of_the_same_shape(family_call):
    def callback(pipe, step, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step == 2 else {}

    assert family_call(callback_on_step_end=callback).images.abs().max() == 0
    assert family_call().images.abs().max() > 0


def test_the_stage_model_is_built_with_the_calls_plan_and_runs_no_other(family_call, monkeypatch):
    from types import SimpleNamespace

    from ralu.runtime.pipeline import RALUPipelineMixin

    original, seen = RALUPipelineMixin.run_ralu_stages, []

    def spy(self, plan, canvas, model, *args):
        seen.append(model.plan is plan)
        return original(self, plan, canvas, model, *args)

    monkeypatch.setattr(RALUPipelineMixin, "run_ralu_stages", spy)
    family_call()
    assert seen == [True]

    def other_plan(self, plan, canvas, model, *args):
        return original(self, plan, canvas, SimpleNamespace(plan=SimpleNamespace()), *args)

    monkeypatch.setattr(RALUPipelineMixin, "run_ralu_stages", other_plan)
    with pytest.raises(ValueError, match="^the stage model was built for another plan"):
        family_call()
