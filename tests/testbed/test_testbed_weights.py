"""The testbed's weights are repository data: found from a checkout, from
$RALU_TESTBED_WEIGHTS or an explicit folder, never carried by the installed package."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ralu.calibrate.testbed.v2 import location
from ralu.calibrate.testbed.v2.location import (
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

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def no_checkout(monkeypatch, tmp_path, no_env):
    """As in a wheel install: no testbed-weights/ beside the package."""
    monkeypatch.setattr(location, "CHECKOUT_FOLDER", tmp_path / "no-checkout" / location.REPOSITORY_FOLDER)


def test_a_checkout_finds_its_repository_folder(no_env):
    assert weights_dir() == ROOT / "testbed-weights"
    for part in (AUTOENCODER, FLUX, SD3):
        assert (part_dir(part) / "diffusion_pytorch_model.safetensors").is_file()
    assert (part_dir(CLASSIFIER) / "classifier.safetensors").is_file()
    assert describe(FLUX) == "testbed-weights/v2/flux (repository)"
    # testbed v1's weights are retired; nothing of them is left inside the package
    assert sorted(p.name for p in (ROOT / "testbed-weights").iterdir()) == ["v2"]
    assert not list((ROOT / "calibrate").rglob("*.safetensors"))


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
    from ralu.calibrate.testbed.v2 import load_classifier, load_pipeline

    for load in (weights_dir, load_pipeline, load_classifier):
        with pytest.raises(FileNotFoundError) as error:
            load()
        message = str(error.value)
        assert "\n" not in message and "testbed-weights/" in message and ENV_VAR in message and "Fix:" in message


def test_evaluate_cli_without_weights_exits_2_with_one_line(no_checkout, capsys):
    from ralu.calibrate.testbed.v2.evaluate import main

    assert main(["--arch", "flux", "--n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "testbed-weights/" in err


@pytest.mark.parametrize("argv", [["quality", "--quick", "--out-dir", "out"], ["cache", "--images", "1", "--out-dir", "out"],
                                  ["magcache", "--schedule", "flux-dev-7x", "--out", "x.json"]])
def test_bench_without_weights_exits_2_with_one_line(no_checkout, capsys, tmp_path, monkeypatch, argv):
    from ralu.calibrate.bench.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and ENV_VAR in err
    assert list(tmp_path.iterdir()) == []  # no report, no schedule, no work folder


def test_a_missing_classifier_folder_names_the_fix(tmp_path):
    from ralu.calibrate.testbed.v2 import load_classifier

    with pytest.raises(FileNotFoundError, match="python -m ralu.calibrate.testbed.v2.classifier"):
        load_classifier(tmp_path)


# ----------------------------------------------------------------------------------------
# What an install carries (about 10-20 s: one build for the module)
# ----------------------------------------------------------------------------------------


def _can_build_wheels() -> bool:
    """setuptools >= 70.1 has bdist_wheel built in; older ones need the ``wheel`` package."""
    import setuptools

    version = tuple(int(part) for part in setuptools.__version__.split(".")[:2] if part.isdigit())
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _run(command: list[str], **kwargs) -> None:
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, list[str]]:
    """This checkout installed into a bare folder, and the names of the files it holds.

    A real wheel, built by pip from a copy of the checkout and installed with pip (no build
    isolation and no index: offline), where this environment can build wheels; otherwise
    setuptools' ``build_py``, the step of a wheel build that collects the packages and their
    package data (what a pure-Python wheel holds, less the metadata).
    """
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    site = tmp / "site"
    if _can_build_wheels():
        out = tmp / "dist"
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(source)])
        (wheel,) = out.glob("ralu-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)])
    else:
        _run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "--build-lib", str(site)], cwd=source)
        names = [path.relative_to(site).as_posix() for path in site.rglob("*") if path.is_file()]
    return site, names


def test_an_install_carries_no_testbed_weights(installed):
    _, names = installed
    # the packages are there (so the check below is not about an empty install) ...
    assert "ralu/runtime/__init__.py" in names and "ralu/calibrate/testbed/v2/model.py" in names
    assert any(n.startswith("ralu/schedules/") and n.endswith(".json") for n in names)
    # ... the weights and their records are not
    assert not [n for n in names if n.endswith((".safetensors", "training.json")) or "testbed-weights" in n]


def test_an_install_runs_without_weights_and_says_where_they_are(installed, tmp_path):
    """Import from the installed folder alone (python -S: no editable-install hook), with this
    environment's other packages behind it."""
    site, _ = installed
    script = (
        "import ralu.runtime, ralu.calibrate.testbed.v2.location as loc\n"
        "from ralu.runtime import load_schedule\n"
        f"assert ralu.runtime.__file__.startswith({str(site)!r}), ralu.runtime.__file__\n"
        "load_schedule('flux-dev-7x')\n"
        "try:\n    loc.weights_dir()\nexcept loc.WeightsNotFound as e:\n    print(e)\nelse:\n    raise SystemExit('found weights')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    # this environment's package folders (not the editable hook, not the checkout) behind the install
    others = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != ROOT]
    env["PYTHONPATH"] = os.pathsep.join([str(site), *others])
    run = subprocess.run([sys.executable, "-S", "-c", script], check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    message = run.stdout.strip()
    assert message.count("\n") == 0 and "testbed-weights/" in message and ENV_VAR in message
