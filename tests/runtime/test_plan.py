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
