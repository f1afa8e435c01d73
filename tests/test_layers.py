"""The layers of docs/architecture.md, enforced by import-linter's contracts in pyproject.toml:
the runtime imports neither the calibrator nor the lab, the product imports nothing of the lab
(directly or through another module).  The contracts are shown to fail on a copy of the code
with a violating module added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"


def lint_imports(cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    """``lint-imports`` with this repository's contracts (no cache: nothing written to ``cwd``)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    code = f"import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename={str(CONFIG)!r}, no_cache=True, no_logo=True))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300, check=False)


def test_the_contracts_are_the_documented_layers():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads(CONFIG.read_text())["tool"]["importlinter"]
    assert set(config["root_packages"]) == {"ralu.calibrate", "ralu.runtime", "ralu.schedules", "ralu_lab"}
    contracts = {c["id"]: c for c in config["contracts"]}
    assert set(contracts) == {"runtime", "product"} and all(c["type"] == "forbidden" and not c.get("allow_indirect_imports") for c in contracts.values())
    assert contracts["runtime"]["source_modules"] == ["ralu.runtime"] and set(contracts["runtime"]["forbidden_modules"]) == {"ralu.calibrate", "ralu_lab"}
    assert set(contracts["product"]["source_modules"]) == {"ralu.calibrate", "ralu.runtime", "ralu.schedules"} and contracts["product"]["forbidden_modules"] == ["ralu_lab"]
    assert "lint-imports" in (ROOT / "docs" / "architecture.md").read_text()


def test_the_code_keeps_the_contracts(tmp_path):
    run = lint_imports(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in run.stdout


@pytest.mark.parametrize(("where", "line", "broken"), [
    ("ralu/runtime/_violation.py", "import ralu.calibrate.plot\n", "The runtime imports neither the calibrator nor the lab BROKEN"),
    ("ralu/calibrate/_violation.py", "from ralu_lab.bench import common\n", "The product (calibrator, runtime, schedules) imports nothing of the lab BROKEN"),
    # indirect: a runtime module importing a calibrate module that imports the lab breaks both
    ("ralu/runtime/_violation.py", "def later():\n    from ralu.calibrate import _lab_user\n", "The runtime imports neither the calibrator nor the lab BROKEN"),
])
def test_a_violating_module_breaks_its_contract(tmp_path, where, line, broken):
    """A copy of the product and the lab, first on the path, with one module added."""
    copy = tmp_path / "src"
    for folder in ("calibrate", "runtime", "schedules"):
        shutil.copytree(ROOT / folder, copy / "ralu" / folder, ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.png"))
    shutil.copytree(ROOT / "lab" / "ralu_lab", copy / "ralu_lab", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "ralu" / "calibrate" / "_lab_user.py").write_text("import ralu_lab.testbed\n" if "_lab_user" in line else "")
    (copy / where).write_text(line)
    run = lint_imports(tmp_path, pythonpath=str(copy))
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-2000:]
    assert broken in run.stdout and "_violation" in run.stdout


def test_the_lab_tests_are_marked_by_path(tmp_path):
    """``-m "not slow and not lab"`` (the product tier) leaves out every test under tests/lab/."""
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-m", "lab",
               "tests/lab/testbed/test_testbed_weights.py", "tests/test_layers.py"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    selected = [line for line in run.stdout.splitlines() if "::" in line]
    assert run.returncode == 0 and selected, run.stdout[-2000:] + run.stderr[-2000:]
    assert all(line.startswith("tests/lab/") for line in selected), selected
