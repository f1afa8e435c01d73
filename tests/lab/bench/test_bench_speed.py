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
import torch

from ralu.runtime import shipped_schedules

REQUIRED_ROW_KEYS = {"schedule", "flops_speedup_total", "flops_speedup_linear", "wall_speedup", "overhead_fraction", "peak_mem_ratio"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "ralu_lab.bench.cli", "speed", "--quick", "--threads", "1", "--out-dir", str(out)]
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
    from ralu_lab.bench import cli

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
    from ralu.runtime import load_schedule
    from ralu_lab.bench.quality.v2.plan import CACHE_KINDS
    from ralu_lab.bench.quality.v2.sampler import CACHE_SETTINGS
    from ralu_lab.bench.speed.families import ADAPTERS

    report, _, _ = quick_report
    rows = report["cache_rows"]
    for name in shipped_schedules():
        family = load_schedule(name).family
        ralu = {row["cache"] for row in rows if row["schedule"] == name and row["method"] == "ralu"}
        assert ralu == set(ADAPTERS[family].cache_kinds), name
        if family in CACHE_KINDS:  # FLUX.1's and SD3's are the quality harness's
            assert ralu == set(CACHE_KINDS[family]), name
        plain = {row["cache"] for row in rows if row["schedule"] == name and row["method"] == "plain"}
        # Plain pipelines that open cache contexts (FLUX.1, FLUX.2 [klein], Qwen-Image): uncached and with the
        # caches the quality harness runs on them (MagCache's table belongs to RALU's stages); the others open none.
        expected = {"none", *(kind for kind in ADAPTERS[family].cache_kinds if kind != "magcache")} if ADAPTERS[family].plain_caches else set()
        assert plain == expected, name
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
    families = {row["family"] for row in rows if row["method"] == "plain"}
    assert families == {"flux", "sd3", "flux-kontext", "chroma", "flux2", "flux2-klein", "qwen-image"}
    for row in rows:
        assert row["error"] is None, row
        assert row["recompiles"] == 0  # the timed calls are second calls: nothing left to compile
        assert row["graph_breaks"] == 0
        for key in ("seconds", "wall_speedup", "cpu_time_speedup", "wall_gain", "cpu_time_gain"):
            assert positive_finite(row[key]), (row, key)
    # Each family's first method compiles (the later ones may reuse a dynamic graph).
    assert all(next(row for row in rows if row["family"] == family)["graphs_compiled"] >= 1 for family in families)
    for heading in ("## Step caches", "## Compiled transformer"):
        assert heading in markdown


def test_a_report_with_the_new_rows_round_trips(quick_report):
    import json

    from ralu_lab.bench.common import json_text
    from ralu_lab.bench.speed.schema import SpeedReport

    report, _, _ = quick_report
    text = json_text(report)
    assert json_text(SpeedReport.model_validate_json(text).model_dump(mode="json")) == text
    # Without the new sections (older reports, --no-caches): the keys are left out, not null.
    old = {key: value for key, value in report.items() if key not in ("cache_rows", "compile_rows")}
    assert "cache_rows" not in json.loads(json_text(SpeedReport.model_validate(old).model_dump(mode="json")))


@pytest.fixture(scope="module")
def flux_run():
    from ralu_lab.bench.speed.config import make_config
    from ralu_lab.bench.speed.models import build_family

    config = make_config(quick=True, threads=1, schedules=("flux-dev-7x",))
    return config, build_family(config, config.family("flux"))


def test_a_cache_that_never_skips_executes_every_linear_flop(flux_run):
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    from ralu_lab.bench.cache.run import executed_linear_flops
    from ralu_lab.bench.speed.caches import cached
    from ralu_lab.bench.speed.models import call_baseline

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
    from ralu_lab.bench.speed.compiled import measure_compile_rows

    config, run = flux_run
    rows = measure_compile_rows(config, run, "no_such_backend", measured={})
    assert rows and all(row.error and "\n" not in row.error and row.seconds is None for row in rows)
    assert run.base.transformer._compiled_call_impl is None  # eager again


def test_cli_flags_for_the_new_rows():
    from ralu_lab.bench import cli
    from ralu_lab.bench.speed.config import make_config

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


# ----------------------------------------------------------------------------------------
# Every family through its adapter (ralu_lab.bench.speed.families).
# ----------------------------------------------------------------------------------------

NEW_FAMILIES = {
    "flux-kontext": "flux-kontext-dev-7x", "chroma": "chroma-7x", "flux2": "flux2-dev-7x",
    "flux2-klein": "flux2-klein-base-4b-7x", "qwen-image": "qwen-image-7x",
}


def test_every_family_with_shipped_schedules_is_benchmarked():
    from ralu.runtime import load_schedule
    from ralu.runtime.models import FAMILIES
    from ralu_lab.bench.quality.v2.plan import CACHE_KINDS, PLAIN_PIPELINE_CACHES
    from ralu_lab.bench.speed.config import BENCHED_FAMILIES, benchable_schedules, make_config
    from ralu_lab.bench.speed.families import ADAPTERS

    assert {load_schedule(name).family for name in shipped_schedules()} <= set(BENCHED_FAMILIES) <= set(FAMILIES)
    assert benchable_schedules() == list(shipped_schedules())
    assert set(NEW_FAMILIES) == set(BENCHED_FAMILIES) - {"flux", "sd3"}
    for family in ("flux", "sd3"):  # their cache rows are the quality harness's
        assert ADAPTERS[family].cache_kinds == CACHE_KINDS[family] and ADAPTERS[family].plain_caches == PLAIN_PIPELINE_CACHES[family]
    # Only the chosen schedules' families are built.
    assert [f.family for f in make_config(quick=True, schedules=("chroma-4x", "flux-dev-7x")).families] == ["flux", "chroma"]


def test_reduced_widths_keep_each_familys_real_block_pattern():
    from ralu_lab.bench.speed.config import make_config
    from ralu_lab.bench.speed.cost import forward_flops_model

    for quick in (False, True):
        config = make_config(quick=quick)
        assert len(config.families) == 7
        for family in config.families:
            real = family.spec.architecture.transformer
            t = family.transformer
            assert (t["num_attention_heads"], t["attention_head_dim"], t["joint_attention_dim"]) == (1, 32, 64), family.family
            for key in ("num_layers", "num_single_layers"):
                if key in real and not quick:
                    assert t[key] == real[key], (family.family, key)
            # What the width does not change is the real model's: patching, channels, guidance embedding.
            for key in ("patch_size", "in_channels", "out_channels", "guidance_embeds"):
                if key in real:
                    assert t[key] == real[key], (family.family, key)
            assert family.vae_class == family.spec.architecture.vae_class
            assert family.reference_tokens == (config.size // 16) ** 2 * (family.family == "flux-kontext")
    # FLOPs on the meta device (quick sizes): Kontext's reference tokens are in every forward.
    flux, kontext = (config.family(name) for name in ("flux", "flux-kontext"))
    assert forward_flops_model(kontext)(64).total == forward_flops_model(flux)(64 + kontext.reference_tokens).total


def test_full_width_families_are_the_registrys_real_models():
    """The --device cuda path: real configs from ralu.runtime.models, counted on the meta device."""
    from ralu.calibrate.flops.counting import count_transformer_forward
    from ralu_lab.bench.speed.config import full_width_families, make_config
    from ralu_lab.bench.speed.cost import edge_decode_flops, real_transformer_bytes
    from ralu_lab.bench.speed.models import build_transformer

    config = make_config(device="cuda")
    assert config.preset == "full-width" and config.dtype == "bfloat16" and len(config.families) == 7
    for family in full_width_families():
        spec = family.spec
        assert family.transformer == dict(spec.architecture.transformer) and family.vae == dict(spec.architecture.vae)
        assert family.text_tokens == spec.text_tokens
        assert real_transformer_bytes(family) == 2 * sum(p.numel() for p in build_transformer(family, "meta").parameters())
        assert edge_decode_flops(config, family.family).total > 0
    # The adapter's inputs are the cost model's: a batch-1 forward counts what ralu.calibrate.flops counts.
    from ralu.calibrate.flops.counting import count_flops
    from ralu_lab.bench.speed.families import adapter

    for family in full_width_families():
        if family.family not in ("flux-kontext", "flux2-klein"):  # one with a reference, one with CFG and 4-axis ids: seconds each
            continue
        model = build_transformer(family, "meta")
        inputs = adapter(family.family).inputs(family, 16, 16, lambda *shape: torch.empty(*shape, device="meta"), "meta")
        # The adapter's batch is the CFG batch: twice the cost model's batch-1 forward.
        assert count_flops(model, **inputs) == count_transformer_forward(family.model, 256, model) * family.transformer_batch, family.family


@pytest.mark.parametrize("family", sorted(NEW_FAMILIES))
def test_a_cache_row_runs_through_the_ralu_pipeline(family):
    """Each new family's first cache kind on its 7x schedule, as the bench runs it: every forward
    in a stage's cache context, fewer linear FLOPs executed than uncached, then disabled again."""
    from ralu_lab.bench.cache.run import executed_linear_flops
    from ralu_lab.bench.quality.v2.sampler import CACHE_SETTINGS
    from ralu_lab.bench.speed.caches import cached
    from ralu_lab.bench.speed.config import make_config
    from ralu_lab.bench.speed.models import build_family, call_ralu

    config = make_config(quick=True, threads=1, schedules=(NEW_FAMILIES[family],))
    run = build_family(config, config.family(family))
    (_, schedule, _), = run.schedules
    transformer = run.base.transformer
    kind = "taylorseer"  # the kind every family's transformer runs (cache_interval 2: stages of 3+ steps skip)
    assert kind in run.config.adapter.cache_kinds
    contexts = []
    original = transformer.cache_context
    transformer.cache_context = lambda name: contexts.append(name) or original(name)
    try:
        with executed_linear_flops(transformer) as uncached:
            call_ralu(config, run, schedule)
        contexts.clear()
        with cached(transformer, CACHE_SETTINGS[kind][0](None)), executed_linear_flops(transformer) as counter:
            call_ralu(config, run, schedule)
    finally:
        del transformer.cache_context
    assert transformer._cache_config is None
    assert 0 < counter["flops"] < uncached["flops"]
    assert {name.split("-")[0] for name in contexts} == {f"stage{i + 1}" for i in range(len(schedule.stages))}, contexts


def test_magcache_ratios_read_each_blocks_image_stream():
    """FLUX.2's single-stream blocks return the fused text + image stream (diffusers' block
    registry: index 0; the image tokens at the end, as diffusers' MagCache hook reads them)."""
    from ralu.calibrate.magcache import measure_mag_ratios
    from ralu_lab.bench.speed.config import make_config
    from ralu_lab.bench.speed.models import build_family

    config = make_config(quick=True, threads=1, schedules=("flux2-dev-7x",))
    run = build_family(config, config.family("flux2"))
    (_, schedule, _), = run.schedules
    inputs = {key: value for key, value in run.inputs.items() if key != "output_type"}
    ratios = measure_mag_ratios(run.ralu, schedule, [dict(inputs, generator=torch.Generator().manual_seed(1))])
    assert [len(stage) for stage in ratios] == [stage.steps for stage in schedule.stages]
    assert all(0 < r < 10 for stage in ratios for r in stage[1:]) and all(stage[0] == 1.0 for stage in ratios)
