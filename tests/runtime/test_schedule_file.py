"""The schedule file contract: round trip, schema, and every rejection with a useful error."""

import json
import os

import pytest
from schedule_factory import schedule_dict

from ralu.runtime import schedule as schedule_module
from ralu.runtime.schedule import (
    ScheduleError,
    load_schedule,
    save_schedule,
    schedule_from_dict,
    schedule_json_schema,
    stage_sigmas,
    transition,
)


def write(tmp_path, data, name="s.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_round_trip(tmp_path):
    original = schedule_from_dict(schedule_dict())
    path = save_schedule(original, tmp_path / "sub" / "flux.json")
    loaded = load_schedule(path)
    assert loaded == original
    assert load_schedule(loaded) is loaded
    assert loaded.family == "flux" and loaded.total_steps == 10
    assert [p.name for p in path.parent.iterdir()] == ["flux.json"]


def test_shipped_schema_is_current():
    shipped = json.loads((schedule_module.resources.files("ralu.schedules") / "schema.json").read_text())
    assert shipped == schedule_json_schema()


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda d: d.update(version=2), "version", "this ralu reads version 1"),
        (lambda d: d.pop("c"), "c", "Field required"),
        (lambda d: d.update(colour="red"), "colour", "remove it"),
        (lambda d: d["stages"][1].pop("shift"), "stages.1.shift", "add the field"),
        (lambda d: d["stages"][0].update(extra=1), "stages.0.extra", "remove it"),
        (lambda d: d["stages"][1].update(end=0.1), "stages.1.end", "strictly increasing"),
        (lambda d: d["stages"][2].update(end=0.9), "stages.2.end", "must be 1.0"),
        (lambda d: d["stages"][1].update(start=0.05), "stages.1.start", "inconsistent with c"),
        (lambda d: d["stages"][0].update(start=0.01), "stages.0.start", "pure noise"),
        (lambda d: d.update(c=0.3), "c=0.3", "(0, 1/4]"),
        (lambda d: d.update(c=0.0), "c=0.0", "(0, 1/4]"),
        (lambda d: d["stages"][0].update(steps=0), "stages.0.steps", "greater than or equal to 1"),
        (lambda d: d.update(model="sdxl"), "model 'sdxl'", "use one of"),
        (lambda d: d.update(height=1000), "height=1000", "multiple of 32"),
        (lambda d: d["transitions"][0].update(start=0.5), "transitions.0.start", "inconsistent"),
    ],
)
def test_rejections_name_field_and_fix(tmp_path, mutate, field, words):
    data = schedule_dict()
    mutate(data)
    with pytest.raises(ScheduleError) as caught:
        load_schedule(write(tmp_path, data))
    message = str(caught.value)
    assert field in message, message
    assert words in message, message
    assert "Fix:" in message, message


def test_provenance_fields_are_optional_and_round_trip(tmp_path):
    data = schedule_dict()
    assert not {"command", "objective", "progress_model"} & set(data["calibration"])  # a file from before the fields
    old = load_schedule(write(tmp_path, data))
    assert (old.calibration.command, old.calibration.objective, old.calibration.progress_model) == (None, None, None)
    data["calibration"].update(command="ralu-calibrate --model flux-dev --speedup 7", objective="progress", progress_model="fit-0123456789ab")
    written = load_schedule(save_schedule(schedule_from_dict(data), tmp_path / "new.json"))
    assert written.calibration.command == "ralu-calibrate --model flux-dev --speedup 7" and written.calibration.progress_model == "fit-0123456789ab"
    with pytest.raises(ScheduleError, match="calibration.objective"):
        load_schedule(write(tmp_path, {**data, "calibration": {**data["calibration"], "objective": 3}}))


def test_c_boundary_quarter_is_valid():
    schedule_from_dict(schedule_dict(c=0.25))


def test_truncated_and_non_json_files(tmp_path):
    text = json.dumps(schedule_dict())
    with pytest.raises(ScheduleError, match="not valid JSON.*truncated"):
        load_schedule(write(tmp_path, text[: len(text) // 2]))
    with pytest.raises(ScheduleError, match="not valid JSON"):
        load_schedule(write(tmp_path, "version: 1\n", "yaml.json"))
    with pytest.raises(ScheduleError, match="not a JSON object"):
        load_schedule(write(tmp_path, "[1, 2]", "list.json"))


def test_unknown_name_lists_shipped(tmp_path):
    with pytest.raises(ScheduleError, match="no shipped schedule of that name"):
        load_schedule("flux-dev-99x")


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    good = schedule_from_dict(schedule_dict())
    save_schedule(good, path)
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_schedule(schedule_from_dict(schedule_dict(c=0.01)), path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_transition_matches_mean_and_covariance():
    # x_s = a Up(x_e) + b z must have signal s and, per element, noise variance (1 - s)^2:
    # a^2 (1 - e)^2 (all-ones block) + b^2 (I - cJ)  =>  a (1 - e) = b sqrt(c), b = 1 - s.
    for end, c in [(0.2, 0.0255), (0.45, 0.0177), (0.3, 0.25)]:
        t = transition(end, c)
        assert t.signal_scale * end == pytest.approx(t.start, rel=1e-12)
        assert t.noise_scale == pytest.approx(1 - t.start, rel=1e-12)
        assert t.signal_scale * (1 - end) == pytest.approx(t.noise_scale * c**0.5, rel=1e-12)


def test_single_full_stage_sigmas_equal_flux_grid():
    import numpy as np

    from ralu.runtime.models import get_model

    steps, h = 8, get_model("flux-dev").base_shift(1024, 1024)
    sigmas = stage_sigmas(steps, 0.0, 1.0, h)
    base = np.linspace(1.0, 1.0 / steps, steps)
    expected = np.append(h * base / (1 + (h - 1) * base), 0.0)
    np.testing.assert_allclose(sigmas, expected, rtol=0, atol=1e-15)


def test_load_accepts_dicts_and_explains_a_missing_schedule():
    assert load_schedule(schedule_dict()).model == "flux-dev"
    with pytest.raises(ScheduleError, match="a schedule is required"):
        load_schedule(None)
