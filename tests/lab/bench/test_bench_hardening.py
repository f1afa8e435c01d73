"""Issue 26, items 6 and 7: ralu-bench refuses, in one line and before its runner is imported
(so before any measurement), the arguments that could only fail, and a seeded fuzz of 600
argument vectors over the four subcommands with a stub runner that writes the report files."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import types

import cli_checks
import pytest
from cli_checks import run_main

from ralu.runtime.schedule import load_schedule, save_schedule
from ralu_lab.bench import cli as bench_cli
from ralu_lab.bench.common import write_report


@pytest.fixture
def stub_runner(monkeypatch):
    """Every subcommand's runner replaced by one that records its call and writes the report
    files as the real ones do (write_report: JSON without NaN or infinity; --out: a schedule)."""
    calls = []

    def run_from_args(args):
        calls.append(args)
        numbers = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, list)) and not isinstance(value, bool)}
        if getattr(args, "out", None) is not None:
            save_schedule(load_schedule("flux-dev-7x"), args.out)
        else:
            write_report(args.out_dir, args.command, "# report\n", numbers)
        return 0

    module = types.ModuleType("ralu_bench_stub_runner")
    module.run_from_args = run_from_args
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for name, sub in list(bench_cli.SUBCOMMANDS.items()):
        monkeypatch.setitem(bench_cli.SUBCOMMANDS, name, sub._replace(runner=module.__name__))
    return calls


@pytest.mark.parametrize(
    "argv, words",
    [
        (["quality", "--trials", "0"], ["--trials 0", "at least 1"]),
        (["quality", "--batch-size", "0"], ["--batch-size 0"]),
        (["speed", "--threads", "-1"], ["--threads -1"]),
        (["quality", "--z-values", "0"], ["--z-values 0.0", "Z >= 2"]),
        (["quality", "--z-values", "1"], ["--z-values 1.0"]),
        (["quality", "--z-values", "nan"], ["--z-values nan"]),
        (["quality", "--seeds", "-1"], ["--seeds -1"]),
        (["quality", "--sweep-seeds", "-1"], ["--sweep-seeds -1"]),
        (["speed", "--out-dir", "{afile}"], ["--out-dir", "is a file"]),
        (["quality", "--out-dir", "{afile}"], ["--out-dir", "is a file"]),
        (["cache", "--out-dir", "{afile}"], ["--out-dir", "is a file"]),
        (["cache", "--out-dir", "{afile}/reports"], ["is not a folder but a file"]),
        (["magcache", "--schedule", "flux-dev-7x", "--out", "{afile}/x.json"], ["--out", "is not a folder"]),
        (["magcache", "--schedule", "flux-dev-7x", "--out", "."], ["--out", "is a folder"]),
        (["magcache", "--schedule", "flux-dev-7x", "--out", "{fifo}"], ["--out", "FIFO"]),
        (["magcache", "--schedule", "flux-dev-7x", "--out", "x.json", "--threshold", "nan"], ["--threshold nan"]),
        (["cache", "--seed", "-1"], ["--seed -1"]),
    ],
)
def test_arguments_that_can_only_fail_are_refused_before_the_run(tmp_path, capsys, monkeypatch, stub_runner, argv, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    argv = [arg.format(afile=tmp_path / "afile", fifo=tmp_path / "fifo") for arg in argv]
    code, _, err = run_main(bench_cli.main, argv, capsys)
    cli_checks.assert_one_line_error(f"ralu-bench {argv[0]}", code, err, *words)
    assert stub_runner == []  # the runner never started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "fifo"]


def test_a_write_failing_after_the_run_is_one_line(tmp_path, capsys, monkeypatch, stub_runner):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_main(bench_cli.main, ["cache", "--out-dir", tmp_path / "r"], capsys)
    cli_checks.assert_one_line_error("ralu-bench cache", code, err, "No space left on device")


def random_argv(rng: random.Random, folder) -> list[str]:
    ints = ["1", "2", "3", "0", "-1", "1.5", "x", str(2**63)]
    floats = ["2", "2.5", "8", "90", "1e4", "0", "1", "-3", "nan", "inf", "1e308", "x"]
    outs = [folder / "r", folder / "r", folder, folder / "afile", folder / "afile" / "r", folder / "fifo", folder / "link", folder / ("o" * 300)]
    command = rng.choice(["speed", "quality", "magcache", "cache"])
    argv = [command]
    if command == "speed":
        options = {"--repeats": ints, "--threads": ints, "--device": ["cpu", "gpu"], "--dtype": ["float32", "float64"], "--quick": None, "--out-dir": outs}
    elif command == "quality":
        options = {"--trials": ints, "--batch-size": ints, "--images": ints, "--seeds": ints, "--sweep-seeds": ints, "--z-values": floats,
                   "--threads": ints, "--real-images": ints, "--budgets": ints, "--testbed": ["v1", "v2", "v3"], "--out-dir": outs, "--work-dir": outs}
    elif command == "magcache":
        argv += ["--schedule", rng.choice(["flux-dev-7x", "nothing"])]
        options = {"--images": ints, "--seed": ints, "--threshold": floats + ["0.06", "1"], "--out": [folder / "m.json", *outs[2:]]}
    else:
        options = {"--images": ints, "--seed": ints, "--schedules": ["flux-dev-4x", "x"], "--out-dir": outs}
    for option, pool in options.items():
        if rng.random() < 0.35 or (option == "--out" and rng.random() < 0.95):
            argv += [option] if pool is None else [option] + [str(rng.choice(pool)) for _ in range(rng.choice([1, 1, 1, 2]))]
    if rng.random() < 0.03:
        argv.insert(rng.randrange(len(argv) + 1), rng.choice(["--nope", "-x", "--"]))
    return argv


def test_fuzz_bench_arguments(tmp_path, capsys, monkeypatch, stub_runner):
    """600 seeded argument vectors: each a one-line refusal, argparse's usage error, or a run
    of the stub runner; no traceback, no non-finite number in a report, no FIFO or link
    replaced (nor the file a link points to written through)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")  # a regular file: --out may name it (and replace it)
    (tmp_path / "target").write_text("keep")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    rng = random.Random(2627)
    codes = {}
    for case in range(600):
        argv = random_argv(rng, tmp_path)
        code, _, err = run_main(bench_cli.main, argv, capsys)
        codes[code] = codes.get(code, 0) + 1
        assert code in (0, 2) and "Traceback" not in err, (case, argv, err)
        if code == 2 and "usage:" not in err:
            assert len(err.strip().splitlines()) == 1 and "error:" in err, (case, argv, err)
        assert (tmp_path / "target").read_text() == "keep" and (tmp_path / "link").is_symlink()
        assert os.path.exists(tmp_path / "fifo") and not os.path.isfile(tmp_path / "fifo")
    for report in tmp_path.rglob("*.json"):
        text = report.read_text()
        assert "NaN" not in text and "Infinity" not in text, report
        assert all(math.isfinite(v) for v in _numbers(json.loads(text))), report
    assert codes.get(0, 0) >= 50 and codes.get(2, 0) >= 100, codes


def _numbers(data):
    if isinstance(data, dict):
        for value in data.values():
            yield from _numbers(value)
    elif isinstance(data, list):
        for value in data:
            yield from _numbers(value)
    elif isinstance(data, float):
        yield data
