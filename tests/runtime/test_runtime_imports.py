"""The runtime never needs the calibration stack (optuna, scipy, matplotlib)."""

from __future__ import annotations

import os
import subprocess
import sys

HEAVY = ("optuna", "scipy", "matplotlib")


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_schedule_import_is_light():
    loaded = _run(
        "import sys, ralu.runtime; from ralu.runtime import load_schedule, Schedule\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} + ('torch', 'diffusers')))"
    )
    assert loaded == "[]"


def test_runtime_imports_without_the_calibration_stack():
    # Made unimportable: importing (and using) the runtime must not need them.
    loaded = _run(
        f"import sys\nfor name in {HEAVY!r}: sys.modules[name] = None\n"
        "import ralu.runtime, ralu.runtime.flux, ralu.runtime.cli\n"
        "from ralu.runtime import RALUFluxPipeline\n"
        f"print(sorted(m for m, mod in sys.modules.items() if m.split('.')[0] in {HEAVY!r} and mod is not None))"
    )
    assert loaded == "[]"


def test_runtime_adds_no_calibration_import_beyond_diffusers():
    # transformers itself imports scipy when it is installed (its object-detection losses);
    # nothing beyond what `from diffusers import FluxPipeline` loads may come from ralu.
    loaded = _run(
        "import sys\nfrom diffusers import FluxPipeline\n"
        f"before = {{m for m in sys.modules if m.split('.')[0] in {HEAVY!r}}}\n"
        "import ralu.runtime, ralu.runtime.flux, ralu.runtime.cli\n"
        f"print(sorted({{m for m in sys.modules if m.split('.')[0] in {HEAVY!r}}} - before))"
    )
    assert loaded == "[]"
