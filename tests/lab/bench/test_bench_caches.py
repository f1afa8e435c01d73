"""Measured cache settings and costs: MagCache ratios per stage of a RALU schedule (ralu.calibrate.magcache, ralu-bench magcache) and executed FLOPs per cache (ralu-bench cache)."""

from __future__ import annotations

import ast
import json

import pytest
import torch
from diffusers.hooks import MagCacheConfig

from ralu.calibrate.magcache import measure_mag_ratios
from ralu.runtime import RALUFluxPipeline, load_schedule
from ralu_lab.bench.cli import main as bench_main


@pytest.fixture
def ralu(flux_pipe):
    pipe = RALUFluxPipeline.from_pipe(flux_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def calls(flux_embeds, true_cfg=False):
    kwargs = {**flux_embeds(2, seed=1), "generator": [torch.Generator().manual_seed(i) for i in (4, 5)]}
    if true_cfg:
        kwargs.update(flux_embeds(2, seed=2, prefix="negative_"), true_cfg_scale=2.0)
    return [kwargs]


@pytest.mark.parametrize("true_cfg", [False, True])
def test_one_table_per_stage(ralu, flux_embeds, make_schedule, true_cfg):
    schedule = make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (3, 1.0, 2.2)], height=128, width=128)
    ratios = measure_mag_ratios(ralu, schedule, calls(flux_embeds, true_cfg))
    assert [len(stage) for stage in ratios] == [2, 2, 3]
    assert all(stage[0] == 1.0 for stage in ratios)  # no previous residual at a stage's start
    assert all(0 < ratio < 10 and ratio != 1.0 for stage in ratios for ratio in stage[1:])
    ralu.transformer.enable_cache(MagCacheConfig(calibrate=True))
    try:
        with pytest.raises(ValueError, match="cache enabled"):
            measure_mag_ratios(ralu, schedule, calls(flux_embeds))
    finally:
        ralu.transformer.disable_cache()


def test_single_stage_ratios_equal_diffusers_calibration(ralu, flux_embeds, make_schedule, capsys):
    """On a one-stage schedule the measurement is diffusers' own MagCache calibration."""
    schedule = make_schedule([(5, 1.0, 3.0)], height=64, width=64)
    ours = measure_mag_ratios(ralu, schedule, calls(flux_embeds))[0]
    capsys.readouterr()
    ralu.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=5))
    try:
        ralu(**calls(flux_embeds)[0], schedule=schedule, output_type="latent")
    finally:
        ralu.transformer.disable_cache()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    theirs = ast.literal_eval(printed[-1])
    assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.mark.parametrize("name", ["flux-dev-4x", "sd3-medium-2x"])
def test_cli_writes_a_schedule_with_the_ratios(tmp_path, name):
    """On testbed v2's generator of the schedule's family, the schedule moved to its 64 px."""
    out = tmp_path / "mc.json"
    assert bench_main(["magcache", "--schedule", name, "--out", str(out), "--images", "1", "--threshold", "0.1"]) == 0
    schedule = load_schedule(out)
    assert schedule.model == load_schedule(name).model and (schedule.height, schedule.width) == (64, 64)
    assert schedule.cache.kind == "magcache" and schedule.cache.threshold == 0.1
    assert [len(stage) for stage in schedule.cache.mag_ratios] == [stage.steps for stage in schedule.stages]
    assert json.loads(out.read_text())["cache"]["mag_ratios"][0][0] == 1.0


def test_cli_errors(tmp_path, capsys):
    assert bench_main(["magcache", "--schedule", "flux-dev-4x", "--out", str(tmp_path / "x.json"), "--images", "0"]) == 2
    assert bench_main(["magcache", "--schedule", "chroma-4x", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--images 0" in err[0] and "FLUX.1 and SD3 only" in err[1] and "Fix:" in err[1]
    assert not (tmp_path / "x.json").exists()


# ----------------------------------------------------------------------------------------
# ralu-bench cache: executed linear FLOPs and latent change per cache.
# ----------------------------------------------------------------------------------------


def test_cache_rows_count_the_work_that_ran(ralu, flux_embeds, make_schedule):
    from diffusers.hooks import FirstBlockCacheConfig

    from ralu_lab.bench.cache.run import measure

    schedule = make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (3, 1.0, 2.2)], height=128, width=128)
    rows = measure(ralu, schedule, {"never": FirstBlockCacheConfig(threshold=0.0), "always": FirstBlockCacheConfig(threshold=1e9)}, calls(flux_embeds)[0])
    none, never, always = rows
    assert none["flops_fraction"] == never["flops_fraction"] == 1.0 and never["latent_rms_change"] == 0.0
    # Skipping everything after each stage's first step: 4 of 7 steps run the first block only.
    assert 0.2 < always["flops_fraction"] < 0.9 and always["latent_rms_change"] > 0.0


def test_cache_report_cli(tmp_path):
    assert bench_main(["cache", "--schedules", "flux-dev-4x", "sd3-medium-2x", "--images", "1", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cache.json").read_text())
    assert report["testbed"] == "v2" and set(report["weights"]) == {"autoencoder", "flux", "sd3"}
    flux, sd3 = report["schedules"]
    assert (flux["arch"], sd3["arch"]) == ("flux", "sd3")
    assert flux["rows"][0]["cache"] == "none" and len(flux["rows"]) == 6
    # FirstBlockCache does not run on SD3 (ralu.runtime.cache): no first_block rows there
    assert [row["cache"] for row in sd3["rows"]] == ["none"] + [row["cache"] for row in flux["rows"] if not row["cache"].startswith("first_block")][1:]
    assert all(0.0 < row["flops_fraction"] <= 1.0 for block in (flux, sd3) for row in block["rows"])
    md = (tmp_path / "cache.md").read_text()
    assert md.startswith("# Step caches in RALU runs (testbed v2)") and "| magcache 0.06 (per-stage ratios) |" in md and "## sd3-medium-2x (sd3," in md


def test_cache_refuses_other_families_in_one_line(tmp_path, capsys):
    assert bench_main(["cache", "--schedules", "qwen-image-4x", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "FLUX.1 and SD3 only" in err and not (tmp_path / "cache.json").exists()
