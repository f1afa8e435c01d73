"""The paper_compat switch experiment (``python -m ralu_lab.bench.quality.v2.switches``)
on random-init testbed v2 weights: the code path and the report, not the numbers."""

from __future__ import annotations

import json

import pytest
import torch

from ralu.runtime.compat import PaperCompat
from ralu_lab.bench.quality.v2 import switches
from ralu_lab.bench.quality.v2.stats import Reference
from ralu_lab.testbed.v2 import metrics


def test_variants_cover_every_switch_alone_all_and_other_draws():
    found = switches.variants([7, 8])
    assert found[0] == ("exact noise", [], None)
    assert [s for _, s, _ in found[1:-3]] == [[name] for name in PaperCompat.names()]
    assert found[-3][1] == list(PaperCompat.names())
    assert [(s, d) for _, s, d in found[-2:]] == [(["global_noise"], 7), (["global_noise"], 8)]


def test_fd_splits_into_its_mean_term_and_the_rest():
    class Identity(torch.nn.Module):
        def features(self, x):
            return x.flatten(1)

    torch.manual_seed(0)
    real = torch.randn(64, 1, 2, 2)
    reference = Reference.__new__(Reference)  # only the feature statistics FD needs
    reference.features = real.flatten(1).double()
    reference.frechet = metrics.ReferenceFrechetDistance(reference.features)
    shifted = reference.features + torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    mean_term, rest = switches.fd_parts(reference, shifted)
    assert mean_term == pytest.approx(5.0) and rest == pytest.approx(0.0, abs=1e-6)  # a shift moves only the mean


def test_report_on_random_weights(v2_weights, tmp_path, capsys):
    argv = ["--images", "2", "--real-images", "4", "--draws", "3", "--threads", "1", "--weights-dir", str(v2_weights), "--out-dir", str(tmp_path)]
    assert switches.main(argv) == 0
    data = json.loads((tmp_path / "paper-compat-switches.json").read_text())
    report = switches.SwitchReport.model_validate(data)
    assert [r.name for r in report.rows] == [name for name, _, _ in switches.variants([3])]
    assert report.command.endswith(" ".join(argv)) and report.seeds == [0] and report.images_per_seed == 2
    for row in report.rows:
        assert row.fd_mean_term + row.fd_rest == pytest.approx(row.metrics["fd"].value, rel=1e-6)
    assert (tmp_path / "paper-compat-switches.md").read_text() == switches.render_markdown(report)
    assert switches.main(["--images", "1", "--out-dir", str(tmp_path)]) == 2
    assert "--images" in capsys.readouterr().err
