"""What testbed v2 (``reports/quality.json``) says of each shipped schedule (lab code): the
section of reports/schedules.md that ``python -m ralu.calibrate.shipped`` writes through the
entry-point group ``ralu.schedule_judgements`` (:mod:`ralu.calibrate.plugins`)."""

from __future__ import annotations

import json
from pathlib import Path

from ralu.runtime.schedule import Schedule

#: What a testbed row records of its schedule (``ralu_method``'s details) that identifies the calibration.
CALIBRATION_KEYS = ("steps", "ends", "shifts", "z", "c", "up_ratio")


def _same_calibration(details: dict, schedule: Schedule) -> bool:
    """Whether a testbed row's recorded calibration is ``schedule``'s, as the harness records it."""
    from ralu_lab.bench.quality.methods import ralu_method

    recorded = ralu_method("shipped", 0, schedule, 1024, False).details
    return all(details.get(key) == recorded[key] for key in CALIBRATION_KEYS)


def _shipped_row(rows: list[dict], name: str) -> tuple[dict | None, str]:
    """The testbed row that judged the shipped schedule ``name`` as it is now: its
    ``--schedule`` row (or another file's with the same content), else the harness's own row with the same calibration (``ralu-ours``:
    the preset layout at the model's h0 with the global optimiser); None when the file has
    changed since (a recalibration the report has not judged yet)."""
    from ralu.runtime.schedule import load_schedule

    schedule = load_schedule(name)
    judged = [r for r in rows if r["cache"] is None and r["method"].startswith("schedule:") and _same_calibration(r["details"], schedule)]
    for row in sorted(judged, key=lambda r: r["method"] != f"schedule:{name}"):  # its own name first, else a file with the same content
        return row, "its `--schedule` row" if row["method"] == f"schedule:{name}" else f"the `--schedule` row `{row['method'].removeprefix('schedule:')}`, the same schedule"
    for row in rows:
        if row["cache"] is None and row["method"] in ("ralu-ours", "ralu-ours-crop") and _same_calibration(row["details"], schedule):
            return row, f"the harness's `{row['method']}` row, which is this calibration"
    return None, ""


def how_intervals(report: dict) -> str:
    """How the report's intervals and verdicts were made (reports before issue 28: over images)."""
    if (report.get("intervals") or {}).get("unit") == "seeds":
        return "95 % intervals of a pairs cluster bootstrap over the seeds; verdicts are paired cluster bootstraps (the same seeds for both rows)"
    return "95 % bootstrap intervals over the pooled images; verdicts are paired bootstraps over the same images"


def testbed_judgement(quality_json: Path, preset_names: list[str]) -> str:
    """What testbed v2 (``reports/quality.json``) says of each shipped schedule: its FD and
    accuracies with 95 % intervals, and, for ``--schedule`` rows, the paired verdicts against
    the published preset and the plain pipeline with fewer steps at the same budget."""
    if not quality_json.is_file():
        return "Testbed v2 has not judged these files yet (`ralu-bench quality --schedule NAME`, reports/quality.md)."
    from ralu_lab.bench.quality.v2.report import DIGITS
    from ralu_lab.bench.quality.v2.stats import METRICS, SCHEDULE_METRICS

    labels = {key: label for key, label, _, _ in METRICS}
    report = json.loads(quality_json.read_text())
    lines = [
        "## What testbed v2 says of them",
        "",
        f"From [`quality.md`](quality.md) (`{report['command'].split(' --schedule')[0]} --schedule ...`): {how_intervals(report)} "
        "(a winner only at 95 % confidence).  "
        "A testbed is not FLUX.1-dev or SD3: these figures rank schedules on a small model with the same pipelines, they do not "
        "predict image quality on the real ones.",
        "",
    ]
    for name in [n for preset in preset_names for n in (preset, f"{preset}-searched")]:
        row, how = _shipped_row(report["rows"], name)
        if row is None:
            lines.append(f"- `{name}`: not judged as it is now (testbed v2 runs the published presets' budgets; a file recalibrated since "
                         f"needs `ralu-bench quality --schedule {name}`).")
            continue
        m = row["metrics"]
        values = ", ".join(f"{labels[k]} {m[k]['value']:.{DIGITS[k]}f} [{m[k]['low']:.{DIGITS[k]}f}, {m[k]['high']:.{DIGITS[k]}f}]" for k in SCHEDULE_METRICS)
        text = f"- `{name}` ({row['arch'].upper()} {row['budget']}x, {how}): {values}"
        text += "".join(f".  {said}" for said in against_peers(report, row, labels))
        lines.append(text + ".")
    return "\n".join(lines)


#: The rows a shipped schedule is held against, and how the judgement names them.
PEERS = (("ralu-paper", "the published preset"), ("base-steps", "the plain pipeline with fewer steps"), ("bottleneck", "Bottleneck Sampling"))


def _peer(method: str) -> str | None:
    """The peer a row name is (SD3's published row runs with crop), or None."""
    return next((key for key, _ in PEERS if method in (key, f"{key}-crop")), None)


def _replicated(report: dict, v: dict) -> str:
    """Whether a verdict that names a winner holds in both halves of the seeds (the report's replication check)."""
    for claim in (report.get("replication") or {}).get("claims", []):
        if all(claim[k] == v[k] for k in ("arch", "budget", "question", "metric", "a", "b")):
            return " (holds in both halves of the seeds)" if claim["replicated"] else " (**does not hold in both halves of the seeds**)"
    return ""


def against_peers(report: dict, row: dict, labels: dict[str, str]) -> list[str]:
    """One sentence per peer: the paired verdicts of ``row`` (a ``--schedule`` row) against it on
    the report's seeds, each marked with whether it replicates, then on the held-out seeds."""
    from ralu_lab.bench.quality.v2.stats import HELDOUT_QUESTION, SCHEDULE_QUESTION

    held = (report.get("heldout") or {}).get("verdicts", [])

    def said(verdicts: list[dict], title: str, marks: bool) -> str:
        return "; ".join(f"{labels[v['metric']]} {v['verdict'].replace(v['a'], 'this schedule').replace(v['b'], title)}"
                         f" ({v['difference']:+.3g} [{v['low']:+.3g}, {v['high']:+.3g}])" + (_replicated(report, v) if marks else "") for v in verdicts)

    def of(verdicts: list[dict], question: str, key: str) -> list[dict]:
        return [v for v in verdicts if v["a"] == row["method"] and v["arch"] == row["arch"] and v["budget"] == row["budget"]
                and v["question"] == question and _peer(v["b"]) == key]

    out = []
    for key, title in PEERS:
        mine, later = of(report["verdicts"], SCHEDULE_QUESTION, key), of(held, HELDOUT_QUESTION, key)
        if mine:
            out.append(f"Against {title}: {said(mine, title, True)}" + (f"; on the held-out seeds {said(later, title, False)}" if later else ""))
    return out


def judge(reports_dir: Path, preset_names: list[str]) -> str:
    """The registered judgement: :func:`testbed_judgement` of ``reports_dir/quality.json``."""
    return testbed_judgement(Path(reports_dir) / "quality.json", preset_names)
