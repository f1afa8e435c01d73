"""What ``reports/quality.json`` holds: the report's typed records.

The metric summaries (mean and spread across seeds of every metric, and the pooled FD) are
declared once, in :class:`MetricSummary`; a method's row and a sweep point add their own
fields around them (pydantic orders fields base class first, last base first).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """A part of the report: exactly these fields, in this order in the JSON."""

    model_config = ConfigDict(extra="forbid")


class MetricSummary(Record):
    """Mean over seeds and standard deviation across seeds (None for one seed, or for a metric
    that does not apply, such as PSNR without a baseline); FD also over all seeds' images pooled."""

    psnr: float | None
    psnr_std: float | None
    ssim: float | None
    ssim_std: float | None
    fd: float | None
    fd_std: float | None
    accuracy: float | None
    accuracy_std: float | None
    edge_artifacts: float | None
    edge_artifacts_std: float | None
    edge_artifacts_4x4: float | None
    edge_artifacts_4x4_std: float | None
    fd_pooled: float


class _MethodHead(Record):
    method: str  # "baseline", "base-steps", ..., "schedule:NAME"
    label: str
    budget: int | float  # nominal budget (1 for the baseline)
    flops_speedup_total: float
    flops_speedup_linear: float
    tflops_total: float
    forwards: int


class _MethodTail(Record):
    seeds: list[int]
    images_per_seed: int
    seconds: float
    details: dict[str, Any]


class MethodRow(_MethodTail, MetricSummary, _MethodHead):
    """One row of the results: a method at a budget, its measured cost and its metrics."""


class Reference(Record):
    """Real images against the real reference: the floor of FD and blocking."""

    describe: str
    fd: float
    fd_std: float | None
    fd_pooled: float
    accuracy: float
    accuracy_std: float | None
    edge_artifacts: float
    edge_artifacts_std: float | None
    edge_artifacts_4x4: float
    edge_artifacts_4x4_std: float | None


class _SweepSetting(Record):
    z: float
    c: float
    js_distance: float
    shifts: list[float]
    starts: list[float]


class SweepPoint(MetricSummary, _SweepSetting):
    """RALU (exact noise) at one noise strength Z, shifts re-optimised with Z fixed."""


class SweepLayout(Record):
    steps: list[int]
    ends: list[float]
    up_ratio: float


class GlobalOptimum(Record):
    z: float
    js_distance: float


class BestZ(Record):
    """The Z of the sweep that is best by each criterion."""

    divergence: float
    fd: float
    accuracy: float
    psnr: float
    ssim: float


class Sweep(Record):
    budget: int
    layout: SweepLayout
    seeds: list[int]
    images_per_seed: int
    global_optimum: GlobalOptimum
    points: list[SweepPoint]
    best_z: BestZ


class Winner(Record):
    """The best method by one metric at one budget, and how RALU fares against the peers."""

    best: str
    value: float
    runner_up: str | None
    margin: float | None
    separable: bool
    best_ralu: str | None
    best_peer: str | None
    ralu_beats_peers: bool


class Testbed(Record):
    size: int
    full_tokens: int
    half_tokens: int
    text_tokens: int
    h0: float
    guidance_scale: float
    forward_flops: dict[str, dict[str, float]]  # by image-token count: total and linear FLOPs
    baseline_tflops_total: float
    edge_decode_flops: float
    weights: dict[str, Any]  # folders, training records and file times
    threads: int


class QualityReport(Record):
    """``reports/quality.json``."""

    command: str
    created: str
    wall_seconds: float
    config: dict[str, Any]  # the run's Config
    testbed: Testbed
    rows: list[MethodRow]
    reference: Reference
    sweep: Sweep | None
    winners: dict[str, dict[str, Winner]]  # by budget, then metric
