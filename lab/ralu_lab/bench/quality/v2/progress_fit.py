"""Fit the free terms of the progress model J (docs/method.md §4b) to measured image scores.

    python -m ralu_lab.bench.quality.v2.progress_fit \\
        --trials reports/experiments/quality-search-v2/quality-v2-flux-4x-trials.json ... \\
        --report reports/quality.json --out-dir reports --model-out calibrate/progress_model.json

Data: every schedule the quality searches scored (``*-trials.json``: FD to 50-step samples on
the search's images, without a spectral term the search may add; a pruned trial's score is on
its first images only) and the rows of
``ralu-bench quality`` reports (FD and fine accuracy against real scenes, the Z sweep).  J is
a model of error, not of FD, so only what the measurements *rank* is used: two schedules are
compared only within a group, rows scored on the same images by the same metric.

Model of the order (Bradley-Terry): schedule a scores better than b with probability
``sigmoid(beta * ln(J_b / J_a))``.  The fitted terms are the resolution gap g and the shift
ratio rho (a step's error is uniform in ``u = F_{rho h0}(t)``); beta says how sharply a
difference in J decides the measured order, and gives the verdict margin of
``ralu.calibrate.fewer_steps``: the smallest ``|ln(J_plain / J_ralu)|`` at which the model
gives the better of the two probability ``CONFIDENCE``.

Cross-checks fit on one part and predict another (FLUX 4x <-> 7x within the searches; the
searches -> the harness's FLUX and SD3 rows), with bootstrap intervals that resample
schedules within each group, for the fit and the test set alike.  Writes the product's
``calibrate/progress_model.json`` (the terms, the margin, the data, this command) and a
report ``progress-fit.md``/``.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.stats import spearmanr

from ralu.calibrate.densities import progress_error
from ralu.calibrate.progress_model import MODEL_FORMAT
from ralu.runtime.schedule import stage_starts, write_text_atomic
from ralu_lab.bench.common import fail, num, write_report

MODULE = "python -m ralu_lab.bench.quality.v2.progress_fit"
#: The verdict margin stands for this probability that the predicted order is the measured one.
CONFIDENCE = 0.95
#: Two rows are of matched cost when their speed-ups are within this factor of each other.
MATCHED_COST = 1.25
#: The terms before this fit (docs/method.md §4b): g measured as a paired RMS gap, rho = 1.
PREVIOUS = {"resolution_gap": 0.5, "shift_ratio": 1.0}
#: rho is searched here: below it the whole budget sits at the data end, above it the noise end.
RATIO_RANGE = (0.2, 1.6)
RATIO_GRID = np.round(np.arange(RATIO_RANGE[0], RATIO_RANGE[1] + 1e-9, 0.01), 2)
GAP_RANGE = (0.0, 2.0)
#: Harness metrics used, with the sign that makes lower better.
HARNESS_METRICS = {"fd": 1.0, "fine_accuracy": -1.0}
#: Testbed architecture -> the model whose schedules it runs.
ARCH_MODELS = {"flux": "flux-dev", "sd3": "sd3-medium"}
TRIALS_NAME = re.compile(r"quality-v2-(?P<arch>[a-z0-9]+)-(?P<budget>\d+(?:\.\d+)?)x")
SEARCH_INFEASIBLE = 1e6  # ralu.calibrate.quality_search.INFEASIBLE (that module imports torch)


@dataclass(frozen=True)
class Measured:
    """One schedule's measured score in one group (lower is better)."""

    group: str
    source: str
    label: str
    arch: str
    budget: float
    steps: tuple[int, ...]
    ends: tuple[float, ...]
    shifts: tuple[float, ...]
    z: float
    up_ratio: float
    h0: float
    speedup: float | None  # on the testbed's cost model; None where the report gives none (the Z sweep)
    score: float
    #: scored on the whole image set (a pruned search trial: on its first images only)
    whole_set: bool = True


# ----------------------------------------------------------------------------------------
# Reading the measurements.
# ----------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def testbed_h0(arch: str) -> float:
    from ralu_lab.testbed.v2.model import base_shift

    return base_shift(arch)


def load_trials(paths: Sequence[Path]) -> list[Measured]:
    """Every scored trial of the quality searches, once: searches over the same images (the
    same largest image count) share a group per number of images scored."""
    found: dict[tuple[str, str], Measured] = {}
    for path in paths:
        name = TRIALS_NAME.search(Path(path).name)
        if name is None:
            raise ValueError(f"{path}: not a quality search's trials file (quality-v2-ARCH-Bx[-...]-trials.json). Fix: pass the *-trials.json the search wrote")
        arch, budget = name["arch"], float(name["budget"])
        trials = json.loads(Path(path).read_text())
        scored = [t for t in trials if t.get("state") in ("COMPLETE", "PRUNED") and t.get("images_scored") and t.get("value") is not None and t["value"] < SEARCH_INFEASIBLE]
        if not scored:
            continue
        images = max(t["images_scored"] for t in scored)
        for t in scored:
            group = f"search {arch}: FD to 50-step samples, {images}-image set, first {t['images_scored']} images"
            n = len(t["steps"])
            row = Measured(
                group=group, source=str(path), label=f"trial {t['number']}", arch=arch, budget=budget,
                steps=tuple(int(s) for s in t["steps"]), ends=tuple(float(e) for e in t["ends"]),
                shifts=tuple(float(t[f"shift_{k + 1}"]) for k in range(n)), z=float(t["z"]), up_ratio=float(t["up_ratio"]),
                h0=testbed_h0(arch), speedup=float(t["speedup"]), score=float(t.get("distance", t["value"])), whole_set=t["images_scored"] == images,
            )
            found.setdefault((group, t["layout"]), row)
    return list(found.values())


def _layout_of(details: dict, h0: float) -> dict | None:
    """Steps, ends, shifts, Z and r of a harness row's schedule; None for a row J cannot
    describe (Bottleneck, naive upsampling, the published script's noise)."""
    steps = details.get("steps")
    if "ends" not in details:
        return {"steps": steps, "ends": [1.0], "shifts": [h0], "z": 2.0, "up_ratio": 0.0} if steps and len(steps) == 1 else None
    if details.get("paper_compat") or "resolutions" in details:
        return None
    return {"steps": steps, "ends": details["ends"], "shifts": details["shifts"], "z": details["z"], "up_ratio": details["up_ratio"]}


def load_report(path: Path) -> list[Measured]:
    """The rows of a ``ralu-bench quality`` report J can describe (plain samplers and RALU
    schedules with exact noise, uncached), and its Z sweep, per metric of HARNESS_METRICS."""
    data = json.loads(Path(path).read_text())
    rows: list[Measured] = []
    layouts: dict[tuple[str, float], dict] = {}
    for row in data.get("rows", []):
        arch = row["arch"]
        if row.get("cache") or row["method"] == "baseline" or arch not in data.get("testbed", {}):
            continue
        h0 = data["testbed"][arch]["h0"]
        layout = _layout_of(row["details"], h0)
        if layout is None:
            continue
        frame = "stretch frame" if row["method"].endswith("-stretch") else "crop frame" if arch == "sd3" else ""
        if row["method"] in ("ralu-ours", "ralu-ours-crop"):
            layouts[(arch, row["budget"])] = layout
        for metric, sign in HARNESS_METRICS.items():
            rows.append(_harness_row(path, f"{arch} {frame} rows".replace("  ", " "), metric, sign, row["method"], arch, row["budget"], layout, h0,
                                     row["flops_speedup_total"], row["metrics"][metric]["value"]))
    for sweep in data.get("sweeps", []):
        arch, budget = sweep["arch"], sweep["budget"]
        if (arch, budget) not in layouts:
            continue
        base = layouts[(arch, budget)]
        h0 = data["testbed"][arch]["h0"]
        for point in sweep["points"]:
            layout = {**base, "shifts": point["shifts"], "z": point["z"]}
            for metric, sign in HARNESS_METRICS.items():
                rows.append(_harness_row(path, f"{arch} {budget:g}x Z sweep", metric, sign, f"Z = {point['z']:g}", arch, budget, layout, h0, None, point["metrics"][metric]["value"]))
    return rows


def _harness_row(path, kind: str, metric: str, sign: float, label: str, arch: str, budget, layout: dict, h0: float, speedup: float | None, value: float) -> Measured:
    return Measured(
        group=f"harness {Path(path).name}: {kind}, {metric}", source=str(path), label=label, arch=arch, budget=float(budget),
        steps=tuple(int(s) for s in layout["steps"]), ends=tuple(float(e) for e in layout["ends"]), shifts=tuple(float(h) for h in layout["shifts"]),
        z=float(layout["z"]), up_ratio=float(layout["up_ratio"]), h0=float(h0), speedup=None if speedup is None else float(speedup), score=sign * float(value),
    )


# ----------------------------------------------------------------------------------------
# J as a function of the terms: J = A(rho) + g B, A on a grid of rho.
# ----------------------------------------------------------------------------------------


def _j(row: Measured, gap: float, ratio: float) -> float:
    starts = np.array([stage_starts(list(row.ends), 1.0 / row.z**2)])
    # J's gap term counts a three-stage layout's r; a two-stage one sends every token up at once.
    return float(progress_error(row.steps, starts, np.array([row.ends]), np.array([row.shifts]), np.array([row.z]), row.h0,
                                row.up_ratio if len(row.steps) == 3 else 0.0, gap, ratio)[0])


@dataclass
class Design:
    """J of every row for any (rho, g): ``A[i_rho, row] + g * B[row]``."""

    a: np.ndarray
    b: np.ndarray

    @classmethod
    def of(cls, rows: Sequence[Measured]) -> Design:
        a = np.array([[_j(r, 0.0, float(ratio)) for r in rows] for ratio in RATIO_GRID])
        b = np.array([_j(r, 1.0, 1.0) - _j(r, 0.0, 1.0) for r in rows])  # the gap term does not depend on rho
        return cls(a, b)

    def log_j(self, ratio: float, gap: float) -> np.ndarray:
        position = np.interp(ratio, RATIO_GRID, np.arange(len(RATIO_GRID)))
        low = int(min(math.floor(position), len(RATIO_GRID) - 2))
        weight = position - low
        return np.log((1 - weight) * self.a[low] + weight * self.a[low + 1] + gap * self.b)


# ----------------------------------------------------------------------------------------
# Pairs, the order model and its fit.
# ----------------------------------------------------------------------------------------


@dataclass
class Pairs:
    """Index pairs (better, worse) by measured score, of rows in one group."""

    better: np.ndarray
    worse: np.ndarray

    @classmethod
    def of(cls, rows: Sequence[Measured], index: Sequence[int] | None = None, matched: bool = False) -> Pairs:
        index = list(range(len(rows))) if index is None else list(index)
        better, worse = [], []
        for p, i in enumerate(index):
            for j in index[p + 1:]:
                a, b = rows[i], rows[j]
                if a.group != b.group or a.score == b.score:
                    continue
                if matched and not (a.budget == b.budget and _matched(a.speedup, b.speedup)):
                    continue
                better.append(i if a.score < b.score else j)
                worse.append(j if a.score < b.score else i)
        return cls(np.array(better, dtype=int), np.array(worse, dtype=int))

    def __len__(self) -> int:
        return len(self.better)

    def margins(self, log_j: np.ndarray) -> np.ndarray:
        """ln(J_worse / J_better): positive where J orders the pair as measured."""
        return log_j[self.worse] - log_j[self.better]


def _matched(a: float | None, b: float | None) -> bool:
    return a is None or b is None or abs(math.log(a / b)) <= math.log(MATCHED_COST)


def order_loss(margins: np.ndarray, beta: float) -> float:
    """Mean negative log-likelihood of the measured orders: -ln sigmoid(beta * margin)."""
    return float(np.logaddexp(0.0, -beta * margins).mean())


def agreement(margins: np.ndarray) -> float:
    """Share of pairs J orders as measured (a tie in J counts half)."""
    return float(((margins > 0) + 0.5 * (margins == 0)).mean()) if len(margins) else math.nan


@dataclass(frozen=True)
class Fit:
    shift_ratio: float
    resolution_gap: float
    beta: float
    loss: float

    @property
    def margin(self) -> float:
        """|ln J ratio| at which the order model gives the better one probability CONFIDENCE."""
        return math.log(CONFIDENCE / (1.0 - CONFIDENCE)) / self.beta


def _profile(design: Design, pairs: Pairs, ratio: float, gap: float) -> tuple[float, float]:
    margins = pairs.margins(design.log_j(ratio, gap))
    found = minimize_scalar(lambda beta: order_loss(margins, beta), bounds=(1e-3, 200.0), method="bounded")
    return float(found.fun), float(found.x)


def fit(design: Design, pairs: Pairs, start: tuple[float, float] | None = None) -> Fit:
    """The (rho, g) of least order loss (beta profiled out): a coarse grid, or ``start``,
    then Nelder-Mead within the ranges."""
    if start is None:
        grid = [(ratio, gap) for ratio in np.arange(RATIO_RANGE[0], RATIO_RANGE[1] + 1e-9, 0.1) for gap in np.arange(GAP_RANGE[0], GAP_RANGE[1] + 1e-9, 0.1)]
        start = min(grid, key=lambda point: _profile(design, pairs, *point)[0])

    def loss(x: np.ndarray) -> float:
        ratio, gap = float(x[0]), float(x[1])
        if not (RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1] and GAP_RANGE[0] <= gap <= GAP_RANGE[1]):
            return math.inf
        return _profile(design, pairs, ratio, gap)[0]

    found = minimize(loss, np.array(start, dtype=float), method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-7, "initial_simplex": _simplex(start)})
    ratio, gap = (float(v) for v in found.x)
    value, beta = _profile(design, pairs, ratio, gap)
    return Fit(ratio, gap, beta, value)


def _simplex(start: tuple[float, float]) -> np.ndarray:
    ratio, gap = start
    return np.array([[ratio, gap], [min(ratio + 0.1, RATIO_RANGE[1]), gap], [ratio, min(gap + 0.1, GAP_RANGE[1])]])


# ----------------------------------------------------------------------------------------
# Evaluation and bootstrap.
# ----------------------------------------------------------------------------------------


def resample(rows: Sequence[Measured], index: Sequence[int], rng: np.random.Generator) -> list[int]:
    """``index`` resampled with replacement within each group (schedules are the unit)."""
    by_group: dict[str, list[int]] = {}
    for i in index:
        by_group.setdefault(rows[i].group, []).append(i)
    return [int(i) for members in by_group.values() for i in rng.choice(members, size=len(members), replace=True)]


def spearman_by_group(rows: Sequence[Measured], index: Sequence[int], log_j: np.ndarray) -> dict[str, float]:
    """Rank correlation of J and score within each group and budget (3 rows or more)."""
    cells: dict[str, list[int]] = {}
    for i in index:
        cells.setdefault(f"{rows[i].group} | {rows[i].budget:g}x", []).append(i)
    out = {}
    for name, members in sorted(cells.items()):
        scores = [rows[i].score for i in members]
        if len(members) >= 3 and len(set(scores)) > 1 and len(set(log_j[members])) > 1:
            out[name] = float(spearmanr(log_j[members], scores)[0])
    return out


#: The best measured schedules whose ends bound the layout search's (docs/method.md §4).
BEST_COUNT = 5


def ends_evidence(rows: Sequence[Measured], index: Sequence[int], log_j: np.ndarray) -> dict:
    """What the data say about stage ends.  Where they stop (the ends of the three-stage
    rows); what the fitted J gets wrong with them (per group, ln score = a + b ln J by least
    squares, and the correlation of the three-stage rows' residuals with e1 and e2); and the
    ends of the BEST_COUNT best whole-set schedules of each budget."""
    residuals, ends = [], []
    by_group: dict[str, list[int]] = {}
    for i in index:
        by_group.setdefault(rows[i].group, []).append(i)
    for members in by_group.values():
        if len(members) < 5:
            continue
        x, y = log_j[members], np.log([rows[i].score for i in members])
        slope, intercept = np.polyfit(x, y, 1)
        for i, r in zip(members, y - (intercept + slope * x)):
            if len(rows[i].steps) == 3:
                residuals.append(float(r))
                ends.append(rows[i].ends[:2])
    ends = np.array(ends)
    best = {}
    for budget in sorted({rows[i].budget for i in index}):
        whole = sorted((i for i in index if rows[i].budget == budget and rows[i].whole_set and len(rows[i].steps) == 3), key=lambda i: rows[i].score)
        firsts, seconds = [rows[i].ends[0] for i in whole[:BEST_COUNT]], [rows[i].ends[1] for i in whole[:BEST_COUNT]]
        if firsts:
            best[f"{budget:g}x"] = {"first_end": [min(firsts), max(firsts)], "second_end": [min(seconds), max(seconds)], "schedules": len(firsts)}
    return {
        "three_stage_rows": len(residuals),
        "first_end_range": [float(ends[:, 0].min()), float(ends[:, 0].max())] if len(ends) else [],
        "second_end_range": [float(ends[:, 1].min()), float(ends[:, 1].max())] if len(ends) else [],
        "residual_correlation": {
            "first_end": float(np.corrcoef(ends[:, 0], residuals)[0, 1]) if len(ends) > 2 else math.nan,
            "second_end": float(np.corrcoef(ends[:, 1], residuals)[0, 1]) if len(ends) > 2 else math.nan,
        },
        "best": best,
    }


def structure(steps: Sequence[int], ends: Sequence[float], up_ratio: float) -> np.ndarray:
    """What carries over between resolutions: each stage's share of the steps, the ends and r."""
    return np.array([*(n / sum(steps) for n in steps), *ends[:-1], up_ratio])


def against_measured(names: Sequence[str], rows: Sequence[Measured], index: Sequence[int], log_j: np.ndarray, fitted: Fit) -> list[dict]:
    """Each schedule (a shipped name or file at its own size; its budget: the target it was
    searched for, else its speed-up) beside the measured schedules of that budget: its J
    and the plain sampler's at its budget (the product's comparison), the best measured
    schedule's J, and its nearest measured neighbour in structure (step shares, ends, r) with
    that neighbour's rank by score among the budget's whole-set three-stage schedules."""
    from ralu.calibrate.fewer_steps import compare
    from ralu.runtime.schedule import load_schedule

    out = []
    for name in names:
        schedule = load_schedule(name)
        comparison = compare(schedule, gap=fitted.resolution_gap, shift_ratio=fitted.shift_ratio)
        target = schedule.calibration.target_speedup or schedule.flops_speedup.linear
        arch = next((a for a, m in ARCH_MODELS.items() if m == schedule.model), None)
        budgets = {rows[i].budget for i in index if rows[i].arch == arch}
        entry = {"schedule": name, "steps": [s.steps for s in schedule.stages], "ends": [s.end for s in schedule.stages],
                 "shifts_over_h0": [s.shift / schedule.calibration.h0 for s in schedule.stages], "z": schedule.z, "up_ratio": schedule.up_ratio,
                 "j": comparison.ralu_error, "j_plain": comparison.plain_error, "plain_steps": comparison.plain.stages[0].steps, "measured_budget": None}
        if not budgets or len(schedule.stages) != 3:
            out.append(entry)
            continue
        budget = min(budgets, key=lambda b: abs(b - target))
        ranked = sorted((i for i in index if rows[i].arch == arch and rows[i].budget == budget and rows[i].whole_set and len(rows[i].steps) == 3),
                        key=lambda i: rows[i].score)
        mine = structure(entry["steps"], entry["ends"], schedule.up_ratio)
        nearest = min(ranked, key=lambda i: float(np.abs(structure(rows[i].steps, rows[i].ends, rows[i].up_ratio) - mine).sum()))
        best = ranked[0]
        entry.update({
            "measured_budget": budget, "measured_schedules": len(ranked),
            "best": {"steps": list(rows[best].steps), "ends": list(rows[best].ends), "score": rows[best].score, "j": float(np.exp(log_j[best]))},
            "nearest": {"steps": list(rows[nearest].steps), "ends": list(rows[nearest].ends), "up_ratio": rows[nearest].up_ratio, "z": rows[nearest].z,
                        "score": rows[nearest].score, "rank": ranked.index(nearest) + 1, "j": float(np.exp(log_j[nearest]))},
        })
        out.append(entry)
    return out


def _interval(values: Sequence[float]) -> list[float]:
    values = [v for v in values if math.isfinite(v)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else [math.nan, math.nan]


@dataclass
class Check:
    """Fit on ``train``, predict ``test``: agreement on the test's pairs (matched cost), and
    the share of confident pairs (beyond the margin) ordered right."""

    name: str
    train: list[int]
    test: list[int]


def evaluate(rows, design: Design, check: Check, fitted: Fit, previous_log_j: np.ndarray) -> dict:
    log_j = design.log_j(fitted.shift_ratio, fitted.resolution_gap)
    pairs = Pairs.of(rows, check.test, matched=True)
    margins = pairs.margins(log_j)
    confident = np.abs(margins) >= fitted.margin
    return {
        "pairs": len(pairs),
        "agreement": agreement(margins),
        "agreement_previous": agreement(pairs.margins(previous_log_j)),
        "confident_pairs": int(confident.sum()),
        "confident_agreement": agreement(margins[confident]),
        "spearman": spearman_by_group(rows, check.test, log_j),
    }


def run_check(rows, design: Design, check: Check, full: Fit, previous_log_j: np.ndarray, resamples: int, rng: np.random.Generator) -> dict:
    fitted = fit(design, Pairs.of(rows, check.train), start=(full.shift_ratio, full.resolution_gap))
    point = evaluate(rows, design, check, fitted, previous_log_j)
    draws = []
    for _ in range(resamples):
        train, test = resample(rows, check.train, rng), resample(rows, check.test, rng)
        refit = fit(design, Pairs.of(rows, train), start=(fitted.shift_ratio, fitted.resolution_gap))
        draws.append(evaluate(rows, design, Check(check.name, train, test), refit, previous_log_j))
    return {
        "name": check.name,
        "train_rows": len(check.train),
        "test_rows": len(check.test),
        "fit": asdict(fitted) | {"margin": fitted.margin},
        **point,
        "agreement_interval": _interval([d["agreement"] for d in draws]),
        "agreement_previous_interval": _interval([d["agreement_previous"] for d in draws]),
        "confident_agreement_interval": _interval([d["confident_agreement"] for d in draws]),
        "spearman_interval": {name: _interval([d["spearman"].get(name, math.nan) for d in draws]) for name in point["spearman"]},
    }


# ----------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------


def checks(rows: Sequence[Measured]) -> list[Check]:
    """Within the searches, one budget -> another of the same model (FLUX 4x <-> 7x) and one
    model -> another; all searches -> the harness's rows of each model and metric."""
    search = [i for i, r in enumerate(rows) if r.group.startswith("search")]
    harness = [i for i, r in enumerate(rows) if r.group.startswith("harness")]
    out = []
    cells = sorted({(rows[i].arch, rows[i].budget) for i in search})
    for a in cells:
        for b in cells:
            if a != b and a[0] == b[0]:
                out.append(Check(f"search {a[0]} {a[1]:g}x -> search {b[0]} {b[1]:g}x", [i for i in search if (rows[i].arch, rows[i].budget) == a],
                                 [i for i in search if (rows[i].arch, rows[i].budget) == b]))
    archs = sorted({rows[i].arch for i in search})
    for a in archs:
        for b in archs:
            if a != b:
                out.append(Check(f"searches {a} -> searches {b}", [i for i in search if rows[i].arch == a], [i for i in search if rows[i].arch == b]))
    for arch in sorted({rows[i].arch for i in harness}):
        for metric in HARNESS_METRICS:
            test = [i for i in harness if rows[i].arch == arch and rows[i].group.endswith(f", {metric}")]
            if test:
                out.append(Check(f"searches -> harness {arch} rows, {metric}", search, test))
    return out


def fit_all(trials: Sequence[Path], reports: Sequence[Path], resamples: int, seed: int, command: str, schedules: Sequence[str] = ()) -> dict:
    rows = load_trials(trials)
    search_count = len(rows)
    for path in reports:
        rows += load_report(path)
    if not search_count:
        raise ValueError("no scored trial in the --trials files. Fix: pass the quality searches' *-trials.json")
    design = Design.of(rows)
    search = list(range(search_count))
    pairs = Pairs.of(rows, search)
    full = fit(design, pairs)
    rng = np.random.default_rng(seed)
    draws = [fit(design, Pairs.of(rows, resample(rows, search, rng)), start=(full.shift_ratio, full.resolution_gap)) for _ in range(resamples)]
    previous_log_j = design.log_j(PREVIOUS["shift_ratio"], PREVIOUS["resolution_gap"])
    log_j = design.log_j(full.shift_ratio, full.resolution_gap)
    matched = Pairs.of(rows, search, matched=True)
    return {
        "command": command,
        "data": [{"path": str(p), "sha256": file_sha256(p), "rows": sum(r.source == str(p) for r in rows)} for p in [*trials, *reports]],
        "groups": {g: sum(r.group == g for r in rows) for g in sorted({r.group for r in rows})},
        "fit": asdict(full) | {"margin": full.margin},
        "intervals": {
            "shift_ratio": _interval([d.shift_ratio for d in draws]),
            "resolution_gap": _interval([d.resolution_gap for d in draws]),
            "beta": _interval([d.beta for d in draws]),
            "margin": _interval([d.margin for d in draws]),
        },
        "resamples": resamples,
        "seed": seed,
        "in_sample": {
            "pairs": len(pairs),
            "agreement": agreement(pairs.margins(log_j)),
            "agreement_previous": agreement(pairs.margins(previous_log_j)),
            "matched_pairs": len(matched),
            "matched_agreement": agreement(matched.margins(log_j)),
            "matched_agreement_previous": agreement(matched.margins(previous_log_j)),
            "spearman": spearman_by_group(rows, search, log_j),
            "spearman_previous": spearman_by_group(rows, search, previous_log_j),
        },
        "checks": [run_check(rows, design, c, full, previous_log_j, resamples, rng) for c in checks(rows)],
        "ends": ends_evidence(rows, search, log_j),
        "schedules": against_measured(schedules, rows, search, log_j, full),
        "rows": [asdict(r) | {"j": float(np.exp(log_j[i])), "j_previous": float(np.exp(previous_log_j[i]))} for i, r in enumerate(rows)],
    }


# ----------------------------------------------------------------------------------------
# The product's file and the report.
# ----------------------------------------------------------------------------------------

WHY = {
    "resolution_gap": (
        "g: the error a low-resolution estimate brings at a restart, relative to the noise there, is g sqrt(q) s / (1 - s). "
        "Fitted to the order of set-distance scores (FD), which do not count a half-size generation's different composition "
        "as an error the way the paired RMS gap (0.47 on the testbed) does."
    ),
    "shift_ratio": (
        "rho: a step's error is uniform in u = F_{rho h0}(t), so equal steps at shift rho h0 minimise it. rho = 1 is the base "
        "model's own grid, chosen for many steps; with few steps the measured schedules do better at lower shifts "
        "(the plain sampler at 4x: shift 2.16 beat h0 = 3.16)."
    ),
}


def model_file(result: dict, rounding: int = 2) -> dict:
    """``calibrate/progress_model.json``: the terms rounded to what the data resolve (two
    decimals; their intervals are wider), the margin, the data and the command."""
    fitted, intervals = result["fit"], result["intervals"]
    terms = {
        name: {"value": round(fitted[name], rounding), "interval": [round(v, 3) for v in intervals[name]], "why": WHY[name]}
        for name in ("resolution_gap", "shift_ratio")
    }
    verdict = {
        "margin": round(fitted["margin"], 3),
        "confidence": CONFIDENCE,
        "beta": round(fitted["beta"], 3),
        "why": (
            "Bradley-Terry model of the measured orders: a schedule scores better than another with probability "
            "sigmoid(beta ln(J_other / J_this)); the margin is ln(confidence / (1 - confidence)) / beta, the smallest "
            "|ln(J_plain / J_ralu)| at which the better one is named with that probability. Below it: cannot tell."
        ),
    }
    fitted_on = [{k: d[k] for k in ("path", "sha256", "rows")} for d in result["data"] if "trials" in Path(d["path"]).name]
    # The version names the fit (its terms, margin and data), not how the report was asked for.
    version = "fit-" + hashlib.sha256(json.dumps({"terms": terms, "verdict": verdict, "fitted_on": fitted_on}, sort_keys=True).encode()).hexdigest()[:12]
    return {"format": MODEL_FORMAT, "version": version, "terms": terms, "verdict": verdict, "fitted_on": fitted_on,
            "command": result["command"], "report": "reports/progress-fit.md"}


def _slash(values: Sequence[float], digits: int | None = None) -> str:
    return "/".join(f"{v:g}" if digits is None else f"{v:.{digits}f}" for v in values)


def json_safe(value):
    """``value`` with every non-finite float as None (the report's JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _pm(interval: Sequence[float | None], digits: int = 2) -> str:
    return f"[{num(interval[0], digits)}, {num(interval[1], digits)}]"


def render(result: dict, model: dict) -> str:
    fitted, intervals, inside = result["fit"], result["intervals"], result["in_sample"]
    lines = [
        "# The progress model fitted to measured image scores",
        "",
        f"Regenerate: `{result['command']}`",
        "",
        "What this fits and why: docs/method.md §4b (\"Fitted terms\").  Every pair of schedules scored on the same images by the "
        "same metric is one observation of which is better; a Bradley-Terry model, P(a better than b) = sigmoid(beta ln(J_b / J_a)), "
        "is fitted to those orders over the quality searches' trials.  Intervals: 95 % bootstrap over schedules, resampled within "
        f"each group ({result['resamples']} resamples, seed {result['seed']}; a cross-check resamples its fit and test rows alike).",
        "",
        "## Fitted terms",
        "",
        "| term | fitted | 95 % interval | shipped (calibrate/progress_model.json) | before |",
        "|---|---|---|---|---|",
        f"| resolution gap g | {fitted['resolution_gap']:.3f} | {_pm(intervals['resolution_gap'])} | {model['terms']['resolution_gap']['value']} | {PREVIOUS['resolution_gap']} |",
        f"| shift ratio rho | {fitted['shift_ratio']:.3f} | {_pm(intervals['shift_ratio'])} | {model['terms']['shift_ratio']['value']} | {PREVIOUS['shift_ratio']} |",
        f"| order slope beta | {fitted['beta']:.2f} | {_pm(intervals['beta'], 1)} | | |",
        f"| verdict margin ln(19)/beta | {fitted['margin']:.3f} | {_pm(intervals['margin'], 3)} | {model['verdict']['margin']} | 0 (no margin) |",
        "",
        f"Shipped as version `{model['version']}`.",
        "",
        "## In sample (the searches' trials)",
        "",
        f"- Pairs in one group: {inside['pairs']}; J orders {inside['agreement']:.3f} of them as measured (before: {inside['agreement_previous']:.3f}).",
        f"- Pairs of matched cost (same budget, speed-ups within {MATCHED_COST:g}x): {inside['matched_pairs']}; {inside['matched_agreement']:.3f} (before: {inside['matched_agreement_previous']:.3f}).",
        "",
        "| group and budget | Spearman, fitted | before |",
        "|---|---|---|",
        *[f"| {name} | {num(value, 2)} | {num(inside['spearman_previous'].get(name), 2)} |" for name, value in inside["spearman"].items()],
        "",
        "## Cross-checks: fit on one part, predict another",
        "",
        "Agreement is over the test part's pairs of matched cost; \"confident\" pairs differ in J by the fit's margin or more "
        f"(the verdict's rule), and should be ordered right at least {CONFIDENCE:.0%} of the time.",
        "",
        "| check | fit rho, g | test pairs | agreement [95 %] | before [95 %] | confident pairs | confident agreement [95 %] |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["checks"]:
        lines.append(
            f"| {c['name']} | {c['fit']['shift_ratio']:.2f}, {c['fit']['resolution_gap']:.2f} | {c['pairs']} | {num(c['agreement'])} {_pm(c['agreement_interval'])} | "
            f"{num(c['agreement_previous'])} {_pm(c['agreement_previous_interval'])} | {c['confident_pairs']} | {num(c['confident_agreement'])} {_pm(c['confident_agreement_interval'])} |"
        )
    lines += ["", "Rank correlation on each check's test groups (Spearman of J and score, 95 % interval):", ""]
    for c in result["checks"]:
        for name, value in c["spearman"].items():
            lines.append(f"- {c['name']}: {name}: {num(value, 2)} {_pm(c['spearman_interval'][name])}")
    ends = result["ends"]
    correlation = ends["residual_correlation"]
    lines += [
        "",
        "## Stage ends: where the data stop",
        "",
        f"- The searches' {ends['three_stage_rows']} three-stage schedules end their first stage in {_pm(ends['first_end_range'])} and their "
        f"second in {_pm(ends['second_end_range'])}.",
        f"- Residuals of the fitted J (per group, ln score = a + b ln J by least squares) correlate with the first end {num(correlation['first_end'], 2)} "
        f"and with the second {num(correlation['second_end'], 2)}: later ends score worse than J says.",
        *[f"- The {b['schedules']} best whole-set schedules at {budget}: first end {_pm(b['first_end'])}, second {_pm(b['second_end'])}." for budget, b in ends["best"].items()],
    ]
    if result["schedules"]:
        lines += [
            "",
            "## Schedules beside the measured ones",
            "",
            "J under the fitted terms (lower is better) of each schedule and of the plain sampler its budget affords (at h0), the best measured "
            "schedule of the nearest searched budget (whole image set, three stages), and the measured schedule nearest in structure (step shares, "
            "ends, r) with its rank by score there.  A schedule at 1024 px and one on the 64 px testbed differ in steps, so only structure carries over.",
            "",
            "| schedule | steps | ends | shifts / h0 | Z | r | J | plain: steps, J | best measured: steps, ends, score, J | nearest measured: steps, ends, r, Z, score (rank), J |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in result["schedules"]:
            best = f"{_slash(s['best']['steps'])}, {_slash(s['best']['ends'])}, {s['best']['score']:.1f}, {s['best']['j']:.3f}" if s.get("best") else "n/a"
            near = s.get("nearest")
            nearest = (f"{_slash(near['steps'])}, {_slash(near['ends'])}, {near['up_ratio']:g}, {near['z']:.2f}, {near['score']:.1f} ({near['rank']} of {s['measured_schedules']}), "
                       f"{near['j']:.3f}") if near else "n/a"
            lines.append(f"| `{s['schedule']}` | {_slash(s['steps'])} | {_slash(s['ends'])} | {_slash(s['shifts_over_h0'], 2)} | {s['z']:.2f} | {s['up_ratio']:g} | "
                         f"{s['j']:.3f} | {s['plain_steps']}, {s['j_plain']:.3f} | {best} | {nearest} |")
    lines += ["", "## Data", "", "| file | SHA-256 | rows |", "|---|---|---|"]
    lines += [f"| `{d['path']}` | `{d['sha256'][:12]}` | {d['rows']} |" for d in result["data"]]
    lines += ["", "| group | rows |", "|---|---|", *[f"| {g} | {n} |" for g, n in result["groups"].items()], ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=MODULE, description="Fit the progress model's free terms to measured image scores (docs/method.md §4b).")
    parser.add_argument("--trials", type=Path, nargs="+", required=True, help="quality searches' *-trials.json files (the fit's data)")
    parser.add_argument("--report", type=Path, action="append", default=[], help="ralu-bench quality report JSON (cross-checked, not fitted); repeatable")
    parser.add_argument("--out-dir", type=Path, default=Path("reports"), help="where progress-fit.md/.json go (default reports)")
    parser.add_argument("--model-out", type=Path, default=Path("calibrate/progress_model.json"), help="the product's fitted-model file (default calibrate/progress_model.json)")
    parser.add_argument("--schedule", action="append", default=[], metavar="NAME",
                        help="a shipped schedule name or file to set beside the measured schedules (J, the plain sampler's J, nearest measured neighbour); repeatable")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in [*args.trials, *args.report]:
        if not path.is_file():
            return fail(MODULE, f"no file {path}. Fix: give the trials and report files that exist")
    if args.resamples < 1:
        return fail(MODULE, "--resamples must be at least 1")
    command = " ".join([MODULE, "--trials", *map(shlex.quote, map(str, args.trials)), *[a for p in args.report for a in ("--report", shlex.quote(str(p)))],
                        *[a for name in args.schedule for a in ("--schedule", shlex.quote(name))],
                        *(["--out-dir", str(args.out_dir)] if args.out_dir != Path("reports") else []),
                        *(["--resamples", str(args.resamples)] if args.resamples != 200 else []), *(["--seed", str(args.seed)] if args.seed else [])])
    try:
        result = fit_all(args.trials, args.report, args.resamples, args.seed, command, args.schedule)
    except (ValueError, KeyError) as error:
        return fail(MODULE, error)
    result = json_safe(result)
    model = model_file(result)
    result["model"] = model
    write_text_atomic(args.model_out, json.dumps(model, indent=2) + "\n")
    md, js = write_report(args.out_dir, "progress-fit", render(result, model), result)
    print(f"wrote {args.model_out} (version {model['version']}), {md}, {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
