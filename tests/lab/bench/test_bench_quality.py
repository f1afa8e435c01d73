"""``ralu-bench quality``: the harness's shared pieces on testbed v2 (the blocking index and
the Frechet distance on known inputs, the matched-cost planning of the peers) and its command
line (testbed v1 is retired: ``--testbed v1`` is refused, ``--testbed v2`` is the default).
The ``--quick`` run end to end is in ``test_bench_quality_v2.py``."""

from __future__ import annotations

import math

import pytest
import torch

from ralu_lab.bench.quality import cost as qcost
from ralu_lab.bench.quality import methods as qmethods
from ralu_lab.bench.quality import schedules as qschedules
from ralu_lab.testbed.v2 import data, metrics
from ralu_lab.testbed.v2 import model as tb
from ralu_lab.testbed.v2.conditioning import TEXT_TOKENS
from ralu_lab.testbed.v2.evaluate import frechet_distance

# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def test_blocking_index_separates_blocky_from_sharp():
    images, _ = data.make_batch(5, 32)
    blocky = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 2), scale_factor=2, mode="nearest")
    smooth = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 2), scale_factor=2, mode="bilinear", align_corners=False)
    sharp_index = metrics.blocking_index(images)
    blocky_index = metrics.blocking_index(blocky)
    assert blocky_index.min() > 0.99  # nothing changes inside a 2x2 block
    # over a set of scenes there is no grid-aligned structure
    assert abs(sharp_index.mean()) < 0.2
    assert blocky_index.mean() > sharp_index.mean() + 0.7
    assert 0.1 < metrics.blocking_index(smooth).mean() < 0.99  # bilinear upsampling: in between
    assert metrics.blocking_index(torch.zeros(1, 3, 8, 8)).item() == 0.0  # flat image
    assert torch.equal(metrics.blocking(blocky, block=2), blocky_index)


def test_frechet_distance_is_zero_for_identical_sets():
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(1)).numpy()
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(features, features + 1.0) == pytest.approx(16.0, rel=1e-6)  # mean shift only


# ----------------------------------------------------------------------------------------
# Matched cost
# ----------------------------------------------------------------------------------------


def test_peers_are_matched_to_the_ralu_cost():
    cost = qcost.TestbedCost(tb.FLUX_CONFIG, TEXT_TOKENS)
    h0 = tb.base_shift("flux")
    assert h0 == pytest.approx(math.exp(1.15))
    paper = qschedules.paper_schedule(7, data.IMAGE_SIZE)
    assert [s.steps for s in paper.stages] == [2, 3, 5] and paper.z == pytest.approx(6.261)
    assert paper.divergence.js_distance == pytest.approx(0.026638, abs=2e-4)  # docs/method.md §5
    full = tb.FULL_TOKENS
    target = cost.of(qmethods.ralu_forwards(paper, full)).total
    assert qmethods.ralu_forwards(paper, full) == [64] * 2 + [64 + 3 * 6] * 3 + [256] * 5
    bottleneck = qmethods.bottleneck_method(7, target, cost, h0, full, full // 4, full_px=data.IMAGE_SIZE)
    naive = qmethods.naive_method(7, target, cost, h0, full, full // 4, switch_t=0.3, full_px=data.IMAGE_SIZE)
    for method in (bottleneck, naive):
        got = cost.of(method.forwards).total
        assert abs(got - target) / target < 0.15
        # no integer neighbour of the same shape would come closer: at least within one forward
        assert abs(got - target) <= cost.forward(full).total
    # the stages end where the next restarts: sigma 1 -> 0.8 -> 0.6 -> 0
    assert [float(s[0]) for _, s in bottleneck.stages] == pytest.approx([1.0, 0.8, 0.6])
    assert [float(s[-1]) for _, s in bottleneck.stages] == pytest.approx([0.8, 0.6, 0.0])
    low, high = naive.stages
    assert low[0] == "half" and high[0] == "full" and float(low[1][-1]) == float(high[1][0])
    # the counter on meta sees attention: total > linear
    assert cost.forward(full).total > cost.forward(full).linear > 0


def test_the_searched_schedule_is_moved_by_the_caller():
    with pytest.raises(TypeError, match="move"):
        qschedules.searched_schedule(7, data.IMAGE_SIZE, tb.base_shift("flux"), 1)


# ----------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------


def test_testbed_v1_is_refused(capsys):
    from ralu_lab.bench.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["quality", "--testbed", "v1", "--quick"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'v1'" in err and "--weights " not in err


def test_two_schedule_files_of_one_name_are_refused(tmp_path, capsys):
    from ralu.runtime.schedule import load_schedule, save_schedule
    from ralu_lab.bench.cli import main

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        save_schedule(load_schedule("flux-dev-7x"), tmp_path / folder / "mine.json")
    for testbed in ([], ["--testbed", "v2"]):  # v2 is the default; the option is still accepted
        args = ["quality", *testbed, "--quick", "--schedule", str(tmp_path / "a" / "mine.json"), "--schedule", str(tmp_path / "b" / "mine.json")]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "both be the row 'schedule:mine'" in err and "Fix:" in err
