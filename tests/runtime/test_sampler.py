"""The family-independent sampling loop (ralu.runtime.sampler)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monte_carlo import SIGMAS, block_pairs, check_unit

from ralu.runtime.tokens import expand_mask, initial_canvas, upsample_nearest


def test_timestep_table_matches_per_step_conversion():
    from ralu.runtime.plan import StagePlan
    from ralu.runtime.sampler import timestep_table

    stage = StagePlan(index=0, role="full", sigmas=np.array([1.0, 0.7310585786, 0.3333333333, 0.0]), tokens=4)
    lookup = timestep_table(stage, "cpu")
    for sigma in stage.sigmas:
        assert torch.equal(lookup(float(sigma)), torch.tensor(float(sigma) * 1000.0, dtype=torch.float32))
    assert torch.equal(lookup(0.123), torch.tensor(123.0, dtype=torch.float32))


# ----------------------------------------------------------------------------------------
# The whole sampler, Monte Carlo: a point-mass "model" keeps the latent on the path, so the
# state each stage starts from must be exactly on the rectified-flow path there.
# ----------------------------------------------------------------------------------------


class PointMassModel:
    """Exact velocity for data concentrated at ``x0`` (a canvas): ``v = (x - x0) / sigma``.
    Euler steps with it stay on ``x = (1 - sigma) x0 + sigma n``; records the state every
    stage starts from (= right after the transition)."""

    def __init__(self, x0, seed=0):
        self.x0 = x0
        self.starts = {}
        self.generator = torch.Generator().manual_seed(seed)

    def stage(self, layout, stage):
        from contextlib import contextmanager

        @contextmanager
        def context():
            target = layout.gather(self.x0)

            def velocity(patches, sigma):
                self.starts.setdefault(stage.index, (sigma, layout.scatter(patches), layout))
                return (patches - target) / sigma

            yield velocity

        return context()

    def decode_for_edges(self, latent):
        b, _, h, w = latent.shape
        return torch.rand(b, 3, 4 * h, 4 * w, generator=self.generator) * 2 - 1  # random edges per image


def test_sampler_starts_every_stage_on_the_path(make_schedule):
    from ralu.runtime.plan import make_plan
    from ralu.runtime.sampler import run_stages

    n, c = 2000, 0.04
    schedule = make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (2, 1.0, 2.2)], c=c, up_ratio=0.4, height=128, width=128)
    plan = make_plan(schedule, "flux", 128, 128)
    assert plan.grid == (4, 4) and [s.tokens for s in plan.stages] == [16, 16 + 3 * 6, 64]
    g = torch.Generator().manual_seed(0)
    x0 = upsample_nearest(20.0 + torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)).expand(n, -1, -1, -1)
    model = PointMassModel(x0)
    noise = torch.randn(n, 4, 16, 16, generator=g, dtype=torch.float64)
    result = run_stages(plan, initial_canvas(noise, "low").double(), model, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(result.canvas.float(), x0.float(), atol=1e-3)  # the point mass is reached
    assert len({tuple(row.tolist()) for row in result.selected}) > n // 2  # per-image selections
    previous = torch.zeros(n, 4, 4, dtype=torch.bool)
    for index in (1, 2):
        sigma, canvas, layout = model.starts[index]
        s = schedule.stages[index].start
        assert sigma == pytest.approx(1 - s)
        residual = (canvas - s * x0) / (1 - s)
        newly = expand_mask(layout.full_mask & ~previous, 4)[:, None].expand_as(canvas)
        old = expand_mask(previous, 4)[:, None].expand_as(canvas)
        low = expand_mask(~layout.full_mask, 4)[:, None].expand_as(canvas)
        check_unit(residual[newly], 1.0, f"stage {index + 1} upsampled")
        if old.any():
            check_unit(residual[old], 1.0, f"stage {index + 1} already full-res")
        if low.any():
            check_unit(residual[..., ::2, ::2][low[..., ::2, ::2]], 1.0, f"stage {index + 1} low-res")
        for products in block_pairs(residual, newly):
            assert abs(products.mean().item()) < SIGMAS / math.sqrt(products.numel())
        previous = layout.full_mask
