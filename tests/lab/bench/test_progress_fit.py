"""The progress model's fit (``python -m ralu_lab.bench.quality.v2.progress_fit``): it recovers
terms that generated the scores, reads trials and harness reports, and writes the product's
file, which the product then reads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ralu.calibrate import progress_model
from ralu_lab.bench.quality.v2 import progress_fit as pf

H0 = 3.158192909689767


def _trial(number: int, steps, ends, shifts, z: float, ratio: float, value: float, scored: int = 8, state: str = "COMPLETE") -> dict:
    layout = json.dumps({"steps": steps, "ends": ends, "shifts": shifts, "z": z, "up_ratio": ratio})
    return {"number": number, "state": state, "images_scored": scored, "steps": steps, "ends": ends, "z": z, "up_ratio": ratio,
            "speedup": 5.0, "value": value, "layout": layout, **{f"shift_{k + 1}": h for k, h in enumerate(shifts)}}


def _synthetic(rng: np.random.Generator, ratio: float, gap: float, count: int = 60) -> list[dict]:
    """Schedules of one and three stages whose score is exactly increasing in J(ratio, gap)."""
    trials = []
    for number in range(count):
        if number % 4 == 0:
            steps, ends, shifts, z, r = [int(rng.integers(3, 12))], [1.0], [float(rng.uniform(0.8, 6.0))], 2.0, 0.0
        else:
            first = float(rng.choice([0.1, 0.2, 0.3]))
            steps = [int(n) for n in rng.integers(1, 6, size=3)]
            ends, shifts = [first, round(first + 0.2, 2), 1.0], [float(h) for h in rng.uniform(0.8, 6.0, size=3)]
            z, r = float(rng.uniform(2.0, 12.0)), float(rng.choice([0.1, 0.3]))
        row = pf.Measured("g", "x", "t", "flux", 4.0, tuple(steps), tuple(ends), tuple(shifts), z, r, H0, 5.0, 0.0)
        trials.append(_trial(number, steps, ends, shifts, z, r, 100.0 * pf._j(row, gap, ratio) ** 2))
    return trials


def test_the_fit_recovers_the_terms_that_made_the_scores(tmp_path):
    path = tmp_path / "quality-v2-flux-4x-trials.json"
    path.write_text(json.dumps(_synthetic(np.random.default_rng(0), ratio=0.7, gap=0.3)))
    rows = pf.load_trials([path])
    design = pf.Design.of(rows)
    fitted = pf.fit(design, pf.Pairs.of(rows))
    assert fitted.shift_ratio == pytest.approx(0.7, abs=0.05) and fitted.resolution_gap == pytest.approx(0.3, abs=0.1)
    # Orders without noise: the slope grows large and the margin small.
    assert pf.agreement(pf.Pairs.of(rows).margins(design.log_j(fitted.shift_ratio, fitted.resolution_gap))) > 0.99
    assert fitted.margin == pytest.approx(math.log(19) / fitted.beta)


def test_trials_are_grouped_by_images_and_read_once(tmp_path):
    first = tmp_path / "quality-v2-flux-7x-trials.json"
    again = tmp_path / "budget" / "quality-v2-flux-7x-trials.json"
    again.parent.mkdir()
    trials = [
        _trial(0, [6], [1.0], [H0], 2.0, 0.0, 200.0, scored=16),
        _trial(1, [2, 3, 5], [0.2, 0.3, 1.0], [8.1, 2.9, 2.2], 6.3, 0.1, 160.0, scored=16),
        _trial(2, [1, 2, 5], [0.3, 0.5, 1.0], [0.6, 0.8, 1.9], 5.2, 0.25, 300.0, scored=8, state="PRUNED"),
        _trial(3, [20, 5], [0.1, 1.0], [3.0, 5.0], 2.4, 0.0, 1e6 + 1.0),  # missed the budget: not a score
        {**_trial(4, [5], [1.0], [2.0], 2.0, 0.0, 220.0, scored=16), "distance": 180.0},  # a score with a spectral term: its distance is used
    ]
    first.write_text(json.dumps(trials))
    again.write_text(json.dumps(trials[:2]))  # the same schedules scored on the same images
    rows = pf.load_trials([first, again])
    assert len(rows) == 4
    assert {r.group for r in rows} == {"search flux: FD to 50-step samples, 16-image set, first 16 images", "search flux: FD to 50-step samples, 16-image set, first 8 images"}
    assert sorted(r.score for r in rows) == [160.0, 180.0, 200.0, 300.0]
    assert all(r.budget == 7.0 and r.h0 == pytest.approx(H0) for r in rows)
    with pytest.raises(ValueError, match="trials file"):
        pf.load_trials([tmp_path / "other.json"])


def test_report_rows_that_j_can_describe(tmp_path):
    estimate = {"value": 1.0, "low": 0.5, "high": 1.5, "seed_std": None, "per_seed": [1.0]}

    def row(method, details, budget=7, cache=None):
        return {"arch": "flux", "method": method, "budget": budget, "cache": cache, "flops_speedup_total": 7.3,
                "metrics": {"fd": {**estimate, "value": float(len(method))}, "fine_accuracy": estimate}, "details": details}

    ours = {"steps": [2, 3, 5], "ends": [0.2, 0.3, 1.0], "shifts": [8.0, 2.8, 2.3], "z": 8.4, "up_ratio": 0.1, "paper_compat": False}
    report = {
        "testbed": {"flux": {"h0": H0}},
        "rows": [
            row("baseline", {"steps": [50]}), row("base-steps", {"steps": [6]}), row("ralu-ours", ours),
            row("ralu-paper", {**ours, "paper_compat": True}), row("bottleneck", {"steps": [2, 6, 3], "resolutions": ["64 px", "32 px", "64 px"]}),
            row("ralu-ours+magcache", ours, cache="magcache"),
        ],
        "sweeps": [{"arch": "flux", "budget": 7, "points": [{"z": 2.5, "shifts": [6.6, 4.8, 3.1], "metrics": {"fd": estimate, "fine_accuracy": estimate}}]}],
    }
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(report))
    rows = pf.load_report(path)
    fd = [r for r in rows if r.group.endswith(", fd")]
    assert [r.label for r in fd] == ["base-steps", "ralu-ours", "Z = 2.5"]  # the baseline, paper_compat, Bottleneck and cache rows are left out
    assert fd[0].steps == (6,) and fd[0].shifts == (H0,) and fd[2].steps == (2, 3, 5) and fd[2].z == 2.5
    accuracy = [r for r in rows if r.group.endswith(", fine_accuracy")]
    assert all(r.score == -1.0 for r in accuracy)  # higher accuracy is better: negated, so lower is better everywhere


def test_the_written_file_is_what_the_product_reads(tmp_path, monkeypatch):
    trials = tmp_path / "quality-v2-flux-4x-trials.json"
    trials.write_text(json.dumps(_synthetic(np.random.default_rng(1), ratio=0.8, gap=0.2, count=24)))
    model_out = tmp_path / "progress_model.json"
    assert pf.main(["--trials", str(trials), "--out-dir", str(tmp_path), "--model-out", str(model_out), "--resamples", "2"]) == 0
    written = json.loads(model_out.read_text())
    assert written["command"].startswith(pf.MODULE) and str(trials) in written["command"]
    assert (tmp_path / "progress-fit.md").read_text().count(written["version"]) == 1
    monkeypatch.setattr(progress_model, "model_path", lambda: model_out)
    progress_model.load_progress_model.cache_clear()
    try:
        read = progress_model.load_progress_model()
    finally:
        progress_model.load_progress_model.cache_clear()
    assert read.version == written["version"] and read.shift_ratio == written["terms"]["shift_ratio"]["value"]
    assert read.verdict_margin == written["verdict"]["margin"] and read.verdict_confidence == pf.CONFIDENCE


def test_missing_input_is_one_line(tmp_path, capsys):
    assert pf.main(["--trials", str(tmp_path / "none-trials.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cross_checks_pair_budgets_of_one_model_and_models_with_each_other():
    def row(arch, budget, group="search x"):
        return pf.Measured(group, "x", "t", arch, budget, (6,), (1.0,), (H0,), 2.0, 0.0, H0, 5.0, 1.0)

    rows = [row("flux", 4.0), row("flux", 7.0), row("sd3", 2.0), row("flux", 4.0, group="harness q: flux rows, fd")]
    names = [c.name for c in pf.checks(rows)]
    assert names == ["search flux 4x -> search flux 7x", "search flux 7x -> search flux 4x", "searches flux -> searches sd3", "searches sd3 -> searches flux",
                     "searches -> harness flux rows, fd"]
    assert pf.checks(rows)[-1].train == [0, 1, 2] and pf.checks(rows)[-1].test == [3]
