"""ralu-generate on a tiny, complete StableDiffusion3Pipeline folder saved locally."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sd3_models import pipeline_components, tiny_sd3_text_stack

from ralu.runtime.cli import main
from ralu.runtime.schedule import save_schedule


@pytest.fixture(scope="module")
def saved_sd3_pipeline(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    components = pipeline_components("sd3.5")
    components.update(tiny_sd3_text_stack())
    folder = tmp_path_factory.mktemp("tiny-sd3")
    StableDiffusion3Pipeline(**components).save_pretrained(folder)
    return folder


def test_generate_with_an_sd3_folder(saved_sd3_pipeline, make_schedule, tmp_path, capsys):
    schedule = make_schedule([(2, 0.3, 5.0), (2, 0.5, 2.5), (2, 1.0, 2.0)], c=0.05, up_ratio=0.3, height=128, width=128, model="sd3-medium")
    schedule_file = str(save_schedule(schedule, tmp_path / "tiny-sd3.json"))
    argv = ["--model", str(saved_sd3_pipeline), "--schedule", schedule_file, "--prompt", "a red cat", "--negative-prompt", "blue dog", "--guidance", "5.0", "--seed", "3", "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    (first,), (second,) = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    assert first.name == "000-tiny-sd3-seed3.png"
    with Image.open(first) as image:
        assert image.size == (128, 128)
        assert image.text["negative_prompt"] == "blue dog" and json.loads(image.text["parameters"])["guidance_scale"] == 5.0
        pixels = np.asarray(image)
    assert np.array_equal(pixels, np.asarray(Image.open(second)))
    assert "s/image" in capsys.readouterr().out


def test_sd3_folder_refuses_a_flux_schedule(saved_sd3_pipeline, make_schedule, tmp_path, capsys):
    schedule = make_schedule([(2, 0.3, 5.0), (2, 1.0, 2.0)], c=0.05, height=128, width=128, model="flux-dev")
    schedule_file = str(save_schedule(schedule, tmp_path / "flux.json"))
    status = main(["--model", str(saved_sd3_pipeline), "--schedule", schedule_file, "--prompt", "x", "--out", str(tmp_path / "out")])
    assert status == 2 and "sd3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
