"""Spectra of harness rows against real scenes and the 50-step baseline
(``python -m ralu.calibrate.bench.quality.v2.spectra``) on random-init testbed v2 weights."""

from __future__ import annotations

import json

import pytest
import torch

from ralu.calibrate.bench.quality.v2 import spectra
from ralu.calibrate.testbed.v2 import metrics


def test_rows_against_real_scenes_and_the_baseline(v2_weights, tmp_path):
    argv = ["--budget", "7", "--schedule", "flux-dev-7x", "--rows", "base-steps", "--seeds", "0", "1", "--images", "2", "--real-images", "4",
            "--batch-size", "2", "--threads", "1", "--weights-dir", str(v2_weights), "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "s")]
    assert spectra.main(argv) == 0
    report = spectra.SpectrumReport.model_validate(json.loads((tmp_path / "s.json").read_text()))
    assert [r.method for r in report.rows] == ["baseline", "base-steps", "schedule:flux-dev-7x"]
    baseline = report.rows[0]
    # the baseline against itself: no distance, no ratio anywhere
    assert baseline.to_baseline.value == 0.0 and all(v == 0.0 for v in baseline.log_ratio_baseline)
    for r in report.rows:
        assert len(r.log_ratio_real) == 32 and set(r.bands_real) == set(spectra.BANDS)
        # the distance is the mean absolute per-radius log ratio
        assert r.to_real.value == pytest.approx(sum(abs(v) for v in r.log_ratio_real) / 32, rel=1e-9)
        assert r.to_baseline.value == pytest.approx(sum(abs(v) for v in r.log_ratio_baseline) / 32, rel=1e-9)
        assert len(r.to_baseline.per_seed) == 2
    assert (tmp_path / "s.md").read_text() == spectra.render_markdown(report, "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_band_means_and_paired_distance():
    ratio = torch.arange(1, 33, dtype=torch.float64)
    bands = spectra.band_means(ratio)
    assert bands == {"coarse (1-4)": 2.5, "middle (5-12)": 8.5, "fine (13-32)": 22.5}
    g = torch.Generator().manual_seed(0)
    a = torch.rand(40, 32, generator=g, dtype=torch.float64) + 0.5
    found = spectra.distance_to(a, 10 * a, seeds=2, resamples=50)
    # ten times the power at every radius of every image: exactly one decade apart, whatever the resample
    assert found.value == pytest.approx(1.0) and found.low == pytest.approx(1.0) and found.high == pytest.approx(1.0)
    assert found.value == pytest.approx(metrics.spectral_distance(a, 10 * a))


def test_bad_requests_are_one_line(tmp_path, capsys):
    assert spectra.main(["--budget", "7", "--schedule", "sd3-medium-3x", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "drives SD3" in err
    assert not (tmp_path / "s.md").exists()
