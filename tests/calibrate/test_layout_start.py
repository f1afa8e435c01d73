"""The layout search starts from the model's published layouts, so it never returns a
layout worse by its own objective than a published one that meets the target."""

from __future__ import annotations

import pytest

from ralu.calibrate.budget import STAGE_WEIGHT
from ralu.calibrate.calibration import calibrate, published_layouts
from ralu.calibrate.layout_search import layout_params
from ralu.calibrate.presets import PRESETS
from ralu.calibrate.search import StageLayout


def test_published_layouts_are_in_the_searched_space():
    layouts = published_layouts("flux-dev")
    assert [(layout.steps, ratio) for layout, ratio in layouts] == [(p.steps, p.up_ratio) for p in PRESETS if p.model == "flux-dev"]
    for layout, ratio in layouts + published_layouts("sd3-medium"):
        params = layout_params(layout, ratio)
        assert params is not None, layout
        assert params["up_ratio"] == ratio and params["end_1"] == layout.ends[0] and round(params["end_1"] + params["gap_2"], 2) == layout.ends[1]
        assert all(STAGE_WEIGHT[0] <= params[f"weight_{k}"] <= STAGE_WEIGHT[1] for k in (1, 2))


@pytest.mark.parametrize(
    ("layout", "ratio"),
    [
        (StageLayout((2, 3, 5), (0.05, 0.3, 1.0)), 0.1),  # first end below the range
        (StageLayout((2, 3, 5), (0.4, 0.6, 1.0)), 0.1),  # first end above it
        (StageLayout((2, 3, 5), (0.2, 0.9, 1.0)), 0.1),  # second stage too long
        (StageLayout((2, 3, 5), (0.35, 0.65, 1.0)), 0.1),  # second end beyond the fitted range
        (StageLayout((2, 3, 5), (0.22, 0.3, 1.0)), 0.1),  # off the 0.05 grid
        (StageLayout((2, 3, 5), (0.2, 0.3, 1.0)), 0.35),  # an up-ratio not searched
        (StageLayout((2, 5), (0.2, 1.0)), 0.1),  # two stages
    ],
)
def test_layouts_outside_the_space_are_not_enqueued(layout, ratio):
    assert layout_params(layout, ratio) is None


def test_search_returns_no_worse_than_the_published_layout():
    # Three trials: exactly the three published FLUX layouts; at 7x only the 7x one meets the target.
    found = calibrate("flux-dev", speedup=7, trials=3, show_progress=False)
    preset_7x = next(p for p in PRESETS if p.name == "flux-dev-7x")
    assert found.stages and [s.steps for s in found.stages] == list(preset_7x.steps)
    assert [s.end for s in found.stages] == list(preset_7x.ends)
