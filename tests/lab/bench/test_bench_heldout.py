"""Schedule files against chosen harness rows on held-out seeds
(``python -m ralu_lab.bench.quality.v2.heldout``) on random-init testbed v2 weights."""

from __future__ import annotations

import json

from ralu_lab.bench.quality.v2 import heldout
from ralu_lab.bench.quality.v2.plan import CACHE_KINDS
from ralu_lab.bench.quality.v2.sampler import WorkStore
from ralu_lab.bench.quality.v2.stats import SCHEDULE_METRICS


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


def test_caches_bring_the_cache_rows_of_the_chosen_rows(v2_weights, tmp_path):
    argv = ["--budget", "4", "--schedule", "flux-dev-4x", "--rows", "base-steps", "bottleneck", "--caches", "--seeds", "0", "--images", "2",
            "--real-images", "4", "--trials", "40", "--batch-size", "2", "--threads", "1", "--weights-dir", str(v2_weights),
            "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "h")]
    assert heldout.main(argv) == 0
    report = heldout.HeldoutReport.model_validate(json.loads((tmp_path / "h.json").read_text()))
    # bottleneck has no cache rows in the harness; base-steps has one per FLUX cache kind
    assert [r.method for r in report.rows] == ["base-steps", "bottleneck", *(f"base-steps+{k}" for k in CACHE_KINDS["flux"]), "schedule:flux-dev-4x"]
    by_key = {r.method: r for r in report.rows}
    assert all("cache (" in by_key[f"base-steps+{k}"].describe for k in CACHE_KINDS["flux"])
    # a step cache skips transformer work: its executed linear FLOPs are at most its uncached row's, and its total is unknown
    for kind in CACHE_KINDS["flux"]:
        row = by_key[f"base-steps+{kind}"]
        assert row.gflops_total is None and 0 < row.gflops_linear <= by_key["base-steps"].gflops_linear
        assert f"| base-steps+{kind} | {row.gflops_linear:.2f} linear |" in (tmp_path / "h.md").read_text()
    assert {v.b for v in report.verdicts} == {r.method for r in report.rows[:-1]}


def test_bad_requests_are_one_line(tmp_path, capsys):
    for argv, words in ((["--schedule", "sd3-medium-3x"], "drives SD3"), (["--schedule", "flux-dev-7x", "--images", "1"], "--images"),
                        (["--schedule", "a/x.json", "--schedule", "b/x.json"], "both be the row")):
        assert heldout.main(["--budget", "7", *argv, "--out", str(tmp_path / "h")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "h.md").exists()
