"""--min-signal: no calibrated transition keeps less than A of the signal (a = s/e), the
bound is exact and binding for every objective, 0 restores the unbounded search, and the
published method is untouched."""

import json
import math

import numpy as np
import optuna
import pytest

from ralu.calibrate import cli
from ralu.calibrate.calibration import calibrate
from ralu.calibrate.quality_search import _suggest
from ralu.calibrate.search import MIN_SIGNAL, NTDMObjective, SignalUnreachable, StageLayout, z_ceiling
from ralu.runtime.schedule import ScheduleError, kept_signal, largest_z, load_schedule, save_schedule, transition

NOTE = "most of the earlier stages' work is discarded"


def run(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as stop:  # argparse errors
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("end", [0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.95])
@pytest.mark.parametrize("signal", [0.02, 0.1, 0.3, 0.45])
def test_largest_z_is_the_exact_inverse_of_the_kept_signal(end, signal):
    z = largest_z(end, signal)
    assert kept_signal(end, 1.0 / z**2) >= signal  # holds in the file's own arithmetic
    assert kept_signal(end, 1.0 / (z * (1 + 1e-9)) ** 2) < signal  # and is tight
    assert z == pytest.approx((1 / signal - end) / (1 - end), rel=1e-12)
    # One notion: the factor on the upsampled latent is s / e, so "restarts below A e" is "keeps less than A".
    t = transition(end, 1.0 / z**2)
    assert t.signal_scale == kept_signal(end, 1.0 / z**2)
    assert t.start == pytest.approx(t.signal_scale * end, rel=1e-12)


def test_no_bound_without_a_minimum_and_the_first_transition_binds():
    assert largest_z(0.3, 0.0) == math.inf and z_ceiling((0.3, 0.45, 1.0), 0.0) == math.inf
    assert z_ceiling((1.0,), 0.5) == math.inf  # one stage, no transition
    assert z_ceiling((0.2, 0.3, 1.0), 0.1) == largest_z(0.2, 0.1) < largest_z(0.3, 0.1)


def test_the_bound_caps_z_in_the_searched_box_only():
    layout = StageLayout((2, 3, 5), (0.2, 0.3, 1.0))
    free, bounded = NTDMObjective(layout, 3.0), NTDMObjective(layout, 3.0, min_signal=0.1)
    assert free.bounds() == NTDMObjective(layout, 3.0, min_signal=0.0).bounds()
    assert free.bounds()[-1] == (2.0, 100.0) and bounded.bounds()[-1] == (2.0, largest_z(0.2, 0.1))
    params = np.array([[5.0, 2.8, 2.2, 50.0]])
    assert bounded.distance(params) == free.distance(params)  # same objective, smaller box
    with pytest.raises(SignalUnreachable, match="Fix: a lower --min-signal"):
        NTDMObjective(layout, 3.0, z_bounds=(20.0, 100.0), min_signal=0.1)


@pytest.mark.parametrize("objective", ["continuous", "discrete", "progress"])
def test_every_objective_keeps_the_signal_asked_for(objective):
    # A bound above what the unbounded search keeps must bind, whatever the objective.
    steps, ends = [3, 4, 8], [0.25, 0.4, 1.0]
    free = calibrate("flux", steps=steps, ends=ends, objective=objective, min_signal=0)
    kept = min(t.signal_scale for t in free.transitions)
    ask = (kept + 1 / (2 - ends[0])) / 2  # between it and what Z = 2 keeps
    bounded = calibrate("flux", steps=steps, ends=ends, objective=objective, min_signal=ask)
    assert min(t.signal_scale for t in bounded.transitions) >= ask > kept
    assert bounded.calibration.min_signal == ask and free.calibration.min_signal == 0.0


MAIN_JOBS = [("flux", 7), ("flux", 4), ("sd3", 2), ("sd3", 3)]


@pytest.mark.parametrize("model, speedup", MAIN_JOBS, ids=[f"{m}-{s}x" for m, s in MAIN_JOBS])
@pytest.mark.slow
def test_the_main_job_never_discards_a_stages_work(model, speedup, tmp_path, capsys):
    out = tmp_path / "s.json"
    code, stdout, _ = run(["--model", model, "--speedup", speedup, "--out", out, "--quiet"], capsys)
    assert code == 0
    schedule = load_schedule(out)
    assert len(schedule.transitions) == 2
    assert all(t.signal_scale >= MIN_SIGNAL for t in schedule.transitions)
    assert NOTE not in stdout and schedule.calibration.min_signal == MIN_SIGNAL
    assert schedule.flops_speedup.linear >= speedup


@pytest.mark.slow
def test_min_signal_zero_leaves_z_unbounded(tmp_path, capsys, monkeypatch):
    # A = 0 searches the whole of --z-bounds: the continuous objective, nearly flat in Z, then
    # drifts far above the cap A = 0.1 would set, and the CLI notes every transition that keeps
    # almost nothing.  (The recorded layout of the search before --min-signal is gone with that
    # search: the layout search draws budget-filling layouts since issue 28.)
    monkeypatch.setattr("ralu.calibrate.calibration.published_layouts", lambda model: ())
    out = tmp_path / "s.json"
    code, stdout, _ = run(["--model", "flux", "--speedup", 7, "--objective", "continuous", "--min-signal", 0, "--out", out, "--quiet"], capsys)
    assert code == 0
    schedule = load_schedule(out)
    assert schedule.z > 4 * largest_z(schedule.stages[0].end, MIN_SIGNAL)
    assert all(t.signal_scale < MIN_SIGNAL / 2 for t in schedule.transitions)
    assert stdout.count(NOTE) == 2 and schedule.calibration.min_signal == 0.0


def test_the_published_method_stays_unbounded_unless_asked():
    # (3, 4, 8) / (0.25, 0.4): the published optimiser runs to Z = 66.8 (tests/calibrate/test_search.py).
    layout = dict(steps=[3, 4, 8], ends=[0.25, 0.4, 1.0], h0=3.0, optimizer="paper")
    paper = calibrate("flux", **layout)
    assert paper.calibration.min_signal == 0.0 and paper.z > largest_z(0.25, MIN_SIGNAL)
    assert paper.c == calibrate("flux", **layout, min_signal=0).c
    assert min(t.signal_scale for t in calibrate("flux", **layout, min_signal=MIN_SIGNAL).transitions) >= MIN_SIGNAL


@pytest.mark.parametrize("value", ["-0.1", "1", "1.5", "nan", "inf"])
def test_bad_values_are_one_line_errors(value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["--model", "flux", "--steps", 2, 3, 5, "--ends", 0.2, 0.3, 1.0, "--min-signal", value, "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "min_signal" in err and "Fix:" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [-0.1, 1.0, math.nan, math.inf, "0.1", True, 10**400])
def test_bad_values_are_value_errors_in_the_api(value):
    with pytest.raises(ValueError, match="min_signal"):
        calibrate("flux", steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], min_signal=value)


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", 2, 3, 5, "--ends", 0.2, 0.3, 1.0, "--z-bounds", 20, 100],  # the cap at e1 = 0.2 is 12.25
        ["--speedup", 7, "--z-bounds", 20, 100],  # even e1 = 0.5 caps Z at 19
        ["--speedup", 7, "--min-signal", 0.9],  # Z = 2 keeps at most 1 / (2 - e1)
    ],
)
def test_an_unreachable_signal_names_the_fix(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["--model", "flux", *argv, "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Fix: a lower --min-signal" in err
    assert list(tmp_path.iterdir()) == []


def test_files_record_the_bound_and_are_checked_against_it(tmp_path):
    schedule = calibrate("flux", steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], z_bounds=(30, 30), min_signal=0)
    data = schedule.model_dump()
    del data["calibration"]["min_signal"]  # a file from before the option
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    assert load_schedule(path).calibration.min_signal == 0.0
    data["calibration"]["min_signal"] = 0.1  # a claim the transitions (a = 0.04) break
    with pytest.raises(ScheduleError, match="min_signal"):
        save_schedule(data, tmp_path / "claims.json")


def test_quality_search_draws_z_below_the_cap():
    from ralu.calibrate.budget import apportion

    def fill(weights, up_ratio):
        return apportion(8, weights)

    def drawn(min_signal):
        found = []

        def objective(trial):
            found.append(_suggest(trial, 3.0, fill, min_signal))
            return 0.0

        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        study.optimize(objective, n_trials=120)
        return [c for c in found if len(c.steps) > 1]

    def kept(candidate):
        return min(kept_signal(e, 1.0 / candidate.z**2) for e in candidate.ends[:-1])

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    assert min(kept(c) for c in drawn(0.0)) < MIN_SIGNAL  # the bound binds
    assert min(kept(c) for c in drawn(MIN_SIGNAL)) >= MIN_SIGNAL


def test_quality_objective_checks_the_value_before_loading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "flux", "--objective", "quality", "--pipeline", "testbed", "--prompts", tmp_path / "none.txt", "--speedup", 4, "--min-signal", 2]
    code, _, err = run(argv + ["--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "min_signal=2.0 must be a number in [0, 1)" in err


def test_the_main_jobs_objective_is_progress_for_a_searched_layout_and_continuous_otherwise(tmp_path, capsys):
    """The defaults chosen on testbed v2 (calibrate.search.default_objective)."""
    from ralu.calibrate.search import default_objective

    assert default_objective(True, "global") == "progress"
    assert default_objective(False, "global") == default_objective(True, "paper") == "continuous"
    out = tmp_path / "s.json"
    assert run(["--model", "flux", "--steps", 2, 3, 5, "--ends", 0.2, 0.3, 1.0, "--up-ratio", 0.1, "--out", out, "--quiet"], capsys)[0] == 0
    assert load_schedule(out).calibration.optimizer == "global"  # the continuous objective records no objective name
    assert run(["--model", "flux", "--speedup", 7, "--trials", 4, "--out", out, "--quiet"], capsys)[0] == 0
    assert load_schedule(out).calibration.optimizer == "global, progress objective"
