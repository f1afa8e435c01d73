"""What ``reports/speed.json`` holds: the report's typed rows and the targets they are judged by."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_serializer

REPORT_NAME = "speed"
#: Targets of the issue: runtime overhead per image, wall-clock vs total-FLOPs speed-up.
OVERHEAD_TARGET = 0.03
WALL_FLOPS_TOLERANCE = 0.10

#: Why the plain pipeline has no MagCache row (the report prints it).
NO_PLAIN_MAGCACHE = (
    "MagCache has no plain-pipeline row: its ratio table belongs to one step grid, ralu.calibrate.magcache measures it "
    "through the RALU pipeline's per-stage callback (the plain pipeline has no stages to report), and the quality "
    "harness, whose settings these rows reuse, declares no plain MagCache row either."
)
#: Why SD3 has no plain-pipeline cache rows.
NO_PLAIN_SD3 = "SD3's plain pipeline opens no cache context, which diffusers' cache hooks need: SD3 caches run on RALU rows only."

#: Why a family runs fewer cache kinds than FLUX.1 (FirstBlockCache, TaylorSeer, MagCache).
CACHES_LEFT_OUT = {
    "chroma": "TaylorSeer only: FirstBlockCache and MagCache find the image stream through diffusers' transformer-block "
              "registry, which in diffusers 0.42.1 has no Chroma block (\"Model class ... not registered\").",
    "flux2": "no FirstBlockCache: diffusers 0.42.1's hook fails on FLUX.2's blocks (ralu.runtime.cache refuses it).",
    "flux2-klein": "no FirstBlockCache: diffusers 0.42.1's hook fails on FLUX.2's blocks (ralu.runtime.cache refuses it).",
}


def no_plain_context(families: list[str]) -> str:
    """Why these families (FLUX.1 Kontext, Chroma, FLUX.2 dev: their diffusers pipelines) have
    no plain-pipeline cache rows."""
    return (f"The plain pipelines of {', '.join(families)} open no cache context, which diffusers' cache hooks need: "
            "their caches run on RALU rows only.")

#: The runtime's overhead sections, as the report names them.
OVERHEAD_LABELS = {
    "edge_decode": "edge decode (Tweedie, VAE)",
    "edge_select": "Canny + top-k",
    "noise": "noise",
    "gather_scatter": "gather/scatter",
    "positions": "positions",
}


#: Sections of :class:`SpeedReport` a report may lack (runs before they existed, or not asked for).
OPTIONAL_SECTIONS = ("cache_rows", "compile_rows")


class Record(BaseModel):
    """A part of the report: exactly these fields, in this order in the JSON."""

    model_config = ConfigDict(extra="forbid")


class OverheadItem(Record):
    seconds: float  # mean per image
    fraction: float  # of the summed RALU time


class Overhead(Record):
    """The runtime's own sections over all profiled runs of one schedule."""

    runs: int
    total_seconds: float
    overhead_seconds: float
    overhead_fraction: float
    items: dict[str, OverheadItem]
    transformer_seconds: float
    other_seconds: float


class Targets(Record):
    overhead_under_3_percent: bool
    wall_within_10_percent_of_flops: bool
    cpu_time_within_10_percent_of_flops: bool | None
    memory_within_bound: bool | None


class ScheduleRow(Record):
    """One measured schedule: FLOPs speed-ups (real and as run), timings, overhead, memory."""

    schedule: str
    family: str
    model: str
    steps: list[int]
    up_ratio: float
    base_steps: int
    stage_image_tokens: list[int]
    flops_speedup_total: float
    flops_speedup_linear: float
    paper_speedup_linear: float | None
    real_edge_decode_fraction_total: float
    real_edge_decode_fraction_linear: float
    config_flops_speedup_total: float
    config_flops_speedup_linear: float
    config_edge_decode_fraction_total: float
    config_ralu_tflops_total: float
    baseline_seconds: float
    ralu_seconds: float
    ralu_seconds_all: list[float]
    ralu_cpu_seconds_all: list[float]
    wall_speedup: float
    wall_over_flops: float
    cpu_time_speedup: float | None
    cpu_time_over_flops: float | None
    timing_basis: str  # "cpu" or "wall"
    forward_time_speedup: float | None
    machine_factor: float | None
    runtime_factor: float | None
    overhead_fraction: float
    overhead: Overhead
    peak_mem_ratio: float | None
    peak_mem_bound_ratio: float | None
    peak_bytes: int | None
    peak_total_bytes: int | None
    peak_mem_ratio_total: float | None
    targets: Targets


class Baseline(Record):
    """The plain pipeline at one step count."""

    family: str
    steps: int
    seconds: list[float]
    median_seconds: float
    cpu_seconds: list[float]
    median_cpu_seconds: float
    image_tokens: int
    config_tflops: float
    peak_bytes: int | None
    peak_total_bytes: int | None


class EdgeDecode(Record):
    """The half-size VAE decode of the edge detection, alone."""

    config_tflops_total: float
    config_tflops_linear: float
    seconds: float
    cpu_seconds: float
    peak_bytes: int | None


class Throughput(Record):
    """Bare transformer evaluations at one token count."""

    image_tokens: int
    path: str  # "forward" or "token path"
    seconds: float
    cpu_seconds: float
    tflops_total: float
    gflops_per_second: float


class AttentionShare(Record):
    config: float
    real: float


class LoadAverage(Record):
    start: list[float] | None
    end: list[float] | None


class SpeedReport(Record):
    """``reports/speed.json``."""

    command: str
    config: dict[str, Any]  # the BenchConfig, families with their derived cfg and batch
    rows: list[ScheduleRow]
    baselines: dict[str, Baseline]  # by "family-steps"
    edge_decode: dict[str, EdgeDecode]  # by family
    forward_throughput: dict[str, list[Throughput]]  # by family
    real_transformer_bf16_bytes: dict[str, int]
    attention_share: dict[str, AttentionShare]
    memory_method: str | None
    machine: dict[str, Any]
    load_average: LoadAverage
    timing: str
    elapsed_seconds: float
    created: str
    #: Added after the first committed report: left out of the JSON when absent, so an older
    #: ``speed.json`` reads and writes back byte for byte.
    cache_rows: list[CacheRow] | None = None
    compile_rows: list[CompileRow] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_sections(self, handler):
        data = handler(self)
        for key in OPTIONAL_SECTIONS:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class CacheRow(Record):
    """One method with (or, ``cache == "none"``, the plain row of equal cost without) a step cache:
    its timings and the transformer's linear FLOPs that really executed (an untimed pass)."""

    schedule: str  # the RALU schedule whose budget the row shares
    family: str
    method: str  # "ralu" or "plain"
    cache: str  # a kind of ralu.runtime.cache, or "none"
    settings: str | None  # how the quality harness describes the cache's settings
    steps: list[int]  # RALU: per stage; plain: [steps]
    base_steps: int
    seconds_all: list[float]
    cpu_seconds_all: list[float]
    seconds: float
    cpu_seconds: float
    wall_speedup: float  # against the uncached plain pipeline at base_steps
    cpu_time_speedup: float | None
    wall_gain: float | None  # against the same method uncached
    cpu_time_gain: float | None
    executed_linear_tflops: float
    uncached_linear_tflops: float  # the same method without the cache
    baseline_linear_tflops: float  # the plain pipeline at base_steps
    flops_speedup: float  # baseline / executed
    flops_gain: float  # uncached / executed
    mag_ratios: list[list[float]] | None = None


class CompileRow(Record):
    """One method with its transformer compiled (``transformer.compile``), timed after untimed
    warm-up calls (where compilation happens); or why it could not run."""

    family: str
    method: str  # "plain" or "ralu"
    schedule: str | None  # RALU rows
    steps: list[int]
    backend: str
    error: str | None = None  # one line when compilation failed on this device
    seconds_all: list[float] = []
    cpu_seconds_all: list[float] = []
    seconds: float | None = None
    cpu_seconds: float | None = None
    wall_speedup: float | None = None  # against the uncompiled plain pipeline at the same steps
    cpu_time_speedup: float | None = None
    wall_gain: float | None = None  # against the same method uncompiled
    cpu_time_gain: float | None = None
    warmup_seconds: float | None = None  # the untimed calls: compilation
    graphs_compiled: int | None = None  # by the warm-up calls (dynamo's unique_graphs)
    recompiles: int | None = None  # graphs compiled during the timed calls (0: none)
    graph_breaks: int | None = None


SpeedReport.model_rebuild()  # its optional sections are declared below it
