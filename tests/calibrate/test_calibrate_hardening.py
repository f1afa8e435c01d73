"""ralu-calibrate and calibrate() on bad, extreme and hostile input: one-line errors (exit 2),
never a traceback, a NaN, a file the loader rejects or a half-written file; shared studies
with several (and dying) workers."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import cli_checks
import optuna
import pytest
from cli_checks import run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ralu.calibrate import cli
from ralu.calibrate.calibration import calibrate
from ralu.calibrate.study import LAYOUT_ATTR, SAME_AS_ATTR, open_storage
from ralu.runtime.schedule import BASE_SHIFT_RANGE, load_schedule, write_text_atomic

#: A given layout with the paper's local optimiser: the fastest complete calibration.
FAST = ["--model", "flux", "--steps", 2, 3, 5, "--ends", 0.2, 0.3, 1.0, "--optimizer", "paper", "--quiet"]
#: The smallest search: SD3 at 3x, one trial, local optimiser.
SEARCH = ["--model", "sd3", "--speedup", 3, "--optimizer", "paper", "--quiet"]


def run(argv, capsys):
    return run_main(cli.main, argv, capsys)


def assert_one_line_error(code, err, *words):
    cli_checks.assert_one_line_error("ralu-calibrate", code, err, *words)


def assert_valid_file(path: Path):
    schedule = load_schedule(path)  # the loader accepts what the tool wrote
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and "null" not in text.replace('"target_speedup": null', "").replace('"seed": null', "")
    assert all(math.isfinite(v) for v in (schedule.c, schedule.divergence.js_distance, *schedule.calibration.z_bounds))
    assert schedule.divergence.js_distance > 0
    return schedule


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------
# Issue 2: writes what its own loader rejects; NaN divergence reported as 0; unplannable steps
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--z-bounds", 2, "inf"], ["z_bounds=inf", "finite"]),
        (["--h0", "inf"], ["h0=inf", "finite"]),
        (["--height", 8192, "--width", 8192], ["height=8192", "between 1 and 4096"]),
        (["--h0", 1e308], ["--h0 1e+308 is outside"]),
        (["--h0", 1e-300], ["--h0 1e-300 is outside"]),
        (["--steps", 2, 3, 100000000, "--ends", 0.2, 0.3, 1.0], ["steps=100000000 must be between 1 and 1000"]),
        (["--steps", 1, 1, 1, 1, "--ends", 0.1, 0.2, 0.3, 1.0], ["4 stages", "1 to 3"]),
    ],
)
def test_inputs_that_wrote_bad_files_are_refused(tmp_path, capsys, extra, words):
    out = tmp_path / "s.json"
    code, _, err = run(FAST + extra + ["--out", out], capsys)
    assert_one_line_error(code, err, *words)
    assert files_in(tmp_path) == []


def test_h0_near_the_limits_still_gives_a_finite_nonzero_divergence(tmp_path, capsys):
    for h0 in BASE_SHIFT_RANGE:
        out = tmp_path / f"{h0}.json"
        code, _, err = run(FAST + ["--h0", h0, "--out", out], capsys)
        assert code == 0, err
        assert 0 < assert_valid_file(out).divergence.js_distance < 1


# ----------------------------------------------------------------------------------------
# Issue 3: tracebacks instead of one-line errors
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--height", 1000000000], ["height=1000000000 must be between 1 and 4096"]),
        (["--z-bounds", 1e200, 1e200], ["Z bounds", "<= 10000"]),
        (["--speedup", "nan"], ["speedup=nan", "finite"]),
        (["--h0", "nan"], ["h0=nan", "finite"]),
        (["--base-steps", 0], ["base_steps=0 must be between 1 and 1000"]),
        (["--steps", "2.5", 3, 5], ["invalid int value: '2.5'"]),
        (["--seed", -1], ["seed=-1"]),
        (["--storage", "x.log", "--study-name", "s"], ["storage and study_name belong to the layout search"]),
    ],
)
def test_bad_values_get_one_line_errors(tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(FAST + extra, capsys)
    assert_one_line_error(code, err, *words)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    "storage, words",
    [
        ("notaurl", ["neither a journal file nor a database URL"]),
        ("{tmp}/missing/study.log", ["does not exist"]),
        ("sqlite:///{tmp}/missing/study.db", ["does not exist"]),
        ("{tmp}", ["neither a journal file nor a database URL"]),
        ("nosuchdialect://host/db", ["neither a journal file nor a database URL"]),
        ("postgresql://nobody@127.0.0.1:9/none", ["cannot open storage"]),
    ],
)
def test_bad_storage_gets_one_line_error(tmp_path, capsys, storage, words):
    storage = storage.format(tmp=tmp_path)
    code, _, err = run(SEARCH + ["--trials", 1, "--storage", storage, "--study-name", "s", "--out", tmp_path / "s.json"], capsys)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "s.json").exists()


def test_out_pointing_at_a_folder_fails_before_calibrating(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("calibrated although the output cannot be written")

    monkeypatch.setattr("ralu.calibrate.calibration.optimise", never)
    code, _, err = run(FAST + ["--out", tmp_path], capsys)
    assert_one_line_error(code, err, "is a folder")
    code, _, err = run(FAST + ["--out", tmp_path / "s.json", "--plot", tmp_path], capsys)
    assert_one_line_error(code, err, "--plot", "is a folder")


def test_out_in_an_unwritable_folder_fails_before_calibrating(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("calibrated although the output cannot be written")

    monkeypatch.setattr("ralu.calibrate.calibration.optimise", never)
    # /proc/self accepts no new files, whoever runs the test (a chmod-ed folder does not stop root).
    code, _, err = run(FAST + ["--out", "/proc/self/s.json"], capsys)
    assert_one_line_error(code, err, "cannot create files in /proc/self")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(FAST + ["--out", blocker / "s.json"], capsys)
    assert_one_line_error(code, err, "is not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_fails_before_calibrating(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run(FAST + ["--out", locked / "s.json"], capsys)
    finally:
        locked.chmod(0o755)
    assert_one_line_error(code, err, "cannot create files in")


def test_out_in_a_missing_folder_is_created(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "s.json"
    code, _, err = run(FAST + ["--out", out], capsys)
    assert code == 0, err
    assert_valid_file(out)


def test_plot_failing_after_out_is_written_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    def broken(schedule, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ralu.calibrate.plot.plot_schedule", broken)
    out = tmp_path / "s.json"
    code, _, err = run(FAST + ["--out", out, "--plot", tmp_path / "s.png"], capsys)
    assert_one_line_error(code, err, f"written to {out}", "plot failed", "ralu-plot")
    assert_valid_file(out)
    assert files_in(tmp_path) == ["s.json"]


def test_argparse_errors_are_one_line(capsys):
    code, _, err = run(["--model", "sdxl", "--speedup", 3], capsys)
    assert_one_line_error(code, err, "invalid choice: 'sdxl'")


# ----------------------------------------------------------------------------------------
# Issue 6: file modes, --base-steps 0, NaN speed-up, the Python API
# ----------------------------------------------------------------------------------------


def test_atomic_writes_keep_normal_file_modes(tmp_path):
    old_mask = os.umask(0o022)
    try:
        fresh = write_text_atomic(tmp_path / "fresh.json", "{}")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        kept = tmp_path / "kept.json"
        kept.write_text("old")
        kept.chmod(0o640)
        write_text_atomic(kept, "new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "new"
        os.umask(0o077)
        private = write_text_atomic(tmp_path / "private.json", "{}")
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old_mask)
    assert files_in(tmp_path) == ["fresh.json", "kept.json", "private.json"]  # no temporary left


def test_overwritten_schedule_keeps_0644(tmp_path, capsys):
    out = tmp_path / "s.json"
    out.write_text("{}")
    out.chmod(0o644)
    code, _, err = run(FAST + ["--out", out], capsys)
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(steps=[2.5, 3, 5], ends=[0.2, 0.3, 1.0]), "steps=2.5 must be a whole number"),
        (dict(steps="235", ends=[0.2, 0.3, 1.0]), "must be a list of numbers"),
        (dict(steps=[2, 3, 5], ends="0.2"), "must be a list of numbers"),
        (dict(steps=[True, 3, 5], ends=[0.2, 0.3, 1.0]), "whole number"),
        (dict(steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], z_bounds=(5, 5, 5)), "must be two numbers"),
        (dict(steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], z_bounds=(5, math.inf)), "finite"),
        (dict(steps=[2, 3, 5], ends=[0.2, 0.3, math.nan]), "finite"),
        (dict(steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], base_steps=0), "base_steps=0"),
        (dict(steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], up_ratio=math.nan), "up_ratio=nan"),
        (dict(steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], height=1024.0), "height=1024.0 must be a whole number"),
        (dict(steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], grid=1), "grid=1"),
        (dict(steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], optimizer="adam"), "optimizer='adam' is unknown"),
        (dict(speedup=math.nan), "speedup=nan"),
        (dict(speedup=10**400), "must be a finite number"),
        (dict(speedup=7, trials=0), "trials=0"),
    ],
)
def test_python_api_refuses_what_it_used_to_bend(kwargs, words):
    with pytest.raises(ValueError) as caught:
        calibrate("flux", optimizer=kwargs.pop("optimizer", "paper"), **kwargs)
    assert words in str(caught.value)


def test_python_api_accepts_numpy_and_tuples():
    import numpy as np

    schedule = calibrate("flux", steps=(np.int64(2), 3, 5), ends=np.array([0.2, 0.3, 1.0]), z_bounds=[2, 50], optimizer="paper")
    assert [s.steps for s in schedule.stages] == [2, 3, 5] and schedule.calibration.z_bounds == (2.0, 50.0)


# ----------------------------------------------------------------------------------------
# Issue 5 and 15: several workers on one study, Ctrl-C, killed workers
# ----------------------------------------------------------------------------------------


def load_study(storage: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(storage)))


def evaluations_per_layout(study: optuna.Study) -> Counter:
    """How often each layout was really evaluated (a twin that reused a value does not count)."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert all(LAYOUT_ATTR in t.user_attrs for t in done)
    return Counter(t.user_attrs[LAYOUT_ATTR] for t in done if SAME_AS_ATTR not in t.user_attrs)


def calibrate_command(*argv) -> list[str]:
    return [sys.executable, "-m", "ralu.calibrate.cli", *(str(a) for a in argv)]


def summary_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if not line.strip().startswith("took")]


@pytest.mark.parametrize("backend", ["journal", "sqlite"])
@pytest.mark.slow
def test_two_workers_share_one_study_without_repeating_a_layout(tmp_path, backend):
    storage = str(tmp_path / "study.log") if backend == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    common = SEARCH + ["--trials", 20, "--storage", storage, "--study-name", "joint"]
    workers = [subprocess.Popen(calibrate_command(*common, "--out", tmp_path / f"w{k}.json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr
        assert "Traceback" not in stderr
    study = optuna.load_study(study_name="joint", storage=open_storage(storage))
    states = Counter(t.state for t in study.trials)
    assert states[optuna.trial.TrialState.RUNNING] == 0
    assert 20 <= states[optuna.trial.TrialState.COMPLETE] <= 21  # a worker may finish one trial past the budget
    evaluated = evaluations_per_layout(study)
    assert max(evaluated.values()) == 1, evaluated.most_common(3)
    # Different draws per trial: two workers with one seed do not walk in lockstep.
    assert len(evaluated) >= 10
    # One study, one summary: both report the same trials and write the same schedule.
    met = [next(line for line in stderr.splitlines() if "trials met the target" in line) for _, stderr in outputs]
    # both count the study's first 20 finished trials, even when one worker started a trial
    # past the budget after the other had summarised
    assert met[0] == met[1] and met[0].split()[0].endswith("/20"), met
    assert summary_lines(outputs[0][0])[:-1] == summary_lines(outputs[1][0])[:-1]  # the last line names its own --out
    a, b = (assert_valid_file(tmp_path / f"w{k}.json") for k in range(2))
    assert a.model_dump(exclude={"calibration": {"created"}}) == b.model_dump(exclude={"calibration": {"created"}})


def hear_ctrl_c() -> None:
    """A child's SIGINT as a terminal leaves it: an ignored SIGINT is inherited across exec and
    Python then keeps ignoring it, so a test runner or CI shell that ignores it (an xdist worker
    did) would make the child deaf to the Ctrl-C these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_reports_what_storage_kept_and_a_rerun_resumes(tmp_path):
    storage = tmp_path / "study.log"
    command = calibrate_command(*SEARCH, "--optimizer", "global", "--trials", 200, "--storage", storage, "--study-name", "s", "--out", tmp_path / "s.json")
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=hear_ctrl_c)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (storage.exists() and sum(t.state.is_finished() for t in load_study(storage, "s").trials) >= 2):
        time.sleep(0.2)
    worker.send_signal(signal.SIGINT)
    _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("ralu-calibrate: interrupted; ") and "finished trials are kept in" in last and "rerun the same command to resume" in last
    kept = int(last.split("interrupted; ")[1].split()[0])
    study = load_study(storage, "s")
    assert kept == sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) >= 2
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)  # the running trial was finished and stored
    assert not (tmp_path / "s.json").exists()
    rerun = subprocess.run(calibrate_command(*SEARCH, "--trials", kept + 1, "--storage", storage, "--study-name", "s", "--out", tmp_path / "s.json"), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming study 's' in {storage}: {kept} finished trials" in rerun.stderr
    assert_valid_file(tmp_path / "s.json")


def test_ctrl_c_without_storage_says_nothing_was_kept(capsys, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ralu.calibrate.study.find_twin", interrupted)
    code, _, err = run(SEARCH + ["--trials", 1, "--out", tmp_path / "s.json"], capsys)
    assert code == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("ralu-calibrate: interrupted; nothing was kept")
    assert files_in(tmp_path) == []


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ralu.calibrate import cli, layout_search as layout, study
    study.HEARTBEAT_INTERVAL, study.GRACE_PERIOD = 1, 3
    hang_after, marker = int(sys.argv[1]), Path(sys.argv[2])
    if hang_after:
        real, calls = layout.optimise, []
        def optimise(*args, **kwargs):
            calls.append(1)
            if len(calls) > hang_after:
                marker.write_text("hanging")
                time.sleep(600)
            return real(*args, **kwargs)
        layout.optimise = optimise
    sys.exit(cli.main(sys.argv[3:]))
    """
)


@pytest.mark.slow
def test_a_killed_worker_loses_no_finished_trial_and_the_other_finishes_the_study(tmp_path):
    storage = tmp_path / "study.log"
    common = [*SEARCH, "--trials", 24, "--storage", storage, "--study-name", "joint"]
    marker = tmp_path / "hanging"
    doomed = subprocess.Popen([sys.executable, "-c", WORKER, "3", marker, *map(str, common), "--out", tmp_path / "doomed.json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), doomed.communicate(timeout=5)
    before = {t.number: t.value for t in load_study(storage, "joint").trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(before) >= 3
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate(timeout=30)
    orphan = [t.number for t in load_study(storage, "joint").trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(orphan) == 1  # the trial the killed worker was evaluating
    survivor = subprocess.run([sys.executable, "-c", WORKER, "0", marker, *map(str, common), "--out", tmp_path / "s.json"], capture_output=True, text=True, timeout=300)
    assert survivor.returncode == 0, survivor.stderr
    assert "Traceback" not in survivor.stderr and "resuming study 'joint'" in survivor.stderr
    study = load_study(storage, "joint")
    by_number = {t.number: t for t in study.trials}
    assert all(by_number[n].state == optuna.trial.TrialState.COMPLETE and by_number[n].value == v for n, v in before.items())
    assert by_number[orphan[0]].state == optuna.trial.TrialState.FAIL
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 24
    assert max(evaluations_per_layout(study).values()) == 1
    assert_valid_file(tmp_path / "s.json")
    assert not (tmp_path / "doomed.json").exists()
    assert [p for p in files_in(tmp_path) if p.endswith(".tmp")] == []


@pytest.mark.slow
def test_a_killed_worker_running_alongside_is_failed_by_the_other(tmp_path):
    """Both at once: the survivor marks the dead worker's trial FAIL while it works."""
    storage = tmp_path / "study.log"
    common = [*SEARCH, "--trials", 24, "--storage", storage, "--study-name", "joint"]
    marker = tmp_path / "hanging"
    doomed = subprocess.Popen([sys.executable, "-c", WORKER, "2", marker, *map(str, common), "--out", tmp_path / "doomed.json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    survivor = subprocess.Popen([sys.executable, "-c", WORKER, "0", marker, *map(str, common), "--out", tmp_path / "s.json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate(timeout=30)
    _, stderr = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, stderr
    study = load_study(storage, "joint")
    states = Counter(t.state for t in study.trials)
    assert states[optuna.trial.TrialState.RUNNING] == 0 and states[optuna.trial.TrialState.FAIL] == 1
    assert 24 <= states[optuna.trial.TrialState.COMPLETE] <= 25
    assert max(evaluations_per_layout(study).values()) == 1
    assert_valid_file(tmp_path / "s.json")


# ----------------------------------------------------------------------------------------
# Fuzz: every argument list either writes a valid schedule or exits 2 with one line
# ----------------------------------------------------------------------------------------

BAD = st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e308", "1e-300", "1000001", "abc", "", "2.5"])


def value(*good: str):
    """Mostly a good value, sometimes a bad one: most examples get past argparse."""
    return st.one_of(st.sampled_from(good), st.sampled_from(good), BAD)


OPTIONS = {
    "--speedup": st.tuples(value("2", "3", "3.5", "5", "40")),
    "--steps": st.one_of(st.tuples(value("1", "2", "3", "5"), value("2", "3"), value("3", "5", "1000")), st.lists(value("2", "3"), min_size=1, max_size=4).map(tuple)),
    "--ends": st.one_of(st.tuples(value("0.2", "0.25"), value("0.3", "0.5"), value("1.0", "1")), st.lists(value("0.2", "1.0"), min_size=1, max_size=4).map(tuple)),
    "--up-ratio": st.tuples(value("0", "0.1", "0.3", "1", "1.5")),
    "--height": st.tuples(value("512", "1024", "1000", "8192")),
    "--width": st.tuples(value("512", "1024", "16384")),
    "--h0": st.tuples(value("3", "0.5", "1e-6", "1e6", "2e6")),
    "--base-steps": st.tuples(value("1", "28", "50")),
    "--z-bounds": st.tuples(value("2", "5", "100"), value("5", "100", "10000", "20000")),
    "--objective": st.tuples(st.sampled_from(["continuous", "discrete", "other"])),
    "--flops": st.tuples(st.sampled_from(["linear", "total", "x"])),
    "--seed": st.tuples(value("0", "1", "4294967295", "4294967296")),
    "--storage": st.tuples(st.sampled_from(["notaurl", "x.log", "sqlite:///x.db", "/no/such/folder/x.log", "journal:"])),
    "--study-name": st.tuples(st.sampled_from(["s", ""])),
}
#: Valid starting points: a given layout (fast) and the smallest search.
BASES = (
    ["--model", "flux", "--steps", "2", "3", "5", "--ends", "0.2", "0.3", "1.0"],
    ["--model", "sd3", "--speedup", "3"],
    ["--model", "sd3.5-large", "--steps", "3", "6", "--ends", "0.3", "1.0"],
)


@st.composite
def calibrate_argv(draw):
    argv = [*draw(st.sampled_from(BASES)), "--optimizer", "paper", "--trials", "1", "--quiet"]
    for option in draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=3, unique=True)):
        argv += [option, *draw(OPTIONS[option])]
    return argv


@settings(max_examples=120, deadline=timedelta(seconds=30), derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(argv=calibrate_argv())
@pytest.mark.slow
def test_fuzz_calibrate_arguments(argv, tmp_path_factory, capsys, monkeypatch):
    folder = tmp_path_factory.mktemp("fuzz")
    monkeypatch.chdir(folder)
    out = folder / "s.json"
    code, _, err = run(argv + ["--out", out], capsys)
    assert "Traceback" not in err
    if code == 0:
        assert_valid_file(out)
    else:
        assert code == 2, (argv, err)
        lines = [line for line in err.strip().splitlines() if not line.startswith("ralu-calibrate: note:") and "trials met the target" not in line and not line.startswith(("searching", "resuming"))]
        assert len(lines) == 1 and lines[0].startswith("ralu-calibrate: error: "), (argv, err)
        assert not out.exists()
    assert [p for p in files_in(folder) if p.endswith((".tmp", ".probe"))] == []
    assert json.dumps(argv)  # keeps the failing example printable


# ----------------------------------------------------------------------------------------
# Issue 26: a seeded fuzz of 500 command lines over output targets and numbers
# ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_calibrate_outputs_and_numbers(tmp_path, capsys, monkeypatch):
    """500 seeded command lines.  Four in five fuzz the three output files (--out, --plot,
    --plain-out: FIFOs, links, dangling links, folders, files used as folders, names too long,
    the same file twice) around a calibration stubbed by a real result computed once; one in
    five fuzzes the numbers of a real calibration.  No traceback, one error line, every file
    written loads with finite numbers, no FIFO or link replaced or written through."""
    from ralu.calibrate import calibration, plot
    from ralu.runtime.schedule import write_bytes_atomic

    real = calibration.calibrate
    made = real("flux", steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], optimizer="paper", show_progress=False)
    stubbed = {"on": True}
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: made if stubbed["on"] else real(*a, **k))
    monkeypatch.setattr(plot, "plot_schedule", lambda schedule, path: write_bytes_atomic(path, b"\x89PNG stub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "target.json").write_text("keep")
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    (tmp_path / "folder").mkdir()
    targets = ["s.json", "s.json", "new/s.json", "p.png", "plain.json", "fifo", "link.json", "dangling.json", "folder", "afile/x.json", "a" * 300, "b" * 250, "."]
    rng = __import__("random").Random(2628)
    codes = Counter()
    for case in range(500):
        stubbed["on"] = rng.random() < 0.8
        argv = list(FAST)
        if stubbed["on"]:
            for option in ("--out", "--plot", "--plain-out"):
                if option == "--out" or rng.random() < 0.4:
                    argv += [option, rng.choice(targets)]
        else:
            argv += ["--out", "s.json"]
            for option in rng.sample(sorted(OPTIONS_RANDOM), rng.randint(1, 3)):
                argv += [option, *rng.choice(OPTIONS_RANDOM[option])]
        code, _, err = run(argv, capsys)
        codes[code] += 1
        assert code in (0, 2) and "Traceback" not in err, (case, argv, err)
        if code == 2:
            lines = [line for line in err.strip().splitlines() if "error:" in line]
            assert len(lines) == 1, (case, argv, err)
        assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
        assert (tmp_path / "link.json").is_symlink() and (tmp_path / "target.json").read_text() == "keep"
        assert (tmp_path / "dangling.json").is_symlink() and not (tmp_path / "nowhere.json").exists()
        assert (tmp_path / "folder").is_dir()
    for written in [*tmp_path.glob("*.json"), *tmp_path.glob("new/*.json")]:
        if written.is_file() and not written.is_symlink() and written.name != "target.json":
            assert_valid_file(written)
    assert not [p for p in files_in(tmp_path) if p.endswith((".tmp", ".probe"))]
    assert codes[0] >= 100 and codes[2] >= 100, codes


#: Numbers for the real calibrations of the fuzz above: good, bad and hostile.
OPTIONS_RANDOM = {
    "--h0": [["3"], ["nan"], ["inf"], ["1e308"], ["-1"], ["0.5"]],
    "--up-ratio": [["0.1"], ["1.5"], ["nan"], ["-0.0"]],
    "--z-bounds": [["2", "100"], ["2", "2"], ["100", "2"], ["1", "5"], ["nan", "5"], ["2", "inf"]],
    "--min-signal": [["0"], ["0.5"], ["1"], ["nan"], ["-1"]],
    "--base-steps": [["50"], ["0"], ["1001"]],
    "--height": [["512"], ["1000"], ["-16"], ["8192"]],
    "--seed": [["0"], ["-1"], [str(2**64)]],
    "--resolution-gap": [["0.1"], ["nan"], ["-1"], ["inf"]],
}


# ----------------------------------------------------------------------------------------
# Ctrl-C while the tool is still importing, and the trials a short search reports
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("after_module", ["numpy", "scipy.optimize", "optuna"])
@pytest.mark.slow
def test_ctrl_c_while_importing_is_one_line(tmp_path, after_module):
    """SIGINT as soon as ``after_module`` has been imported (``-X importtime`` reports each
    import as it ends): the console script's module imports only the standard library, and
    ``main`` catches the interrupt during the heavy imports it does itself.  (What remains
    uncovered is the interpreter's own start-up and the first instruction of ``main``.)"""
    import signal
    import subprocess
    import sys

    code = "import sys; from ralu.calibrate.cli import main; sys.exit(main())"
    argv = ["--model", "flux", "--speedup", "7", "--trials", "50", "--out", str(tmp_path / "s.json"), "--quiet"]
    process = subprocess.Popen([sys.executable, "-X", "importtime", "-c", code, *argv], stderr=subprocess.PIPE, text=True, preexec_fn=hear_ctrl_c)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.split("|")[-1].strip() == after_module:
            process.send_signal(signal.SIGINT)
            break
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 130, rest
    messages = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert not any("Traceback" in line for line in messages), rest
    assert any(line.startswith("ralu-calibrate: interrupted") for line in messages), rest
    assert not (tmp_path / "s.json").exists()


def test_a_search_shorter_than_its_start_layouts_reports_the_trials_it_ran(capsys, tmp_path):
    # Start layouts are enqueued before the search; with --trials 1 most of them never run.
    code = cli.main(["--model", "flux", "--speedup", "7", "--trials", "1", "--quiet", "--out", str(tmp_path / "s.json")])
    assert code == 2
    assert "no layout among 1 trials reached 7.0x" in capsys.readouterr().err
