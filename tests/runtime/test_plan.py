"""What a schedule means for one call (ralu.runtime.plan): stage roles, token counts, checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ralu.runtime.plan import count_images, make_plan
from ralu.runtime.schedule import ScheduleError


@pytest.mark.parametrize(
    ("stages", "roles"),
    [
        ([(3, 1.0, 3.0)], ["full"]),
        ([(2, 0.4, 3.0), (3, 1.0, 2.0)], ["low", "full"]),
        ([(2, 0.3, 3.0), (2, 0.45, 2.5), (3, 1.0, 2.2)], ["low", "mixed", "full"]),
    ],
)
def test_stage_roles_tokens_and_sigmas(make_schedule, stages, roles):
    # 128 x 96 px: latent 16 x 12, low-res token grid 4 x 3, k = floor(0.3 * 12) = 3.
    schedule = make_schedule(stages, up_ratio=0.3, height=128, width=96)
    plan = make_plan(schedule, "flux", 128, 96)
    assert plan.grid == (4, 3) and plan.k == 3 and plan.full_tokens == 48
    assert [stage.role for stage in plan.stages] == roles
    assert [stage.tokens for stage in plan.stages] == [{"low": 12, "mixed": 12 + 3 * 3, "full": 48}[role] for role in roles]
    assert plan.total_steps == sum(steps for steps, _, _ in stages)
    for index, stage in enumerate(plan.stages):
        assert stage.index == index and stage.steps == stages[index][0]
        assert np.array_equal(stage.sigmas, schedule.sigmas(index))
    assert len(plan.transitions) == len(stages) - 1 and plan.c == schedule.c


def test_refusals_come_before_any_compute(make_schedule):
    schedule = make_schedule([(2, 0.4, 3.0), (3, 1.0, 2.0)], height=128, width=128)
    with pytest.raises(ValueError, match="height=112 must be a positive multiple of 32"):
        make_plan(schedule, "flux", 112, 128)
    with pytest.raises(ScheduleError, match="calibrated for 128x128"):
        make_plan(schedule, "flux", 128, 96)
    with pytest.raises(ScheduleError, match="cannot run in a 'sd3' pipeline"):
        make_plan(schedule, "sd3", 128, 128)


def test_count_images_as_diffusers_counts_them():
    embeds = torch.zeros(3, 8, 4)
    assert count_images("a cat", None, 2, None) == (1, 2, 2)
    assert count_images(["a", "b"], None, None, None) == (2, 1, 2)
    assert count_images(None, embeds, 2, [torch.Generator() for _ in range(6)]) == (3, 2, 6)
    with pytest.raises(ValueError, match="2 generators for 6 images"):
        count_images(None, embeds, 2, [torch.Generator() for _ in range(2)])


def test_c_of_one_quarter_plans_and_runs(make_schedule, flux_models, flux_embeds):
    """Issue 26, item 9: c = 1/4 (Z = 2, the lower end of the search and the published
    optimiser's start) validates, so it must plan and run: sqrt(1 - 4c) = 0 is a real noise
    coefficient, not a refusal; just above 1/4 is refused."""
    import math

    from conftest import tiny_flux_scheduler

    from ralu.runtime import RALUFluxPipeline
    from ralu.runtime.noise import correlated_noise
    from ralu.runtime.plan import check_plan_numbers

    schedule = make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (2, 1.0, 2.2)], c=0.25)
    assert schedule.c == 0.25 and schedule.z == 2.0
    plan = make_plan(schedule, "flux", 64, 64)
    assert plan.c == 0.25
    with pytest.raises(ScheduleError, match="outside"):
        check_plan_numbers(plan.stages, plan.transitions, math.nextafter(0.25, 1.0))
    z = correlated_noise(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 0.25)
    assert torch.isfinite(z).all()
    transformer, vae = flux_models
    pipe = RALUFluxPipeline(scheduler=tiny_flux_scheduler(), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(**flux_embeds(), schedule=schedule, height=64, width=64, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.isfinite(latents).all() and latents.abs().max() > 0
