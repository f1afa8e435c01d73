"""The progress-aware objective (docs/method.md §4b) and the honest fewer-steps comparison."""

import numpy as np
import pytest

from ralu.calibrate import cli
from ralu.calibrate.calibration import calibrate
from ralu.calibrate.densities import discretisation_error, progress_error, shifted_cdf, stage_grid
from ralu.calibrate.fewer_steps import compare, plain_schedule, plain_steps_for, progress_of
from ralu.calibrate.flops.pricing import flops_speedup
from ralu.calibrate.search import NTDMObjective, StageLayout, optimise
from ralu.runtime.schedule import load_schedule, restart_time_z, stage_sigmas

H0 = 3.1582


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("steps", [1, 5, 12, 50])
def test_plain_steps_score_one_over_n_where_js_sees_nothing(steps):
    layout = StageLayout((steps,), (1.0,))
    params = np.array([[H0, 2.0]])
    # The JS objective compares normalised densities: any step count on the base grid matches.
    assert NTDMObjective(layout, H0, "continuous").distance(params)[0] < 1e-6
    # N equal steps in the base coordinate: N * (1/N)^2.
    assert NTDMObjective(layout, H0, "progress").distance(params)[0] == pytest.approx(1.0 / steps, rel=1e-9)


def test_stage_grid_is_the_runtime_grid_in_progress_time():
    grid = stage_grid(7, 0.12, 0.8, 2.4)
    assert np.allclose(grid, 1.0 - stage_sigmas(7, 0.12, 0.8, 2.4), atol=1e-12)


def test_progress_error_matches_its_formula_by_hand():
    steps, ends, z, r, gap = (2, 3, 4), (0.25, 0.5, 1.0), 5.0, 0.2, 0.7
    shifts = np.array([4.0, 2.5, 3.0])
    starts = np.array([0.0, restart_time_z(0.25, z), restart_time_z(0.5, z)])
    per_stage = []
    for n, s, e, h in zip(steps, starts, ends, shifts):
        u = shifted_cdf(1.0 - stage_sigmas(n, s, e, h), H0)
        per_stage.append(float((np.diff(u) ** 2).sum()))
    assert np.allclose(discretisation_error(steps, starts[None], np.array([ends]), shifts[None], H0)[0], per_stage)
    odds = starts / (1.0 - starts)
    expected = per_stage[0] / z**2 + (per_stage[1] + gap * np.sqrt(r) * odds[1]) / z + per_stage[2] + gap * np.sqrt(1 - r) * odds[2]
    value = progress_error(steps, starts[None], np.array([ends]), shifts[None], np.array([z]), H0, r, gap)[0]
    assert value == pytest.approx(expected, rel=1e-12)


def test_more_steps_or_less_resolution_gap_never_hurt():
    base = NTDMObjective(StageLayout((2, 3, 5), (0.2, 0.3, 1.0)), H0, "progress", up_ratio=0.1)
    more = NTDMObjective(StageLayout((2, 3, 8), (0.2, 0.3, 1.0)), H0, "progress", up_ratio=0.1)
    closer = NTDMObjective(StageLayout((2, 3, 5), (0.2, 0.3, 1.0)), H0, "progress", up_ratio=0.1, gap=0.1)
    rng = np.random.default_rng(0)
    params = np.column_stack([rng.uniform(0.5, 10, (64, 3)), rng.uniform(2, 100, 64)])
    assert (more.distance(params) < base.distance(params)).all()
    assert (closer.distance(params) < base.distance(params)).all()


def test_inner_search_spaces_steps_like_the_base_model():
    # Equal steps in u = F_h0(t) minimise the sum of squares: every shift comes out at h0.
    problem = NTDMObjective(StageLayout((5, 6, 7), (0.3, 0.45, 1.0)), H0, "progress", up_ratio=0.3)
    found = optimise(problem, "global", effort="quick")
    assert np.allclose(found.shifts, H0, atol=1e-3)
    assert 2.0 < found.z < 100.0  # an interior noise strength, neither bound
    values = problem.distance(np.array([[H0, H0, H0, z] for z in (2.0, found.z, 100.0)]))
    assert values[1] < values[0] and values[1] < values[2]


def test_calibrate_with_progress_records_continuous_js_and_names_the_objective():
    schedule = calibrate("flux", steps=[2, 3, 5], ends=[0.2, 0.3, 1.0], up_ratio=0.1, objective="progress", optimizer="paper")
    layout = StageLayout((2, 3, 5), (0.2, 0.3, 1.0))
    js = NTDMObjective(layout, schedule.calibration.h0).distance(np.array([[*(s.shift for s in schedule.stages), schedule.z]]))[0]
    assert schedule.divergence.objective == "continuous"
    assert schedule.divergence.js_distance == pytest.approx(js, rel=1e-9)
    assert "progress objective" in schedule.calibration.optimizer
    assert progress_of(schedule) == pytest.approx(
        NTDMObjective(layout, schedule.calibration.h0, "progress", up_ratio=0.1).distance(np.array([[*(s.shift for s in schedule.stages), schedule.z]]))[0]
    )


def test_plain_schedule_is_the_base_grid_within_the_budget():
    steps = plain_steps_for("flux", 1024, 1024, 50, 7.0)
    assert flops_speedup("flux-dev", 1024, 1024, [steps], 0.0, 50).linear >= 7.0
    assert flops_speedup("flux-dev", 1024, 1024, [steps + 1], 0.0, 50).linear < 7.0
    plain = plain_schedule("flux", steps, 1024, 1024, H0, 50)
    assert len(plain.stages) == 1 and plain.stages[0].shift == H0 and plain.transitions == []
    assert progress_of(plain) == pytest.approx(1.0 / steps)


def test_cli_says_when_fewer_steps_win_and_writes_that_schedule(tmp_path, capsys):
    out, plain = tmp_path / "ralu.json", tmp_path / "plain.json"
    argv = ["--model", "flux", "--steps", 2, 3, 5, "--ends", 0.2, 0.3, 1.0, "--up-ratio", 0.1, "--speedup", 7, "--objective", "progress",
            "--optimizer", "paper", "--out", out, "--plain-out", plain, "--quiet"]
    code, stdout, _ = run(argv, capsys)
    assert code == 0
    comparison = compare(load_schedule(out))
    assert "progress error" in stdout and f"plain {comparison.plain.stages[0].steps} steps" in stdout
    assert ("predicted BETTER" in stdout) == comparison.plain_wins
    written = load_schedule(plain)
    assert [s.steps for s in written.stages] == [comparison.plain.stages[0].steps] and written.stages[0].shift == pytest.approx(written.calibration.h0)


def test_cli_refuses_a_negative_gap_in_one_line(tmp_path, capsys):
    code, _, stderr = run(["--model", "flux", "--steps", 5, "--ends", 1.0, "--objective", "progress", "--resolution-gap", -1, "--out", tmp_path / "x.json", "--quiet"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "--resolution-gap" in stderr


def test_cli_refuses_plain_out_equal_to_out(tmp_path, capsys):
    out = tmp_path / "x.json"
    code, _, stderr = run(["--model", "flux", "--steps", 5, "--ends", 1.0, "--out", out, "--plain-out", out, "--quiet"], capsys)
    assert code == 2 and "--plain-out" in stderr and not out.exists()


def test_a_one_stage_schedule_is_not_told_that_fewer_steps_win():
    schedule = calibrate("flux", steps=[5], ends=[1.0], objective="progress", optimizer="paper")
    comparison = compare(schedule)
    assert not comparison.plain_wins and "itself a plain sampler" in comparison.describe()
    assert comparison.ralu_error == pytest.approx(0.2, abs=1e-6)
