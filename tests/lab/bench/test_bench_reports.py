"""The committed reports and their typed models: ``reports/speed.json`` and ``reports/quality.json``
(testbed v2) load into their report models and
write back byte for byte, and the Markdown rendered from them is the committed Markdown (one
definition of every table)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ralu_lab.bench.common import json_text
from ralu_lab.bench.quality.v2 import report as quality_v2_report
from ralu_lab.bench.quality.v2.schema import V2Report
from ralu_lab.bench.speed import report as speed_report
from ralu_lab.bench.speed.schema import SpeedReport

REPORTS = Path(__file__).resolve().parents[3] / "reports"
#: committed report name -> (its typed model, the module that renders it)
REPORT_KINDS = {
    "speed": (SpeedReport, speed_report),
    "quality": (V2Report, quality_v2_report),
}


@pytest.mark.parametrize("name", sorted(REPORT_KINDS))
def test_committed_json_round_trips_through_the_typed_report(name):
    text = (REPORTS / f"{name}.json").read_text()
    assert json_text(REPORT_KINDS[name][0].model_validate_json(text).model_dump(mode="json")) == text


def test_speed_markdown_is_rendered_from_its_json():
    report = SpeedReport.model_validate_json((REPORTS / "speed.json").read_text())
    assert speed_report.render_markdown(report) == (REPORTS / "speed.md").read_text()


def test_quality_markdown_is_rendered_from_its_json_with_its_figures():
    report = V2Report.model_validate_json((REPORTS / "quality.json").read_text())
    figures = quality_v2_report.figure_paths(report)
    assert quality_v2_report.render_markdown(report, figures) == (REPORTS / "quality.md").read_text()
    # a run without the Z sweep (--z-values with no value) has no sweep figure
    assert all((REPORTS / path).is_file() for path in (*figures.grids.values(), figures.tradeoff, figures.sweep) if path is not None)


def test_typed_rows_refuse_unknown_keys():
    from pydantic import ValidationError

    text = (REPORTS / "speed.json").read_text().replace('"schedule":', '"shedule":', 1)
    with pytest.raises(ValidationError):
        SpeedReport.model_validate_json(text)


@pytest.mark.parametrize("name", sorted(REPORT_KINDS))
def test_render_from_json_on_the_command_line(name):
    module = REPORT_KINDS[name][1].__name__
    done = subprocess.run([sys.executable, "-m", module, str(REPORTS / f"{name}.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == (REPORTS / f"{name}.md").read_text()
    bad = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "usage" in bad.stderr

    missing = subprocess.run([sys.executable, "-m", module, "no-such-report.json"], capture_output=True, text=True, timeout=120)
    last = missing.stderr.strip().splitlines()[-1]
    assert missing.returncode == 2 and "no report file no-such-report.json" in last and "Traceback" not in missing.stderr


@pytest.mark.parametrize("budget", [4, 7])
def test_committed_heldout_and_fidelity_reports_are_rendered_from_their_json(budget):
    """The budget-filling picks' proof: the committed Markdown is what today's renderers make
    of the committed JSON (a change to the verdict wording or the cost comparison shows here)."""
    from ralu_lab.bench.quality.v2 import fidelity, heldout

    folder = REPORTS / "experiments" / "quality-search-v2" / "budget-filling"
    held = heldout.HeldoutReport.model_validate_json((folder / f"heldout-{budget}x.json").read_text())
    assert heldout.render_markdown(held) == (folder / f"heldout-{budget}x.md").read_text()
    score = fidelity.FidelityReport.model_validate_json((folder / f"fidelity-{budget}x.json").read_text())
    assert fidelity.render_markdown(score, f"fidelity-{budget}x.png") == (folder / f"fidelity-{budget}x.md").read_text()
    # every row the harness plans at the budget is there, its cache rows included
    assert {"base-steps", "bottleneck", "ralu-paper", "ralu-ours+magcache", "base-steps+first_block"} <= {r.method for r in held.rows}
    assert [r.method for r in held.rows] == [r.method for r in score.rows]


def test_committed_switches_report_is_rendered_from_its_json():
    """reports/experiments/quality-search-v2/paper-compat-switches.md is what today's renderer
    makes of its JSON (its link to the harness report included, one folder deeper since the move)."""
    from ralu_lab.bench.quality.v2 import switches

    folder = REPORTS / "experiments" / "quality-search-v2"
    report = switches.SwitchReport.model_validate_json((folder / "paper-compat-switches.json").read_text())
    text = switches.render_markdown(report)
    assert text == (folder / "paper-compat-switches.md").read_text()
    assert "](../../quality.md)" in text and (folder / "../../quality.md").is_file()
