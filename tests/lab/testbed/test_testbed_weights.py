"""The testbed's weights are repository data: found from a checkout, from
$RALU_TESTBED_WEIGHTS or an explicit folder, never carried by an installed package."""

from __future__ import annotations

from pathlib import Path

import pytest

from ralu_lab.testbed.v2 import location
from ralu_lab.testbed.v2.location import (
    AUTOENCODER,
    CLASSIFIER,
    ENV_VAR,
    FLUX,
    SD3,
    WeightsNotFound,
    describe,
    part_dir,
    weights_dir,
)

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def no_checkout(monkeypatch, tmp_path, no_env):
    """As in a wheel install: no lab/testbed-weights/ beside the package."""
    monkeypatch.setattr(location, "CHECKOUT_FOLDER", tmp_path / "no-checkout" / location.REPOSITORY_FOLDER)


def test_a_checkout_finds_its_repository_folder(no_env):
    assert weights_dir() == ROOT / "lab" / "testbed-weights"
    for part in (AUTOENCODER, FLUX, SD3):
        assert (part_dir(part) / "diffusion_pytorch_model.safetensors").is_file()
    assert (part_dir(CLASSIFIER) / "classifier.safetensors").is_file()
    assert describe(FLUX) == "lab/testbed-weights/v2/flux (repository)"
    # testbed v1's weights are retired; nothing of them is left inside the package
    assert sorted(p.name for p in (ROOT / "lab" / "testbed-weights").iterdir()) == ["v2"]
    assert not list((ROOT / "calibrate").rglob("*.safetensors")) and not list((ROOT / "lab" / "ralu_lab").rglob("*.safetensors"))


def test_an_explicit_folder_comes_first(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing"))  # not even looked at
    assert part_dir(FLUX, tmp_path / "t") == tmp_path / "t" and part_dir(CLASSIFIER, str(tmp_path)) == tmp_path
    assert describe(CLASSIFIER, tmp_path) == str(tmp_path)


def test_the_environment_variable_comes_before_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert weights_dir() == tmp_path and part_dir(FLUX) == tmp_path / "v2" / "flux"
    assert describe(CLASSIFIER) == f"{tmp_path / 'v2' / 'classifier'} (${ENV_VAR})"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(WeightsNotFound, match=ENV_VAR) as error:
        weights_dir()
    assert "\n" not in str(error.value) and "Fix:" in str(error.value)


def test_without_a_checkout_one_line_says_where_the_weights_are(no_checkout):
    from ralu_lab.testbed.v2 import load_classifier, load_pipeline

    for load in (weights_dir, load_pipeline, load_classifier):
        with pytest.raises(FileNotFoundError) as error:
            load()
        message = str(error.value)
        assert "\n" not in message and "testbed-weights/" in message and ENV_VAR in message and "Fix:" in message


def test_evaluate_cli_without_weights_exits_2_with_one_line(no_checkout, capsys):
    from ralu_lab.testbed.v2.evaluate import main

    assert main(["--arch", "flux", "--n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "testbed-weights/" in err


@pytest.mark.parametrize("argv", [["quality", "--quick", "--out-dir", "out"], ["cache", "--images", "1", "--out-dir", "out"],
                                  ["magcache", "--schedule", "flux-dev-7x", "--out", "x.json"]])
def test_bench_without_weights_exits_2_with_one_line(no_checkout, capsys, tmp_path, monkeypatch, argv):
    from ralu_lab.bench.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and ENV_VAR in err
    assert list(tmp_path.iterdir()) == []  # no report, no schedule, no work folder


def test_a_missing_classifier_folder_names_the_fix(tmp_path):
    from ralu_lab.testbed.v2 import load_classifier

    with pytest.raises(FileNotFoundError, match="python -m ralu_lab.testbed.v2.classifier"):
        load_classifier(tmp_path)


# What an install carries (the product's wheel and the lab's, no weights): tests/test_packaging.py
