"""The fitted progress model's file (calibrate/progress_model.json): what the product reads from
it, and a broken file refused in one line."""

from __future__ import annotations

import json

import pytest

from ralu.calibrate import progress_model


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    path = tmp_path / "progress_model.json"
    monkeypatch.setattr(progress_model, "model_path", lambda: path)
    progress_model.load_progress_model.cache_clear()
    yield path
    progress_model.load_progress_model.cache_clear()


def test_the_shipped_file_holds_a_fit_with_its_command():
    data = json.loads(progress_model.model_path().read_text())
    fitted = progress_model.load_progress_model()
    assert fitted.version == data["version"] and fitted.version.startswith("fit-")
    assert data["command"].startswith("python -m ralu_lab.bench.quality.v2.progress_fit")
    for name in ("resolution_gap", "shift_ratio"):
        low, high = data["terms"][name]["interval"]
        assert low <= data["terms"][name]["value"] <= high and data["terms"][name]["why"]
    assert 0 < fitted.verdict_margin and fitted.verdict_confidence == data["verdict"]["confidence"]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{", "cannot read the progress model"),
        (json.dumps({"format": 2, "version": "x"}), "not a progress model of format 1"),
        (json.dumps({"format": 1, "version": "x", "terms": {"resolution_gap": {"value": 0.1}}, "verdict": {"margin": 0.3, "confidence": 0.95}}), "terms.shift_ratio.value"),
        (json.dumps({"format": 1, "version": "x", "terms": {"resolution_gap": {"value": -1}, "shift_ratio": {"value": 0.6}}, "verdict": {"margin": 0.3, "confidence": 0.95}}),
         "terms.resolution_gap.value must be a number in [0, 10]"),
    ],
)
def test_a_broken_file_is_refused_in_one_line(model_file, content, words):
    model_file.write_text(content)
    with pytest.raises(ValueError) as caught:
        progress_model.load_progress_model()
    assert words in str(caught.value) and "Fix:" in str(caught.value) and "\n" not in str(caught.value)
