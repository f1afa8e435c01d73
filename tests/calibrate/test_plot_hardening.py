"""ralu-plot on files that are not schedules, odd schedules and unwritable outputs: a PNG or
exit 2 with one line, never a traceback or a leftover temporary file."""

from __future__ import annotations

import json
import os
import stat
from datetime import timedelta

import cli_checks
import pytest
from cli_checks import run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ralu.calibrate import plot
from ralu.runtime.schedule import stage_starts, transition

PNG = b"\x89PNG\r\n\x1a\n"


def run(argv, capsys):
    return run_main(plot.main, argv, capsys)


def assert_one_line_error(code, err, *words):
    cli_checks.assert_one_line_error("ralu-plot", code, err, *words)


def schedule_with(steps, ends, c=0.01, shift=3.0) -> dict:
    """A valid schedule dictionary of any number of stages."""
    starts = stage_starts(list(ends), c)
    return {
        "version": 1, "model": "flux-dev", "height": 1024, "width": 1024, "base_steps": 50,
        "stages": [{"steps": n, "start": s, "end": e, "shift": shift} for n, s, e in zip(steps, starts, ends)],
        "c": c, "up_ratio": 0.1,
        "divergence": {"js_distance": 0.03, "js_divergence": 0.0009, "objective": "continuous"},
        "flops_speedup": {"total": 6.0, "linear": 7.0},
        "transitions": [transition(e, c, k + 1).model_dump() for k, e in enumerate(ends[:-1])],
        "calibration": {
            "optimizer": "paper", "layout": "given", "target_speedup": None, "flops_convention": "linear", "seed": 0,
            "h0": 3.0, "grid": 1000, "z_bounds": [10.0, 10.0], "tool_version": "test", "created": "2026-01-01T00:00:00+00:00",
        },
    }


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_binary_file(tmp_path, capsys):
    source = tmp_path / "s.json"
    source.write_bytes(bytes(range(256)) * 8)
    code, _, err = run([source, "-o", tmp_path / "s.png"], capsys)
    assert_one_line_error(code, err, "is not UTF-8 text")
    assert not (tmp_path / "s.png").exists()


def test_deeply_nested_json(tmp_path, capsys):
    source = tmp_path / "s.json"
    source.write_text("[" * 200_000 + "]" * 200_000)
    code, _, err = run([source, "-o", tmp_path / "s.png"], capsys)
    assert_one_line_error(code, err, "nested too deeply")


def test_invalid_schedule_error_is_one_line(tmp_path, capsys):
    source = tmp_path / "s.json"
    data = schedule_with([2, 3, 5], [0.2, 0.3, 1.0])
    del data["c"], data["up_ratio"]
    source.write_text(json.dumps(data))
    code, _, err = run([source, "-o", tmp_path / "s.png"], capsys)
    assert_one_line_error(code, err, "field 'c'", "field 'up_ratio'")


def test_twenty_stage_schedule(tmp_path, capsys):
    ends = [round(0.05 * (k + 1), 2) for k in range(20)]
    source, out = tmp_path / "s.json", tmp_path / "s.png"
    source.write_text(json.dumps(schedule_with([1] * 20, ends, c=0.2)))
    code, stdout, err = run([source, "-o", out], capsys)
    if code == 0:  # the loader may refuse stage counts the runtime cannot run; then it says so
        assert out.read_bytes()[:8] == PNG and f"wrote {out}" in stdout
    else:
        assert_one_line_error(code, err, "stage")
    assert leftovers(tmp_path) == []


def test_schedule_with_too_many_steps_to_draw(tmp_path, capsys):
    source = tmp_path / "s.json"
    source.write_text(json.dumps(schedule_with([2, 3, 100_000_000], [0.2, 0.3, 1.0])))
    code, _, err = run([source, "-o", tmp_path / "s.png"], capsys)
    assert_one_line_error(code, err, "less than or equal to 1000")


@pytest.mark.parametrize("target", ["folder", "proc", "under_a_file"])
def test_unwritable_output(tmp_path, capsys, target):
    out = {"folder": tmp_path, "proc": "/proc/self/s.png", "under_a_file": tmp_path / "file" / "s.png"}[target]
    (tmp_path / "file").write_text("x")
    code, _, err = run(["flux-dev-7x", "-o", out], capsys)
    assert_one_line_error(code, err, "-o")
    assert leftovers(tmp_path) == []


def test_write_failure_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    def full_disk(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # fails after the temporary file was written
    code, _, err = run(["flux-dev-7x", "-o", tmp_path / "s.png"], capsys)
    monkeypatch.undo()
    assert_one_line_error(code, err, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_png_gets_normal_mode(tmp_path, capsys):
    out = tmp_path / "s.png"
    out.write_bytes(b"old")
    out.chmod(0o644)
    assert run(["flux-dev-7x", "-o", out], capsys)[0] == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 and out.read_bytes()[:8] == PNG


def test_usage_errors_are_one_line(capsys):
    code, _, err = run(["flux-dev-7x"], capsys)
    assert_one_line_error(code, err, "-o/--out")


SOURCES = st.sampled_from(["flux-dev-7x", "sd3-medium-3x-searched", "schema", "nothing", "../x", "", "{tmp}", "{tmp}/s.json", "{tmp}/text.json", "{tmp}/list.json"])
OUTPUTS = st.sampled_from(["{tmp}/o.png", "{tmp}", "{tmp}/new/o.png", "/proc/self/o.png", "{tmp}/s.json/o.png", "{tmp}/o"])


@settings(max_examples=25, deadline=timedelta(seconds=30), derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(source=SOURCES, out=OUTPUTS, extra=st.lists(st.sampled_from(["-o", "--out", "-x", "--help-me"]), max_size=1))
def test_fuzz_plot_arguments(tmp_path_factory, capsys, source, out, extra):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "s.json").write_text(json.dumps(schedule_with([2, 3, 5], [0.2, 0.3, 1.0])))
    (folder / "text.json").write_text("not json {")
    (folder / "list.json").write_text("[1, 2]")
    out = out.format(tmp=folder)
    code, stdout, err = run([source.format(tmp=folder), "-o", out, *extra], capsys)
    assert "Traceback" not in err
    if code == 0:
        with open(out, "rb") as written:
            assert written.read(8) == PNG
        assert stdout.strip() == f"wrote {out}"
    else:
        assert_one_line_error(code, err)
    assert leftovers(folder) == []
