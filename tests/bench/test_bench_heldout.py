"""Schedule files against chosen harness rows on held-out seeds
(``python -m ralu.calibrate.bench.quality.v2.heldout``) on random-init testbed v2 weights."""

from __future__ import annotations

import json

from ralu.calibrate.bench.quality.v2 import heldout
from ralu.calibrate.bench.quality.v2.sampler import WorkStore
from ralu.calibrate.bench.quality.v2.stats import SCHEDULE_METRICS


def test_schedules_meet_the_chosen_rows_with_paired_verdicts(v2_weights, tmp_path, capsys):
    work = tmp_path / "work"
    argv = ["--budget", "7", "--schedule", "flux-dev-7x-searched", "--schedule", "flux-dev-7x", "--rows", "base-steps", "bottleneck",
            "--seeds", "0", "--images", "2", "--real-images", "4", "--trials", "40", "--batch-size", "2", "--threads", "1",
            "--weights-dir", str(v2_weights), "--work-dir", str(work), "--out", str(tmp_path / "h")]
    assert heldout.main(argv) == 0
    report = heldout.HeldoutReport.model_validate(json.loads((tmp_path / "h.json").read_text()))
    methods = [r.method for r in report.rows]
    assert methods == ["base-steps", "bottleneck", "schedule:flux-dev-7x-searched", "schedule:flux-dev-7x"]
    # each schedule against every other row, on every schedule metric
    for name in methods[2:]:
        mine = [v for v in report.verdicts if v.a == name]
        assert {(v.b, v.metric) for v in mine} == {(b, k) for b in methods if b != name for k in SCHEDULE_METRICS}
        assert all(v.low <= v.difference <= v.high or v.low == v.high for v in mine)
    assert (tmp_path / "h.md").read_text() == heldout.render_markdown(report)
    # the images went to the harness's work folder, one batch per row and seed
    assert len(list(WorkStore(work).folder.glob("*"))) >= len(methods)


def test_bad_requests_are_one_line(tmp_path, capsys):
    for argv, words in ((["--schedule", "sd3-medium-3x"], "drives SD3"), (["--schedule", "flux-dev-7x", "--images", "1"], "--images"),
                        (["--schedule", "a/x.json", "--schedule", "b/x.json"], "both be the row")):
        assert heldout.main(["--budget", "7", *argv, "--out", str(tmp_path / "h")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "h.md").exists()
