"""``ralu-bench quality``: the metrics on known inputs, the matched-cost planning, the
harness's own sampler against FluxPipeline, and the ``--quick`` run end to end (on a tiny,
randomly initialised testbed model of the real classes, so the test does not depend on
the shipped weights)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ralu.calibrate.bench.quality import config as qconfig
from ralu.calibrate.bench.quality import cost as qcost
from ralu.calibrate.bench.quality import methods as qmethods
from ralu.calibrate.bench.quality import metrics as qmetrics
from ralu.calibrate.bench.quality import schedules as qschedules
from ralu.calibrate.bench.quality.sampler import TestbedSampler
from ralu.calibrate.testbed import data
from ralu.calibrate.testbed import model as testbed_model

# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def test_psnr_on_known_inputs():
    a = torch.zeros(2, 3, 8, 8) - 1.0  # black in [-1, 1]
    b = a.clone()
    b[1] += 0.2  # +0.1 in [0, 1] everywhere: MSE 0.01 -> 20 dB
    value = qmetrics.psnr(b, a)
    assert value[0].item() == qconfig.PSNR_CAP
    assert value[1].item() == pytest.approx(20.0, abs=1e-6)
    assert qmetrics.psnr(-a, a)[0].item() == pytest.approx(0.0, abs=1e-9)  # black vs white: MSE 1


def test_ssim_on_known_inputs():
    images, _ = data.make_batch(3, 4)
    assert torch.allclose(qmetrics.ssim(images, images), torch.ones(4, dtype=torch.float64))
    # a constant shift of the mean: luminance term only, (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    flat = torch.zeros(1, 3, 16, 16)
    shifted = flat + 0.4  # 0.5 -> 0.7 in [0, 1]
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.7 + c1) / (0.5**2 + 0.7**2 + c1)
    assert qmetrics.ssim(shifted, flat).item() == pytest.approx(expected, rel=1e-6)
    noisy = (images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert (qmetrics.ssim(noisy, images) < 0.9).all() and (qmetrics.ssim(noisy, images) > 0.0).all()
    # symmetric
    assert torch.allclose(qmetrics.ssim(noisy, images), qmetrics.ssim(images, noisy))


def test_blocking_index_separates_blocky_from_sharp():
    images, _ = data.make_batch(5, 32)
    blocky = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 2), scale_factor=2, mode="nearest")
    smooth = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 2), scale_factor=2, mode="bilinear", align_corners=False)
    sharp_index = qmetrics.blocking_index(images)
    blocky_index = qmetrics.blocking_index(blocky)
    assert blocky_index.min() > 0.99  # nothing changes inside a 2x2 block
    # Hard-edged renderings: one image's edges may happen to sit on the grid, but over a set
    # there is no grid-aligned structure.
    assert abs(sharp_index.mean()) < 0.1
    assert blocky_index.mean() > sharp_index.mean() + 0.8
    assert 0.1 < qmetrics.blocking_index(smooth).mean() < 0.99  # bilinear upsampling: in between
    assert qmetrics.blocking_index(torch.zeros(1, 3, 8, 8)).item() == 0.0  # flat image


def test_frechet_distance_is_zero_for_identical_sets():
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(1)).numpy()
    assert qmetrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert qmetrics.frechet_distance(features, features + 1.0) == pytest.approx(16.0, rel=1e-6)  # mean shift only


# ----------------------------------------------------------------------------------------
# Matched cost and the harness's sampler
# ----------------------------------------------------------------------------------------

def tiny_transformer_config() -> dict:
    from ralu.calibrate.testbed import model as tb

    return {**tb.TRANSFORMER_CONFIG, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def tiny_testbed(tmp_path_factory):
    """A randomly initialised testbed transformer (smaller, same classes) and classifier."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from ralu.calibrate.testbed.classifier import Classifier

    root = tmp_path_factory.mktemp("testbed")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**tiny_transformer_config())
    transformer.save_pretrained(root / "transformer", safe_serialization=True)
    classifier = Classifier()
    (root / "classifier").mkdir()
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(root / "classifier" / "classifier.safetensors"))
    return root


def test_peers_are_matched_to_the_ralu_cost():
    from ralu.calibrate.testbed import model as tb

    cost = qcost.TestbedCost(tb.TRANSFORMER_CONFIG, 3)
    h0 = testbed_model.testbed_h0()
    assert h0 == pytest.approx(math.exp(1.15))
    paper = qschedules.paper_schedule(7, 32)
    assert [s.steps for s in paper.stages] == [2, 3, 5] and paper.z == pytest.approx(6.261)
    assert paper.divergence.js_distance == pytest.approx(0.026638, abs=2e-4)  # docs/method.md §5
    target = cost.of(qmethods.ralu_forwards(paper, 256)).total
    assert qmethods.ralu_forwards(paper, 256) == [64] * 2 + [64 + 3 * 6] * 3 + [256] * 5
    bottleneck = qmethods.bottleneck_method(7, target, cost, h0, 256, 64)
    naive = qmethods.naive_method(7, target, cost, h0, 256, 64, switch_t=0.3)
    for method in (bottleneck, naive):
        got = cost.of(method.forwards).total
        assert abs(got - target) / target < 0.15
        # no integer neighbour of the same shape would come closer: at least within one forward
        assert abs(got - target) <= cost.forward(256).total
    # the stages end where the next restarts: sigma 1 -> 0.8 -> 0.6 -> 0
    assert [float(s[0]) for _, s in bottleneck.stages] == pytest.approx([1.0, 0.8, 0.6])
    assert [float(s[-1]) for _, s in bottleneck.stages] == pytest.approx([0.8, 0.6, 0.0])
    low, high = naive.stages
    assert low[0] == "half" and high[0] == "full" and float(low[1][-1]) == float(high[1][0])
    # the counter on meta sees attention: total > linear
    assert cost.forward(256).total > cost.forward(256).linear > 0


def test_staged_sampler_with_one_full_stage_is_flux_pipeline(tiny_testbed):
    """The harness's own Euler loop (used by the peers) reproduces FluxPipeline exactly."""
    from ralu.calibrate.testbed.evaluate import balanced_labels, generate
    from ralu.calibrate.testbed.model import load_pipeline

    pipe = load_pipeline(path=tiny_testbed / "transformer")
    sampler = TestbedSampler(pipe, batch_size=3, guidance_scale=3.5, size=32)
    labels = balanced_labels(3, 0)
    steps = 4
    method = qmethods.Method("plain", 1, "plain", "staged", stages=[("full", qmethods.shifted_sigmas(steps, 1.0, 0.0, testbed_model.testbed_h0()))], forwards=[256] * steps)
    ours, tokens = sampler.generate(method, labels, seed=0)
    reference = generate(pipe, labels, seed=0, num_inference_steps=steps, batch_size=3)
    assert tokens == [256] * steps
    assert torch.allclose(ours, reference, atol=1e-4)


# ----------------------------------------------------------------------------------------
# --quick end to end
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tiny_testbed, tmp_path_factory):
    from ralu.calibrate.bench.cli import main
    from ralu.runtime import load_schedule, save_schedule

    out = tmp_path_factory.mktemp("quality")
    extra = out / "extra-7x.json"
    save_schedule(load_schedule("flux-dev-7x"), extra)  # a 1024 px file: retargeted to 32 px
    argv = [
        "quality", "--testbed", "v1", "--quick", "--out-dir", str(out), "--schedule", str(extra),
        "--weights", str(tiny_testbed / "transformer"), "--classifier", str(tiny_testbed / "classifier"),
    ]
    assert main(argv) == 0
    return out, json.loads((out / "quality-v1.json").read_text())


def test_quick_writes_reports(quick_run):
    out, report = quick_run
    assert report["command"].startswith("ralu-bench quality --testbed v1 --quick")
    md = (out / "quality-v1.md").read_text()
    assert "## Which method wins" in md and "## Noise strength sweep" in md and "![samples](quality-v1/samples.png)" in md
    for name in ("samples.png", "tradeoff.png", "sweep.png"):
        assert (out / "quality-v1" / name).stat().st_size > 1000


def test_quick_json_schema_and_rows(quick_run):
    _, report = quick_run
    rows = report["rows"]
    keys = {"method", "budget", "flops_speedup_total", "psnr", "ssim", "fd", "accuracy", "edge_artifacts", "seeds"}
    for row in rows:
        assert keys <= set(row)
        assert isinstance(row["seeds"], list) and row["seeds"]
        for key in keys - {"method", "seeds"}:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row["method"], key)
    baseline = [r for r in rows if r["budget"] == 1]
    assert [r["method"] for r in baseline] == ["baseline"]
    assert baseline[0]["flops_speedup_total"] == pytest.approx(1.0)
    methods = {"base-steps", "bottleneck", "naive-upsample", "ralu-paper", "ralu-ours", "ralu-searched"}
    for budget in (4, 7):
        assert methods <= {r["method"] for r in rows if r["budget"] == budget}
    # --schedule adds one row, at the budget nearest its cost
    extra = [r for r in rows if r["method"].startswith("schedule:")]
    assert len(extra) == 1 and extra[0]["method"] == "schedule:extra-7x" and extra[0]["budget"] == 7
    # peers are matched to the preset's cost as integers allow
    for budget in (4, 7):
        group = {r["method"]: r for r in rows if r["budget"] == budget}
        target = group["ralu-paper"]["flops_speedup_total"]
        assert group["ralu-ours"]["flops_speedup_total"] == pytest.approx(target)
        for peer in ("base-steps", "bottleneck", "naive-upsample"):
            assert abs(group[peer]["flops_speedup_total"] / target - 1) < 0.2
    assert report["sweep"]["points"] and report["winners"]["4"]["fd"]["best"] in methods | {"schedule:extra-7x"}


def test_quick_metric_sanity(quick_run):
    _, report = quick_run
    rows = report["rows"]
    baseline = rows[0]
    assert baseline["psnr"] == qconfig.PSNR_CAP and baseline["ssim"] == pytest.approx(1.0)
    for row in rows[1:]:
        assert row["psnr"] < qconfig.PSNR_CAP and row["ssim"] < 1.0
        assert 0.0 <= row["accuracy"] <= 1.0 and -1.0 <= row["edge_artifacts"] <= 1.0 and row["fd"] >= 0.0
    # the naive upsampling keeps its 2x2 blocks (nothing re-noises them): more blocking than the baseline
    for budget in (4, 7):
        naive = next(r for r in rows if r["method"] == "naive-upsample" and r["budget"] == budget)
        assert naive["edge_artifacts"] > baseline["edge_artifacts"]


def test_bad_requests_fail_before_any_compute(capsys):
    from ralu.calibrate.bench.cli import main

    assert main(["quality", "--testbed", "v1", "--quick", "--schedule", "sd3-medium-3x"]) == 2
    assert "testbed is a FLUX transformer" in capsys.readouterr().err
    assert main(["quality", "--testbed", "v1", "--quick", "--budgets", "3"]) == 2
    assert "published presets" in capsys.readouterr().err
    assert main(["quality", "--testbed", "v1", "--quick", "--arch", "sd3"]) == 2
    err = capsys.readouterr().err
    assert "FLUX transformer only" in err and len(err.strip().splitlines()) == 1
    assert main(["quality", "--testbed", "v1", "--quick", "--no-caches"]) == 2
    assert "--no-caches is a testbed v2 option" in capsys.readouterr().err


@pytest.mark.parametrize("testbed", ["v1", "v2"])
def test_two_schedule_files_of_one_name_are_refused(tmp_path, capsys, testbed):
    from ralu.calibrate.bench.cli import main
    from ralu.runtime.schedule import load_schedule, save_schedule

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        save_schedule(load_schedule("flux-dev-7x"), tmp_path / folder / "mine.json")
    args = ["quality", "--testbed", testbed, "--quick", "--schedule", str(tmp_path / "a" / "mine.json"), "--schedule", str(tmp_path / "b" / "mine.json")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "both be the row 'schedule:mine'" in err and "Fix:" in err
