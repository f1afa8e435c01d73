"""The quality search's score on held-out seeds, and spectra
(``python -m ralu_lab.bench.quality.v2.fidelity``) on random-init testbed v2 weights."""

from __future__ import annotations

import json

import pytest
import torch

from ralu_lab.bench.quality.v2 import fidelity
from ralu_lab.bench.quality.v2.sampler import WorkStore
from ralu_lab.testbed.v2 import metrics


def test_rows_against_50_step_samples_of_other_noise(v2_weights, tmp_path):
    work = tmp_path / "work"
    argv = ["--budget", "7", "--schedule", "flux-dev-7x", "--rows", "base-steps", "--seeds", "0", "1", "--images", "3", "--real-images", "4",
            "--batch-size", "3", "--threads", "1", "--weights-dir", str(v2_weights), "--work-dir", str(work), "--out", str(tmp_path / "f")]
    assert fidelity.main(argv) == 0
    report = fidelity.FidelityReport.model_validate(json.loads((tmp_path / "f.json").read_text()))
    assert [r.method for r in report.rows] == ["base-steps", "schedule:flux-dev-7x"]
    for r in report.rows:
        assert len(r.log_ratio_real) == 32 and set(r.bands_real) == set(fidelity.BANDS)
        # a spectral distance is the mean absolute per-radius log ratio, to either reference
        assert r.metrics["spectral_distance"].value == pytest.approx(sum(abs(v) for v in r.log_ratio_real) / 32, rel=1e-9)
        assert r.metrics["spectral_to_baseline"].value == pytest.approx(sum(abs(v) for v in r.log_ratio_baseline) / 32, rel=1e-9)
        assert r.metrics["fd_to_baseline"].value > 0 and len(r.metrics["fd_to_baseline"].per_seed) == 2
    # the schedule meets the other row on both distances, paired
    assert {(v.a, v.b, v.metric) for v in report.verdicts} == {("schedule:flux-dev-7x", "base-steps", k) for k, *_ in fidelity.FIDELITY_METRICS}
    assert all(v.low <= v.difference <= v.high for v in report.verdicts)
    assert (tmp_path / "f.md").read_text() == fidelity.render_markdown(report, "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the reference went to the work folder under its own noise seeds, beside the rows' batches
    names = sorted(p.name for p in WorkStore(work).folder.glob("*.pt"))
    assert sum(n.startswith("flux-1000-") for n in names) == 1 and sum(n.startswith("flux-1001-") for n in names) == 1
    assert sum(n.startswith(("flux-0-", "flux-1-")) for n in names) == 4


def test_band_means_and_paired_distance():
    ratio = torch.arange(1, 33, dtype=torch.float64)
    assert fidelity.band_means(ratio) == {"coarse (1-4)": 2.5, "middle (5-12)": 8.5, "fine (13-32)": 22.5}
    g = torch.Generator().manual_seed(0)
    a = torch.rand(40, 32, generator=g, dtype=torch.float64) + 0.5
    found = fidelity.distance_to(a, 10 * a, metrics.spectral_distance, seeds=2, resamples=50)
    # ten times the power at every radius of every image: one decade apart, whatever the resample
    assert (found.value, found.low, found.high) == pytest.approx((1.0, 1.0, 1.0))
    assert found.per_seed == pytest.approx([1.0, 1.0])
    feats = torch.randn(60, 4, generator=g, dtype=torch.float64)
    shifted = fidelity.distance_to(feats + 2.0, feats, metrics.frechet_distance, seeds=1, resamples=50)
    assert shifted.value == pytest.approx(16.0)  # |shift|^2 = 4 * 2^2, the covariances equal


def test_bad_requests_are_one_line(tmp_path, capsys):
    assert fidelity.main(["--budget", "7", "--schedule", "sd3-medium-3x", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "drives SD3" in err
    assert not (tmp_path / "f.md").exists()
