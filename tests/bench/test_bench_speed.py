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

from ralu.runtime import shipped_schedules

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
    # a searched layout gets the paper's figure exactly when its steps and up-ratio are a
    # published layout's (the FLOPs do not depend on the stage ends)
    from ralu.calibrate.presets import PRESETS
    from ralu.runtime.schedule import load_schedule

    published = {(p.model, tuple(p.steps), p.up_ratio) for p in PRESETS if p.speedup is not None}
    searched = [name for name in paper if name.endswith("-searched")]
    assert searched
    for name in searched:
        s = load_schedule(name)
        matches = (s.model, tuple(x.steps for x in s.stages), s.up_ratio) in published
        assert (paper[name] is not None) == matches, name
    assert any(paper[name] is None for name in paper)
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


# ----------------------------------------------------------------------------------------
# The step-cache and compiled-transformer rows (--quick end to end, and pieces in process).
# ----------------------------------------------------------------------------------------


def test_cache_rows_cover_every_schedule_with_its_familys_caches(quick_report):
    from ralu.calibrate.bench.quality.v2.plan import CACHE_KINDS
    from ralu.calibrate.bench.quality.v2.sampler import CACHE_SETTINGS

    report, _, _ = quick_report
    rows = report["cache_rows"]
    for name in shipped_schedules():
        family = "flux" if name.startswith("flux") else "sd3"
        ralu = {row["cache"] for row in rows if row["schedule"] == name and row["method"] == "ralu"}
        assert ralu == set(CACHE_KINDS[family]), name
        plain = {row["cache"] for row in rows if row["schedule"] == name and row["method"] == "plain"}
        # FLUX's plain pipeline: uncached and with the caches the quality harness runs on it; SD3's opens no cache context.
        assert plain == ({"none", "first_block", "taylorseer"} if family == "flux" else set()), name
    for row in rows:
        # The quality harness's settings, declared there once.
        assert row["settings"] == (CACHE_SETTINGS[row["cache"]][1] if row["cache"] != "none" else None)
        for key in ("seconds", "wall_speedup", "cpu_time_speedup", "executed_linear_tflops", "uncached_linear_tflops",
                    "baseline_linear_tflops", "flops_speedup", "flops_gain"):
            assert positive_finite(row[key]), (row["schedule"], row["cache"], key)
        assert len(row["seconds_all"]) == report["config"]["repeats"]
        assert math.isclose(row["flops_speedup"], row["baseline_linear_tflops"] / row["executed_linear_tflops"], rel_tol=1e-9)
        assert row["executed_linear_tflops"] <= row["uncached_linear_tflops"]  # a cache only ever skips work
        if row["cache"] == "none":
            assert row["executed_linear_tflops"] == row["uncached_linear_tflops"] and row["wall_gain"] is None
        else:
            assert positive_finite(row["wall_gain"]) and positive_finite(row["cpu_time_gain"])
        if row["cache"] == "taylorseer":
            # cache_interval 2 after step 1: every stage of 3 or more steps skips a forward.
            assert row["executed_linear_tflops"] < row["uncached_linear_tflops"]
        if row["cache"] == "magcache":
            assert [len(stage) for stage in row["mag_ratios"]] == row["steps"]
        else:
            assert row["mag_ratios"] is None
    # The plain row of equal cost: its configuration FLOPs are the closest to the schedule's.
    summary = {row["schedule"]: row for row in report["rows"]}
    for row in rows:
        if row["method"] == "plain" and row["cache"] == "none":
            speedup = summary[row["schedule"]]["config_flops_speedup_total"]
            steps = row["steps"][0]
            assert abs(math.log(row["base_steps"] / steps / speedup)) <= min(abs(math.log(row["base_steps"] / k / speedup)) for k in (steps - 1, steps + 1) if k > 0)


def test_compile_rows_compile_in_the_warm_up_only(quick_report):
    report, markdown, _ = quick_report
    rows = report["compile_rows"]
    assert report["config"]["compile_backend"] == "aot_eager"
    assert {row["schedule"] for row in rows if row["method"] == "ralu"} == set(shipped_schedules())
    assert {row["family"] for row in rows if row["method"] == "plain"} == {"flux", "sd3"}
    for row in rows:
        assert row["error"] is None, row
        assert row["recompiles"] == 0  # the timed calls are second calls: nothing left to compile
        assert row["graph_breaks"] == 0
        for key in ("seconds", "wall_speedup", "cpu_time_speedup", "wall_gain", "cpu_time_gain"):
            assert positive_finite(row[key]), (row, key)
    # Each family's first method compiles (the later ones may reuse a dynamic graph).
    assert all(next(row for row in rows if row["family"] == family)["graphs_compiled"] >= 1 for family in ("flux", "sd3"))
    for heading in ("## Step caches", "## Compiled transformer"):
        assert heading in markdown


def test_a_report_with_the_new_rows_round_trips(quick_report):
    import json

    from ralu.calibrate.bench.common import json_text
    from ralu.calibrate.bench.speed.schema import SpeedReport

    report, _, _ = quick_report
    text = json_text(report)
    assert json_text(SpeedReport.model_validate_json(text).model_dump(mode="json")) == text
    # Without the new sections (older reports, --no-caches): the keys are left out, not null.
    old = {key: value for key, value in report.items() if key not in ("cache_rows", "compile_rows")}
    assert "cache_rows" not in json.loads(json_text(SpeedReport.model_validate(old).model_dump(mode="json")))


@pytest.fixture(scope="module")
def flux_run():
    from ralu.calibrate.bench.speed.config import make_config
    from ralu.calibrate.bench.speed.models import build_family

    config = make_config(quick=True, threads=1, schedules=("flux-dev-7x",))
    return config, build_family(config, config.family("flux"))


def test_a_cache_that_never_skips_executes_every_linear_flop(flux_run):
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    from ralu.calibrate.bench.cache.run import executed_linear_flops
    from ralu.calibrate.bench.speed.caches import cached
    from ralu.calibrate.bench.speed.models import call_baseline

    config, run = flux_run
    transformer = run.base.transformer

    def executed(cache):
        with cached(transformer, cache), executed_linear_flops(transformer) as counter:
            call_baseline(config, run, 4)
        return counter["flops"]

    uncached = executed(None)
    assert uncached > 0
    assert executed(FirstBlockCacheConfig(threshold=0.0)) == uncached  # threshold 0: never skips
    assert executed(TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1)) < uncached
    assert transformer._cache_config is None  # disabled again


def test_a_compile_failure_is_one_line_in_the_rows(flux_run):
    from ralu.calibrate.bench.speed.compiled import measure_compile_rows

    config, run = flux_run
    rows = measure_compile_rows(config, run, "no_such_backend", measured={})
    assert rows and all(row.error and "\n" not in row.error and row.seconds is None for row in rows)
    assert run.base.transformer._compiled_call_impl is None  # eager again


def test_cli_flags_for_the_new_rows():
    from ralu.calibrate.bench import cli
    from ralu.calibrate.bench.speed.config import make_config

    parser = cli.build_parser()
    args = parser.parse_args(["speed", "--compile", "--no-caches"])
    assert args.compile == "inductor" and args.caches is False
    args = parser.parse_args(["speed"])
    assert args.compile is None and args.caches is True
    assert make_config(quick=True).compile_backend == "aot_eager"
    assert make_config().compile_backend is None
    assert make_config(quick=True, compile_backend="eager").compile_backend == "eager"
    with pytest.raises(ValueError, match="compile backend"):
        make_config(compile_backend="nope")
