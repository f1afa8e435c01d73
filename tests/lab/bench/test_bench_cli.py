"""``ralu-bench``: the parser and ``--help`` load no benchmark code (no torch, no diffusers);
a subcommand's modules are imported only when it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

#: ralu.calibrate itself imports optuna and scipy (the calibration API), so only these are checked.
HEAVY = ("torch", "diffusers", "matplotlib")

#: Runs ``ralu-bench ARGS`` in-process as the console script does, then prints which heavy
#: modules got imported.
PROBE = """
import json, sys
from ralu_lab.bench.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    code = done.code
else:
    code = None
print(json.dumps({"exit": code, "loaded": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def probe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [("--help",), ("speed", "--help"), ("quality", "--help")])
def test_help_imports_no_heavy_module(args):
    result = probe(*args)
    assert result["exit"] == 0
    assert result["loaded"] == [], f"ralu-bench {' '.join(args)} imported {result['loaded']}"


def test_every_subcommand_is_listed_and_runs_from_its_own_module():
    from ralu_lab.bench import cli

    parser = cli.build_parser()
    required = {"magcache": ["--schedule", "flux-dev-4x", "--out", "x.json"]}  # arguments without defaults
    for name, sub in cli.SUBCOMMANDS.items():
        assert parser.parse_args([name, *required.get(name, [])]).command == name
        assert sub.runner.startswith(sub.package + ".") and sub.arguments.startswith(sub.package + ".")
