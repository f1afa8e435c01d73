"""The README's commands and examples are the ones that work."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    setup = code_blocks("bash")[:2]
    assert "ralu-calibrate --model flux --speedup 7" in setup[0]
    assert "pytest" in setup[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup[1].strip() in ci


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_examples_run(index, tmp_path, monkeypatch):
    block = code_blocks("python")[index]
    if "RALU_EXAMPLE_NEEDS_WEIGHTS" in block:
        pytest.skip("needs model weights; exercised with a tiny model in the runtime tests")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"README python block {index}", "exec"), {})
