"""The product imports nothing of the lab; the lab plugs in through entry points (ralu.calibrate.plugins)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ralu.calibrate import cli
from ralu.calibrate.plugins import QUALITY_TARGETS, quality_target, quality_target_names

ROOT = Path(__file__).resolve().parents[2]
LAB = ("ralu_lab",)


def test_importing_the_product_loads_no_module_of_the_lab():
    code = ("import sys, ralu.calibrate, ralu.calibrate.quality_search, ralu.calibrate.cli, ralu.runtime\n"
            f"print(sorted(m for m in sys.modules if m.startswith({LAB!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert out == "[]"


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports (also inside functions), relative imports made absolute."""
    package = "ralu." + ".".join(path.relative_to(ROOT).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("folder", ["calibrate", "runtime"])
def test_no_product_module_imports_the_lab(folder):
    offenders = {}
    paths = sorted((ROOT / folder).rglob("*.py"))
    assert len(paths) > 10  # the product's modules are there (the lab lives in lab/ralu_lab/)
    for path in paths:
        bad = sorted(m for m in _imported(path) if m.startswith(LAB))
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


@pytest.mark.lab  # the product driven through the lab's testbed (docs/architecture.md)
def test_the_testbed_target_is_registered_and_resolves():
    from ralu_lab.bench.quality.v2.search_target import testbed_target

    assert "testbed" in quality_target_names()
    assert quality_target("testbed") is testbed_target


def test_an_unknown_target_is_one_line_naming_the_registered_ones(tmp_path, capsys):
    with pytest.raises(ValueError) as error:
        quality_target("no-such-target")
    message = str(error.value)
    assert "\n" not in message and "registered: testbed" in message and QUALITY_TARGETS in message and "Fix:" in message
    (tmp_path / "p.txt").write_text("a prompt\n")
    for option in (["--objective", "quality", "--speedup", "4"], ["--magcache", "flux-dev-7x"]):
        code = cli.main(["--model", "flux", *option, "--pipeline", "no-such-target", "--prompts", str(tmp_path / "p.txt"),
                         "--out", str(tmp_path / "q.json"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "registered: testbed" in err and not (tmp_path / "q.json").exists()


@pytest.mark.lab  # the product driven through the lab's testbed (docs/architecture.md)
def test_the_testbed_target_reads_its_prompts_and_refuses_others(v2_weights):
    import torch

    from ralu_lab.bench.quality.v2.search_target import labels_of_prompts, testbed_target
    from ralu_lab.testbed.v2 import data
    from ralu_lab.testbed.v2 import model as tb

    labels = data.balanced_labels(5, 3)
    assert torch.equal(labels_of_prompts(data.describe(labels)), labels)
    with pytest.raises(ValueError, match="is not one the testbed draws. Fix: write testbed v2 prompts"):
        labels_of_prompts(["a cat"])
    pipe = tb.load_pipeline("sd3", path=v2_weights / "sd3", autoencoder=v2_weights / "autoencoder")
    target = testbed_target("sd3", metric="pixel", pipe=pipe)
    assert target.options["model"] == "sd3-medium" and target.options["base_steps"] == tb.BASE_STEPS["sd3"] and target.options["metric"] == "pixel"
    assert target.adapt_schedule("sd3-medium-3x").height == data.IMAGE_SIZE
    with pytest.raises(ValueError, match="--model flux or --model sd3"):
        testbed_target("chroma")
