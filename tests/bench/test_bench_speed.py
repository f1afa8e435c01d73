"""``ralu-bench speed --quick`` end to end.

The benchmark runs in a subprocess: it changes the process's malloc settings to measure
peak memory, which must not leak into the rest of the test session.  Nothing here asserts
on timings.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import pytest

REQUIRED_ROW_KEYS = {"schedule", "flops_speedup_total", "flops_speedup_linear", "wall_speedup", "overhead_fraction", "peak_mem_ratio"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "ralu.calibrate.bench.cli", "speed", "--quick", "--threads", "1", "--out-dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "speed.json").read_text())
    markdown = (out / "speed.md").read_text()
    return report, markdown, done.stdout


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_report_schema_and_rows_cover_every_shipped_schedule(quick_report):
    from ralu.runtime import shipped_schedules

    report, _, _ = quick_report
    assert {"command", "config", "rows"} <= set(report)
    assert report["command"].startswith("ralu-bench speed --quick")
    assert report["config"]["preset"] == "quick" and report["config"]["device"] == "cpu"
    rows = report["rows"]
    assert sorted(row["schedule"] for row in rows) == sorted(shipped_schedules())
    for row in rows:
        assert REQUIRED_ROW_KEYS <= set(row), row["schedule"]
        for key in ("flops_speedup_total", "flops_speedup_linear", "wall_speedup", "overhead_fraction", "config_flops_speedup_total", "wall_over_flops"):
            assert positive_finite(row[key]), (row["schedule"], key, row[key])
        if sys.platform.startswith("linux"):  # peak memory is measured through /proc
            assert positive_finite(row["peak_mem_ratio"]) and positive_finite(row["peak_mem_ratio_total"]), row
            assert row["peak_mem_ratio"] <= row["peak_mem_bound_ratio"] * 1.5  # loose: allocator noise at tiny sizes
        assert row["overhead_fraction"] < 1.0
        # Real-architecture FLOPs: the total convention counts attention too, so it is larger.
        assert row["flops_speedup_total"] >= row["flops_speedup_linear"] > 1.0


def test_paper_figures_sit_beside_the_matching_layouts(quick_report):
    report, _, _ = quick_report
    paper = {row["schedule"]: row["paper_speedup_linear"] for row in report["rows"]}
    assert paper["flux-dev-7x"] == 7.02 and paper["flux-dev-5x"] == 5.53
    assert paper["sd3-medium-3x"] == 3.02 and paper["sd3-medium-2x"] == 1.94
    assert paper["flux-dev-7x-searched"] is None
    rows = {row["schedule"]: row for row in report["rows"]}
    assert abs(rows["flux-dev-7x"]["flops_speedup_linear"] - 7.02) < 0.01
    assert abs(rows["sd3-medium-3x"]["flops_speedup_linear"] - 3.02) < 0.01


def test_overhead_items_add_up(quick_report):
    from ralu.runtime.profiling import OVERHEAD_SECTIONS

    report, _, _ = quick_report
    for row in report["rows"]:
        overhead = row["overhead"]
        items = overhead["items"]
        assert set(items) == set(OVERHEAD_SECTIONS)
        assert all(item["seconds"] >= 0 and item["fraction"] >= 0 for item in items.values())
        assert math.isclose(sum(item["seconds"] for item in items.values()), overhead["overhead_seconds"], rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(sum(item["fraction"] for item in items.values()), overhead["overhead_fraction"], rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(row["overhead_fraction"], overhead["overhead_fraction"])
        assert math.isclose(overhead["overhead_seconds"] / overhead["total_seconds"], overhead["overhead_fraction"], rel_tol=1e-9)
        # Sections are exclusive: overhead + transformer + other is the whole call.
        assert overhead["transformer_seconds"] > 0 and overhead["other_seconds"] >= 0
        assert math.isclose(overhead["overhead_seconds"] + overhead["transformer_seconds"] + overhead["other_seconds"], overhead["total_seconds"], rel_tol=1e-9)
        # Three-stage schedules decode for edges and re-noise twice.
        assert items["edge_decode"]["seconds"] > 0 and items["noise"]["seconds"] > 0


def test_markdown_names_its_command_and_every_schedule(quick_report):
    report, markdown, stdout = quick_report
    first = markdown.splitlines()[0]
    assert report["command"] in first
    for row in report["rows"]:
        assert f"| {row['schedule']} |" in markdown
        assert row["schedule"] in stdout
    for heading in ("## Summary", "## Overhead, itemised", "## Peak memory", "## Configuration", "## Machine", "## Discussion"):
        assert heading in markdown


def test_cli_registers_speed_and_rejects_impossible_configs(capsys):
    from ralu.calibrate.bench import cli

    parser = cli.build_parser()
    args = parser.parse_args(["speed", "--quick", "--schedules", "flux-dev-7x"])
    assert args.command == "speed" and args.quick and args.schedules == ["flux-dev-7x"]
    assert callable(importlib.import_module(cli.SUBCOMMANDS["speed"].runner).run_from_args)
    assert cli.main(["speed", "--widths", "full"]) == 2  # real widths need a GPU
    assert cli.main(["speed", "--quick", "--schedules", "no-such-schedule"]) == 2
    assert "unknown schedule" in capsys.readouterr().err
