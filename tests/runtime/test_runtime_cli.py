"""ralu-generate end to end on a tiny FLUX pipeline saved locally, and its errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ralu.runtime.cli import main
from ralu.runtime.schedule import save_schedule


@pytest.fixture
def schedule_file(tmp_path, make_schedule):
    schedule = make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (2, 1.0, 2.2)], c=0.04, up_ratio=0.3, height=64, width=64)
    return str(save_schedule(schedule, tmp_path / "tiny-3x.json"))


def test_generate_end_to_end(saved_flux_pipeline, schedule_file, tmp_path, capsys):
    out = tmp_path / "out"
    status = main([
        "--model", str(saved_flux_pipeline), "--schedule", schedule_file, "--prompt", "a red cat",
        "--negative-prompt", "blue dog", "--true-cfg-scale", "2.0", "--seed", "5", "--num-images", "2",
        "--guidance", "3.0", "--device", "cpu", "--out", str(out),
    ])
    assert status == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["000-tiny-3x-seed5.png", "001-tiny-3x-seed6.png"]
    with Image.open(files[1]) as image:
        assert image.size == (64, 64)
        meta = image.text
    assert meta["prompt"] == "a red cat" and meta["negative_prompt"] == "blue dog" and meta["seed"] == "6"
    assert meta["schedule"] == schedule_file and json.loads(meta["schedule_json"])["up_ratio"] == 0.3
    printed = capsys.readouterr().out
    assert printed.count("s/image") == 2


def test_generate_is_reproducible(saved_flux_pipeline, schedule_file, tmp_path):
    import numpy as np

    args = ["--model", str(saved_flux_pipeline), "--schedule", schedule_file, "--prompt", "a cat", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    (first,), (second,) = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def _error(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_or_foreign_folders(tmp_path, schedule_file, capsys):
    common = ["--schedule", schedule_file, "--prompt", "x", "--out", str(tmp_path / "out")]
    assert "does not exist" in _error(capsys, ["--model", str(tmp_path / "nowhere")] + common)
    (tmp_path / "empty").mkdir()
    assert "no model_index.json" in _error(capsys, ["--model", str(tmp_path / "empty")] + common)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert "StableDiffusionPipeline" in _error(capsys, ["--model", str(other)] + common)


def test_sd3_dispatch_is_lazy(tmp_path, schedule_file, capsys, monkeypatch):
    import ralu.runtime as runtime

    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    common = ["--model", str(sd3), "--schedule", schedule_file, "--prompt", "x", "--out", str(tmp_path / "out")]
    try:
        _ = runtime.RALUStableDiffusion3Pipeline
    except (ImportError, AttributeError):
        assert "RALUStableDiffusion3Pipeline" in _error(capsys, common)
    # With the SD3 runtime present, the folder dispatches to it; a FLUX schedule is refused.
    class Fake:
        pass

    monkeypatch.setattr(runtime, "RALUStableDiffusion3Pipeline", Fake, raising=False)
    assert "sd3" in _error(capsys, common)
    assert not (tmp_path / "out").exists()


def test_bad_resolution_or_schedule_fails_before_loading(saved_flux_pipeline, schedule_file, tmp_path, capsys):
    common = ["--model", str(saved_flux_pipeline), "--prompt", "x", "--out", str(tmp_path / "out")]
    assert "multiple of 32" in _error(capsys, common + ["--schedule", schedule_file, "--height", "80"])
    assert "calibrated for 64x64" in _error(capsys, common + ["--schedule", schedule_file, "--height", "96"])
    assert "no schedule file" in _error(capsys, common + ["--schedule", "flux-dev-0x"])
    assert "true CFG" in _error(capsys, common + ["--schedule", schedule_file, "--negative-prompt", "y"])
    assert not (tmp_path / "out").exists()
