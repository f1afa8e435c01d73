"""What ``reports/quality.json`` holds: the typed records of a v2 run."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_serializer


class Record(BaseModel):
    """A part of the report: exactly these fields, in this order in the JSON."""

    model_config = ConfigDict(extra="forbid")
    #: Fields added after reports that lack them were written: left out of the JSON while None
    #: or empty, so that an earlier report reads and writes back byte for byte.
    LATER_FIELDS: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_empty_later_fields(self, handler):
        data = handler(self)
        for name in self.LATER_FIELDS:
            if data.get(name) in (None, []):
                data.pop(name, None)
        return data


class Estimate(Record):
    """A metric over the images of all seeds pooled, its 95 % interval (a pairs cluster
    bootstrap over the seeds; over images with one seed), its value per seed and their
    standard deviation (None for one seed)."""

    value: float
    low: float
    high: float
    seed_std: float | None
    per_seed: list[float]


class Row(Record):
    """One row: a method (with a cache, for cache rows) at a budget of one architecture."""

    arch: str
    method: str
    label: str
    budget: int | float
    cache: str | None
    uncached: str | None  # the row a cache row is compared with
    flops_speedup_total: float | None  # None for cache rows (what a cache skips is counted in linear FLOPs only)
    flops_speedup_linear: float
    gflops_total: float | None
    gflops_linear: float
    decoder_gflops: float
    forwards: float  # transformer forwards per image (SD3: both guidance branches of a step in one forward)
    decodes: dict[str, float]  # decodes per image by output size
    metrics: dict[str, Estimate]
    seeds: list[int]
    images_per_seed: int
    seconds: float
    reused: bool  # every batch came from the work folder
    details: dict[str, Any]


class Half(Record):
    """A comparison repeated on one half of the seeds (the replication check)."""

    seeds: list[int]
    difference: float
    low: float
    high: float
    verdict: str


class Verdict(Record):
    """Row ``a`` against row ``b`` on one metric, paired over the same images: ``difference`` =
    metric(a) - metric(b) with its 95 % interval (a pairs cluster bootstrap over the seeds),
    and the same comparison on each half of the seeds (empty where there are no halves)."""

    arch: str
    budget: int | float
    metric: str
    question: str
    a: str
    b: str
    a_value: float
    b_value: float
    difference: float
    low: float
    high: float
    verdict: str  # "<a> better", "<b> better" or "not separable"
    halves: list[Half] = []

    LATER_FIELDS = ("halves",)


class RegimeMetric(Record):
    metric: str
    baseline: float
    fewer_steps: float
    difference: float  # fewer steps - baseline
    low: float
    high: float
    verdict: str
    seed_spread: float | None
    beyond_spread: bool
    worse: bool  # worse for fewer steps with 95 % confidence and beyond the spread across seeds
    halves: list[Half] = []

    LATER_FIELDS = ("halves",)


class Regime(Record):
    """At the largest budget: is the plain pipeline with fewer steps worse than the baseline?"""

    arch: str
    budget: int | float
    baseline_steps: int
    fewer_steps: int
    metrics: list[RegimeMetric]
    passed: bool


class CacheEffect(Record):
    """A cache on a row: speed-up gained (linear FLOPs executed, decoder included) and the quality change."""

    arch: str
    budget: int | float
    method: str  # the uncached row
    cache: str
    speedup_uncached: float
    speedup_cached: float
    gain: float  # speedup_cached / speedup_uncached
    verdicts: list[Verdict]  # cached against uncached, per metric
    #: RALU rows only: the cached row against the plain pipeline with fewer steps (the budget's
    #: uncached base-steps row), on SCHEDULE_METRICS: what a cache on RALU is worth at about the plain sampler's cost
    plain_speedup: float | None = None
    against_plain: list[Verdict] = []


class SweepPoint(Record):
    z: float
    c: float
    js_distance: float
    shifts: list[float]
    metrics: dict[str, Estimate]


class Sweep(Record):
    arch: str
    budget: int | float
    seeds: list[int]
    images_per_seed: int
    global_z: float
    points: list[SweepPoint]


class ArchTestbed(Record):
    arch: str
    pipeline: str
    base_steps: int
    h0: float
    guidance_scale: float
    guidance_branches: int  # transformer rows per image and step (SD3's classifier-free guidance: 2)
    full_tokens: int
    half_tokens: int
    text_tokens: int
    forward_gflops: dict[str, dict[str, float]]  # by image-token count, batch 1: total and linear
    decode_gflops: dict[str, dict[str, float]]  # by output size
    baseline_gflops_total: float
    baseline_gflops_linear: float
    budgets: list[int]
    staged_peers: bool


class Intervals(Record):
    """What the run's intervals resample."""

    unit: str  # "seeds": a pairs cluster bootstrap over the seeds; "images": one seed, images resampled
    seeds: int
    widening: float | None  # the few-clusters factor (metrics.few_clusters_scale); None for images
    resamples: int
    set_resamples: int


class ReplicatedVerdict(Record):
    """A verdict that names a winner on all seeds, and what each half of the seeds says."""

    arch: str
    budget: int | float
    question: str
    metric: str
    a: str
    b: str
    verdict: str
    difference: float
    low: float
    high: float
    halves: list[Half]
    replicated: bool  # in each half the winner is better by the point estimate and the other row is not named at 95 %
    strict: bool  # the winner is named at 95 % in both halves


class ReplicationGroup(Record):
    """The replication check's counts for one question and metric."""

    question: str
    metric: str
    verdicts: int
    claimed: int
    replicated: int
    strict: int
    share: float | None  # replicated / claimed; None when nothing was claimed


class Replication(Record):
    """Every verdict recomputed on each half of the seeds: how many of those that name a winner hold in both."""

    definition: str
    halves: list[list[int]]
    unit: str  # what the halves' intervals resample ("seeds", or "images" for a half of one seed)
    verdicts: int
    claimed: int
    replicated: int
    strict: int
    share: float | None  # replicated / claimed; None when nothing was claimed
    strict_share: float | None
    groups: list[ReplicationGroup]
    claims: list[ReplicatedVerdict]


class HeldoutSeedsRow(Record):
    """A row sampled on the held-out seeds (no PSNR/SSIM: no baseline is sampled there)."""

    arch: str
    method: str
    label: str
    budget: int | float
    metrics: dict[str, Estimate]


class HeldoutSeeds(Record):
    """``--schedule`` rows against the plain pipeline with fewer steps, Bottleneck Sampling and
    the published preset on seeds no choice was made on, reported last."""

    seeds: list[int]
    images_per_seed: int
    unit: str  # what the intervals resample
    rows: list[HeldoutSeedsRow]
    verdicts: list[Verdict]


class V2Report(Record):
    """``reports/quality.json``."""

    command: str
    created: str
    wall_seconds: float
    config: dict[str, Any]
    weights: dict[str, Any]
    testbed: dict[str, ArchTestbed]
    reference: dict[str, Estimate]  # real scenes (same labels) against the real reference
    rows: list[Row]
    verdicts: list[Verdict]
    regime: dict[str, Regime]
    caches: list[CacheEffect]
    sweeps: list[Sweep]
    # reports before issue 28 have none of these
    intervals: Intervals | None = None
    replication: Replication | None = None
    heldout: HeldoutSeeds | None = None

    LATER_FIELDS = ("intervals", "replication", "heldout")
