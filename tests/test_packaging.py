"""What an install carries: the product's wheel (``ralu``) holds no module of the lab and no
testbed weights; the lab's wheel (``ralu-lab``, lab/pyproject.toml) holds the lab's code but
no weights either (about 20-40 s: two wheel builds for the module)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_VAR = "RALU_TESTBED_WEIGHTS"  # ralu_lab.testbed.v2.location.ENV_VAR, spelled out: the product's tests import no lab


def _can_build_wheels() -> bool:
    """setuptools >= 70.1 has bdist_wheel built in; older ones need the ``wheel`` package."""
    import setuptools

    version = tuple(int(part) for part in setuptools.__version__.split(".")[:2] if part.isdigit())
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _run(command: list[str], **kwargs) -> None:
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """This checkout's two distributions built as wheels by pip (from a copy of the checkout,
    no build isolation, no index: offline) and installed into one bare folder; the folder and
    each wheel's file names."""
    if not _can_build_wheels():
        pytest.skip("this setuptools cannot build wheels (needs >= 70.1 or the wheel package)")
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    site, names = tmp / "site", {}
    for name, folder in (("ralu", source), ("ralu_lab", source / "lab")):
        out = tmp / f"dist-{name}"
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(folder)])
        (wheel,) = out.glob(f"{name}-*.whl")
        names[name] = zipfile.ZipFile(wheel).namelist()
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)])
    return site, names


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".pt", "training.json")) or "testbed-weights" in name


def test_the_product_wheel_carries_no_lab_and_no_weights(installed):
    _, names = installed
    product = names["ralu"]
    # the product is there (so the checks below are not about an empty wheel) ...
    assert {"ralu/runtime/__init__.py", "ralu/calibrate/__init__.py", "ralu/calibrate/quality_search.py", "ralu/calibrate/flops/__init__.py"} <= set(product)
    assert any(n.startswith("ralu/schedules/") and n.endswith(".json") for n in product)
    # ... the lab and the weights are not
    modules = [n for n in product if n.endswith(".py")]
    assert all(n.startswith(("ralu/calibrate/", "ralu/runtime/", "ralu/schedules/")) for n in modules), modules
    assert not [n for n in product if n.startswith(("ralu_lab/", "ralu/calibrate/bench/", "ralu/calibrate/testbed/")) or _is_weights(n)]
    # the lab's command and plug-ins are registered by the lab's wheel, not the product's
    text = next(installed[0].glob("ralu-*.dist-info")).joinpath("entry_points.txt").read_text()
    assert "ralu-calibrate" in text and "ralu-bench" not in text and "ralu_lab" not in text


def test_the_lab_wheel_carries_the_lab_but_no_weights(installed):
    site, names = installed
    lab = names["ralu_lab"]
    assert {"ralu_lab/bench/cli.py", "ralu_lab/testbed/v2/location.py", "ralu_lab/bench/quality/v2/search_target.py"} <= set(lab)
    assert not [n for n in lab if n.startswith("ralu/") or _is_weights(n)]
    text = next(site.glob("ralu_lab-*.dist-info")).joinpath("entry_points.txt").read_text()
    assert "ralu-bench = ralu_lab.bench.cli:main" in text and "[ralu.quality_targets]" in text and "[ralu.schedule_judgements]" in text


def test_an_install_runs_without_weights_and_says_where_they_are(installed, tmp_path):
    """Import from the installed folder alone (python -S: no editable-install hook), with this
    environment's other packages behind it."""
    site, _ = installed
    script = (
        "import ralu.runtime, ralu_lab.testbed.v2.location as loc\n"
        "from ralu.runtime import load_schedule\n"
        f"assert ralu.runtime.__file__.startswith({str(site)!r}), ralu.runtime.__file__\n"
        f"assert loc.__file__.startswith({str(site)!r}), loc.__file__\n"
        "load_schedule('flux-dev-7x')\n"
        "try:\n    loc.weights_dir()\nexcept loc.WeightsNotFound as e:\n    print(e)\nelse:\n    raise SystemExit('found weights')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    # this environment's package folders (not the editable hooks, not the checkout) behind the install
    others = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() not in (ROOT, ROOT / "lab")]
    env["PYTHONPATH"] = os.pathsep.join([str(site), *others])
    run = subprocess.run([sys.executable, "-S", "-c", script], check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    message = run.stdout.strip()
    assert message.count("\n") == 0 and "lab/testbed-weights/" in message and ENV_VAR in message
