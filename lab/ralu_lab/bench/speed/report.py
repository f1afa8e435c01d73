"""``reports/speed.md`` from the typed :class:`~ralu_lab.bench.speed.schema.SpeedReport`.

Each table is a list of columns, declared once.  ``python -m ralu_lab.bench.speed.report
reports/speed.json`` prints the Markdown of a saved report (without torch).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass

from ralu.calibrate.presets import PAPER_SIZE
from ralu.runtime.models import get_model
from ralu_lab.bench.common import (
    Column,
    mark,
    mib,
    num,
    pct,
    render_from_json,
    table,
    times,
)
from ralu_lab.bench.speed.schema import (
    CACHES_LEFT_OUT,
    NO_PLAIN_MAGCACHE,
    NO_PLAIN_SD3,
    OVERHEAD_LABELS,
    OVERHEAD_TARGET,
    WALL_FLOPS_TOLERANCE,
    CacheRow,
    CompileRow,
    ScheduleRow,
    SpeedReport,
    no_plain_context,
)

#: Measured during development (see :func:`render_markdown`): the runtime changes of the
#: speed work, before/after on the reduced-width CPU configuration.  Not regenerated: the
#: "before" code no longer exists.
OPTIMISATION_LOG: list[str] = [
    "Measured on this machine with the reduced-width configuration, RALU calls alone, 3 runs each, medians,",
    "before and after the changes (the baseline pipelines are untouched). Outputs are bit-identical before and",
    "after (`torch.equal` on the latents of flux-dev-7x and sd3-medium-3x).",
    "",
    "| change | where | before | after |",
    "|---|---|---|---|",
    "| timesteps as one per-stage device tensor, not a `torch.tensor(..., device=)` per step | `sampler.timestep_table`, FLUX and SD3 stage models | 1 host-to-device copy (a CUDA synchronisation) per step | 1 per stage, 0 per step |",
    "| SD3 mixed stage: position embeddings (sin-cos at fractional positions, float64) and the CFG copies made once per stage "
    "| `sd3.py` stage model, `sd3_tokens.token_forward(position_embeds=)` "
    "| every step: the evaluation, 3 synchronisations (range and integrality checks), 2 concatenations; 40-60 ms per step at SD3-medium width on one CPU core "
    "| once per stage; 0 synchronisations per step |",
    "| the canvas scattered once per stage end, not again at the transition | `sampler.run_stages` | 2 scatters per transition | 1 |",
    "| single-resolution layouts gather/scatter only their own resolution | `TokenLayout.gather/scatter` | both canvases built and zeroed, then `torch.where` | one canvas, written in place |",
    "| gather/scatter per image, flux-dev-7x / sd3-medium-3x | (the two rows above) | 12.4 ms / 37.4 ms | 7.6 ms / 32.0 ms |",
    "",
    "What remains per image: a handful of synchronisations per stage (token-layout bookkeeping, the renoise",
    "check, the edge selection's copy of the decoded image to the CPU for OpenCV), none per step. The state",
    "stays float32 between steps (one cast to the model dtype and back per step, as the diffusers scheduler",
    "does for its own step).",
]


#: How the summary names the real models of the first report (the others by their registry name).
_MODEL_TITLES = {"flux-dev": "FLUX.1-dev", "sd3-medium": "SD3-medium"}

#: Classes of the reports written before the families carried them.
_OLD_CLASSES = {
    "flux": ("FluxTransformer2DModel", "FluxPipeline", "RALUFluxPipeline"),
    "sd3": ("SD3Transformer2DModel", "StableDiffusion3Pipeline", "RALUStableDiffusion3Pipeline"),
}


def _classes(family: dict) -> tuple[str, str, str]:
    """Transformer, base pipeline and RALU pipeline class of a report's family."""
    old = _OLD_CLASSES.get(family["family"], ("", "", ""))
    return family.get("transformer_class") or old[0], family.get("base_pipeline") or old[1], family.get("ralu_pipeline") or old[2]


def _blocks(family: dict) -> str:
    t = family["transformer"]
    if "num_single_layers" in t:
        return f"{t['num_layers']} dual-stream + {t['num_single_layers']} single-stream blocks"
    if family["family"] == "sd3":
        return f"{t['num_layers']} joint blocks"
    return f"{t['num_layers']} dual-stream blocks"


def _guidance(family: dict) -> str:
    parts = []
    if family.get("guidance_scale") is not None:
        parts.append(f"guidance scale {family['guidance_scale']}")
    if family.get("true_cfg_scale") is not None:
        parts.append(f"true CFG scale {family['true_cfg_scale']}")
    return ", ".join(parts) or "no guidance"


def _family_line(family: dict, size: int) -> str:
    t = family["transformer"]
    cls = _classes(family)[0]
    width = t["num_attention_heads"] * t["attention_head_dim"]
    full = get_model(family["model"]).image_tokens(size, size)
    if not family["cfg"]:
        cfg = ""
    elif family["family"] == "sd3":
        cfg = "; classifier-free guidance (the transformer batch is doubled, as in the real pipeline)"
    else:
        cfg = "; classifier-free guidance (a second, negative-prompt forward every step, as in the real pipeline)"
    pooled = f", pooled {family['pooled_dim']}" if family.get("pooled_dim") else ""
    reference = (f"; a reference image of {family['reference_tokens']} tokens (as latents, the output's size) in every forward of both "
                 "pipelines, counted in the configuration's FLOPs") if family.get("reference_tokens") else ""
    return (
        f"* **{family['family']}** (schedules `{family['model']}-*`): `{cls}` with {_blocks(family)}, "
        f"{t['num_attention_heads']} head(s) x {t['attention_head_dim']} (width {width}), text {family['text_tokens']} tokens x "
        f"{family['text_dim']}{pooled}, {_guidance(family)}; {full} image tokens at full "
        f"resolution, {full // 4} in the low-res stage{cfg}{reference}."
    )


def _other_vae_lines(config: dict, size: int) -> list[str]:
    """The VAEs that are not FLUX.1's / SD3's AutoencoderKL shape (FLUX.2's, Qwen-Image's)."""
    lines, seen = [], set()
    for family in config["families"]:
        cls, vae = family.get("vae_class", "AutoencoderKL"), family.get("vae") or {}
        if cls == "AutoencoderKL" or cls in seen:
            continue
        seen.add(cls)
        real = get_model(family["model"])
        real_vae, edge_side = real.architecture.vae, size // (2 * real.vae_scale_factor)
        users = ", ".join(f["family"] for f in config["families"] if f.get("vae_class") == cls)
        if cls == "AutoencoderKLQwenImage":
            shape = (f"a causal 3-D VAE decoding one frame, base width {vae['base_dim']} x {list(vae['dim_mult'])} (real: "
                     f"{real_vae['base_dim']} x {list(real_vae['dim_mult'])}), {vae['num_res_blocks']} residual blocks per stage, "
                     f"{real.latent_channels} latent channels")
        else:
            shape = (f"the real layout ({len(vae['block_out_channels'])} decoder up blocks, {vae['layers_per_block']} layers per block, "
                     f"{vae['latent_channels']} latent channels, quant convs, BatchNorm over the 2x2-patchified latent) at block widths "
                     f"{list(vae['block_out_channels'])} (real: {list(real_vae['block_out_channels'])}), {vae['norm_num_groups']} norm groups")
        lines.append(f"* VAE of {users}: `{cls}`, {shape}; the edge decode turns a {edge_side}x{edge_side} latent into a "
                     f"{size // 2}x{size // 2} image.")
    return lines


def _pipelines_line(config: dict) -> str:
    classes = [_classes(family) for family in config["families"]]
    bases = " / ".join(f"`{base}`" for _, base, _ in classes)
    ralus = " / ".join(f"`{ralu}.from_pipe(pipe, dtype=...)`" for _, _, ralu in classes)
    return f"* Baseline: {bases} with the schedules' base steps; RALU: {ralus} with `schedule=NAME`."


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _memory_ratio(row: ScheduleRow) -> str:
    return "n/a" if row.peak_mem_ratio is None else f"{row.peak_mem_ratio:.2f} ({num(row.peak_mem_bound_ratio, 2)})"


def _steps(values: list[int]) -> str:
    return "/".join(map(str, values))


# ----------------------------------------------------------------------------------------
# The tables (CPU runs add the CPU-time columns).
# ----------------------------------------------------------------------------------------


def summary_columns(cpu: bool) -> list[Column]:
    return [
        Column("schedule", lambda r: r.schedule),
        Column("steps", lambda r: _steps(r.steps)),
        Column("r", lambda r: str(r.up_ratio)),
        Column("real FLOPs total", lambda r: times(r.flops_speedup_total)),
        Column("real FLOPs linear", lambda r: times(r.flops_speedup_linear)),
        Column("paper", lambda r: times(r.paper_speedup_linear)),
        Column("config FLOPs", lambda r: times(r.config_flops_speedup_total)),
        Column("wall", lambda r: f"**{times(r.wall_speedup)}**"),
        Column("wall / FLOPs", lambda r: num(r.wall_over_flops)),
        *([Column("CPU time", lambda r: f"**{times(r.cpu_time_speedup)}**"), Column("CPU / FLOPs", lambda r: num(r.cpu_time_over_flops))] if cpu else []),
        Column("overhead", lambda r: pct(r.overhead_fraction, 2)),
        Column("peak memory ratio (bound)", _memory_ratio),
    ]


def target_columns(cpu: bool) -> list[Column]:
    return [
        Column("schedule", lambda r: r.schedule),
        Column("overhead < 3 %", lambda r: mark(r.targets.overhead_under_3_percent)),
        Column("wall within 10 % of FLOPs", lambda r: f"{mark(r.targets.wall_within_10_percent_of_flops)} ({num(r.wall_over_flops)})"),
        *([Column("CPU time within 10 % of FLOPs", lambda r: f"{mark(r.targets.cpu_time_within_10_percent_of_flops)} ({num(r.cpu_time_over_flops)})")] if cpu else []),
        Column("memory within bound", lambda r: mark(r.targets.memory_within_bound)),
    ]


def factor_columns(cpu: bool, basis: str) -> list[Column]:
    return [
        Column("schedule", lambda r: r.schedule),
        Column("config FLOPs", lambda r: times(r.config_flops_speedup_total)),
        Column("predicted by bare evaluations", lambda r: times(r.forward_time_speedup)),
        Column(f"measured ({basis})", lambda r: times(r.cpu_time_speedup if cpu else r.wall_speedup)),
        Column("machine factor", lambda r: num(r.machine_factor)),
        Column("runtime factor", lambda r: num(r.runtime_factor)),
    ]


def _overhead_item(key: str):
    def cell(row: ScheduleRow) -> str:
        item = row.overhead.items[key]
        return f"{1000 * item.seconds:.1f} ms ({pct(item.fraction, 2)})"

    return cell


OVERHEAD_COLUMNS: list[Column] = [
    Column("schedule", lambda r: r.schedule),
    Column("RALU s", lambda r: f"{r.overhead.total_seconds:.2f}"),
    *(Column(label, _overhead_item(key)) for key, label in OVERHEAD_LABELS.items()),
    Column("overhead", lambda r: f"**{pct(r.overhead.overhead_fraction, 2)}**"),
    Column("transformer", lambda r: pct(r.overhead.transformer_seconds / r.overhead.total_seconds)),
    Column("other", lambda r: pct(r.overhead.other_seconds / r.overhead.total_seconds, 2)),
]


@dataclass(frozen=True)
class TimingLine:
    """A line of the absolute timings: a plain pipeline or a schedule."""

    method: str
    tokens: str
    tflops: float
    median_seconds: float
    seconds: list[float]
    median_cpu_seconds: float
    cpu_seconds: list[float]


def timing_columns(cpu: bool) -> list[Column]:
    return [
        Column("method", lambda r: r.method),
        Column("image tokens per stage", lambda r: r.tokens),
        Column("config TFLOPs", lambda r: f"{r.tflops:.3f}"),
        Column("median wall s", lambda r: f"{r.median_seconds:.2f}"),
        Column("wall runs (s)", lambda r: _runs(r.seconds)),
        *([Column("median CPU s", lambda r: f"{r.median_cpu_seconds:.2f}"), Column("CPU runs (s)", lambda r: _runs(r.cpu_seconds))] if cpu else []),
    ]


def timing_lines(report: SpeedReport) -> list[TimingLine]:
    lines = [
        TimingLine(f"plain {b.family} pipeline, {b.steps} steps", str(b.image_tokens), b.config_tflops, b.median_seconds, b.seconds, b.median_cpu_seconds, b.cpu_seconds)
        for b in report.baselines.values()
    ]
    lines += [
        TimingLine(r.schedule, _steps(r.stage_image_tokens), r.config_ralu_tflops_total, r.ralu_seconds, r.ralu_seconds_all,
                   statistics.median(r.ralu_cpu_seconds_all), r.ralu_cpu_seconds_all)
        for r in report.rows
    ]
    return lines


@dataclass(frozen=True)
class ThroughputLine:
    """A line of the bare evaluations: a transformer forward or the edge decode."""

    family: str
    tokens: str
    path: str
    tflops: float
    seconds: float
    cpu_seconds: float
    gflops_per_second: float


THROUGHPUT_COLUMNS: list[Column] = [
    Column("family", lambda r: r.family),
    Column("image tokens", lambda r: r.tokens),
    Column("evaluated by", lambda r: r.path),
    Column("TFLOPs (total)", lambda r: f"{r.tflops:.4f}"),
    Column("median wall s", lambda r: f"{r.seconds:.3f}"),
    Column("median CPU s", lambda r: f"{r.cpu_seconds:.3f}"),
    Column("GFLOP/s", lambda r: f"{r.gflops_per_second:.1f}"),
]


def throughput_lines(report: SpeedReport, cpu: bool) -> list[ThroughputLine]:
    size = report.config['size']
    lines = []
    for family, entries in report.forward_throughput.items():
        lines += [ThroughputLine(family, str(e.image_tokens), e.path, e.tflops_total, e.seconds, e.cpu_seconds, e.gflops_per_second) for e in entries]
        decode = report.edge_decode[family]
        basis = decode.cpu_seconds if cpu else decode.seconds
        lines.append(ThroughputLine(family, f"edge decode, {size // 2}x{size // 2} image", "VAE decode", decode.config_tflops_total, decode.seconds,
                                    decode.cpu_seconds, decode.config_tflops_total * 1e3 / basis))
    return lines


def baseline_memory_columns(report: SpeedReport) -> list[Column]:
    return [
        Column("family", lambda b: b.family),
        Column("plain pipeline MiB", lambda b: mib(b.peak_bytes)),
        Column("edge decode alone MiB", lambda b: mib(report.edge_decode[b.family].peak_bytes)),
        Column("plain pipeline in all MiB", lambda b: mib(b.peak_total_bytes)),
    ]


MEMORY_COLUMNS: list[Column] = [
    Column("schedule", lambda r: r.schedule),
    Column("RALU MiB", lambda r: mib(r.peak_bytes)),
    Column("ratio to plain", lambda r: num(r.peak_mem_ratio)),
    Column("bound", lambda r: num(r.peak_mem_bound_ratio)),
    Column("RALU in all MiB", lambda r: mib(r.peak_total_bytes)),
    Column("ratio in all", lambda r: num(r.peak_mem_ratio_total)),
]

EDGE_SHARE_COLUMNS: list[Column] = [
    Column("schedule", lambda r: r.schedule),
    Column("real architecture, total", lambda r: pct(r.real_edge_decode_fraction_total, 2)),
    Column("real, linear", lambda r: pct(r.real_edge_decode_fraction_linear, 2)),
    Column("this configuration, total", lambda r: pct(r.config_edge_decode_fraction_total, 2)),
]


def _method(row: CacheRow | CompileRow) -> str:
    return "RALU" if row.method == "ralu" else "plain"


def cache_columns(cpu: bool) -> list[Column]:
    return [
        Column("schedule (budget)", lambda r: r.schedule),
        Column("method", _method),
        Column("steps", lambda r: _steps(r.steps)),
        Column("cache", lambda r: r.cache),
        Column("linear FLOPs executed", lambda r: f"{r.executed_linear_tflops * 1e3:.3f} G"),
        Column("of uncached", lambda r: pct(1.0 / r.flops_gain, 1)),
        Column("FLOPs speed-up", lambda r: times(r.flops_speedup)),
        Column("wall", lambda r: f"**{times(r.wall_speedup)}**"),
        *([Column("CPU time", lambda r: f"**{times(r.cpu_time_speedup)}**")] if cpu else []),
        Column("FLOPs gain", lambda r: "" if r.cache == "none" else times(r.flops_gain)),
        Column("wall gain", lambda r: times(r.wall_gain) if r.cache != "none" else ""),
        *([Column("CPU-time gain", lambda r: times(r.cpu_time_gain) if r.cache != "none" else "")] if cpu else []),
    ]


def compile_columns(cpu: bool) -> list[Column]:
    def timing(value):
        return lambda r: "" if r.error else value(r)

    return [
        Column("family", lambda r: r.family),
        Column("method", lambda r: _method(r) + (f" {r.schedule}" if r.schedule else "")),
        Column("steps", lambda r: _steps(r.steps)),
        Column("warm-up s (compiling)", timing(lambda r: f"{r.warmup_seconds:.2f}")),
        Column("graphs", timing(lambda r: str(r.graphs_compiled))),
        Column("graph breaks", timing(lambda r: str(r.graph_breaks))),
        Column("recompiles (timed calls)", timing(lambda r: str(r.recompiles))),
        Column("wall", timing(lambda r: f"**{times(r.wall_speedup)}**")),
        *([Column("CPU time", timing(lambda r: f"**{times(r.cpu_time_speedup)}**"))] if cpu else []),
        Column("wall gain", timing(lambda r: times(r.wall_gain))),
        *([Column("CPU-time gain", timing(lambda r: times(r.cpu_time_gain)))] if cpu else []),
        Column("failed", lambda r: r.error or ""),
    ]


def cache_section(report: SpeedReport, cpu: bool) -> list[str]:
    """The step-cache rows (none in reports made before they existed, or with ``--no-caches``)."""
    rows = report.cache_rows
    if rows is None:
        return []
    settings = {row.cache: row.settings for row in rows if row.settings}
    families = {row.family for row in rows}
    plain = {row.family for row in rows if row.method == "plain"} | ({"flux"} & families)
    return [
        "",
        "## Step caches",
        "",
        f"Regenerate: `{report.command}`. Each schedule with the step caches its family supports (`ralu.runtime.cache`),",
        "with the settings of the quality harness (`ralu-bench quality --testbed v2`), so that its quality verdicts are",
        "about these runs; beside them the plain pipeline at the step count of the same configuration-FLOPs budget",
        "(the quality harness's base-steps row), uncached and with the same caches. *Linear FLOPs executed*: the",
        "transformer's `nn.Linear` multiply-adds that really ran (forward hooks, `ralu-bench cache`'s counter), counted",
        "in an untimed call; *of uncached*: of the same method without the cache. *FLOPs speed-up*, *wall*"
        + (", *CPU time*" if cpu else "") + ": against the uncached plain pipeline at the base steps (the summary's",
        "baseline); *gains*: against the same method uncached (RALU: the summary's timings; plain: the uncached row",
        f"here). Timing: {config_repeats(report)} round(s) after the summary's, each timing every cache row of a family in",
        "turn, medians. MagCache's per-stage ratios are measured on other prompt embeddings and noise than the timed calls'.",
        "",
        *(f"* `{kind}`: {text}" for kind, text in settings.items()),
        *([f"* {NO_PLAIN_MAGCACHE}"] if families & plain else []),
        *([f"* {NO_PLAIN_SD3}"] if "sd3" in families else []),
        *([f"* {no_plain_context(sorted(families - plain - {'sd3'}))}"] if families - plain - {"sd3"} else []),
        *(f"* {family}: {CACHES_LEFT_OUT[family]}" for family in sorted(families) if family in CACHES_LEFT_OUT),
        "",
        *table(cache_columns(cpu), rows),
    ]


def compile_section(report: SpeedReport, cpu: bool) -> list[str]:
    """The compiled-transformer rows (only with ``--compile`` or ``--quick``)."""
    rows = report.compile_rows
    if rows is None:
        return []
    backends = sorted({row.backend for row in rows})
    return [
        "",
        "## Compiled transformer",
        "",
        f"Regenerate: `{report.command}`. The transformer compiled with `transformer.compile(backend=...)` (backend "
        f"{', '.join(f'`{b}`' for b in backends)}),",
        "shared by both pipelines. Every method first runs untimed with the same shapes (one step; RALU: one step per",
        "stage): *warm-up* is that call, where dynamo compiles (inductor reuses its on-disk cache of earlier runs),",
        "*graphs* what it compiled (a new token count compiles",
        "again until dynamo's automatic dynamic shapes make one graph serve them all, so later methods may compile",
        "nothing). *Recompiles*: graphs compiled during the timed calls (dynamo's `unique_graphs` counter; 0 when the",
        "warm-up compiled everything). *Wall*" + (" / *CPU time*" if cpu else "") + ": against the uncompiled plain pipeline at the same base",
        "steps; *gains*: against the same method uncompiled (the summary's timings). A method whose compilation",
        "fails on this device says why under *failed*.",
        "",
        *table(compile_columns(cpu), rows),
    ]


def render_markdown(report: SpeedReport) -> str:
    config, rows, machine = report.config, report.rows, report.machine
    size = config["size"]
    cpu = any(row.cpu_time_speedup is not None for row in rows)
    basis = "CPU time" if cpu else "wall"
    lines = [
        f"Regenerate: `{report.command}`",
        "",
        "# Speed of the RALU runtime (`ralu-bench speed`)",
        "",
        f"Configuration **{config['preset']}** on **{config['device']}** in **{config['dtype']}** at {size}x{size}; "
        f"{config['repeats']} timed runs per method after a warm-up, medians; created {report.created}; the whole "
        f"benchmark took {report.elapsed_seconds / 60:.1f} min. Configuration and machine at the end.",
        "",
        "## Summary",
        "",
        f"*Real FLOPs*: speed-up of the real architectures ({', '.join(dict.fromkeys(_MODEL_TITLES.get(row.model, row.model) for row in rows)) or 'none'}; "
        "text encoders, every step, edge",
        "and final decodes; `ralu.calibrate.flops`), both conventions, beside the paper's (linear) figure.",
        "*Config FLOPs*: the same for the models that ran here (transformer steps + edge decode, counted on the",
        "meta device at each stage's token count; total convention). *Wall*: measured against the plain diffusers",
        "pipeline" + ("; *CPU time*: the same runs measured in process CPU time, which other processes on a shared"
                      " machine do not inflate (one thread: equal to wall time on an idle machine)." if cpu else "."),
        "",
        *table(summary_columns(cpu), rows),
        "",
        "## Targets",
        "",
        f"Runtime overhead under {100 * OVERHEAD_TARGET:.0f} % of the RALU time; measured speed-up within "
        f"{100 * WALL_FLOPS_TOLERANCE:.0f} % of the same configuration's total-FLOPs speed-up; peak memory no higher than "
        "the plain pipeline's plus the edge decode's.",
        "",
        *table(target_columns(cpu), rows),
        "",
        "## Where measured and FLOPs speed-ups part",
        "",
        f"Measured / FLOPs ({basis}) = *machine* x *runtime*. Machine: the speed-up predicted by bare transformer",
        "evaluations at the stages' token counts plus one bare edge decode (each timed alone, table below), over",
        "the FLOPs speed-up; it is how the hardware's FLOP rate changes with sequence length and layer type, and",
        "no runtime change can move it. Runtime: the measured speed-up over that prediction; what the pipelines",
        "spend beyond the bare evaluations (RALU: noise, gather/scatter, positions, Canny; both: Euler updates,",
        "set-up).",
        "",
        *table(factor_columns(cpu, basis), rows),
        "",
        "## Overhead, itemised",
        "",
        "Per image, in the runtime's own work (`ralu.runtime.profiling` sections; exclusive: a nested section is",
        "charged to the innermost), as a share of the RALU wall time; 'transformer' is the model evaluations, 'other'",
        "the rest of the call (Euler updates, pipeline set-up and checks).",
        "",
        *table(OVERHEAD_COLUMNS, rows),
        "",
        "## Absolute timings",
        "",
        *table(timing_columns(cpu), timing_lines(report)),
        "",
        "## Bare evaluations by sequence length",
        "",
        *(["Single transformer evaluations (text tokens included, the CFG batch for SD3; SD3 counts that form no",
            "native grid go through the runtime's token path, as in its mixed stage) and the bare edge decode, median"]
          if {f["family"] for f in config["families"]} <= {"flux", "sd3"} else
          ["Single transformer evaluations (text tokens included, the CFG batch for the families that run CFG, Kontext's",
           "reference tokens after the generated ones; SD3 counts that form no native grid go through the runtime's token",
           "path, as in its mixed stage, the other families' on the most square grid of the count) and the bare edge decode, median"]),
        f"of the repeats after a warm-up; GFLOP/s on the {basis} basis.",
        "",
        *table(THROUGHPUT_COLUMNS, throughput_lines(report, cpu)),
        "",
        "## Peak memory",
        "",
        f"Method: {report.memory_method or 'unavailable on this platform'}. Working memory of one call above what",
        "was held before it (weights and prompt embeddings are resident in both cases), on runs with one step per",
        "stage (baseline: one step): every step of a stage allocates the same tensors. The bound is the plain",
        "pipeline's peak plus the bare edge decode's. 'In all': the peak with everything held (on CUDA the",
        "allocated memory, weights included; on CPU the whole process's resident set, libraries included).",
        "",
        *table(baseline_memory_columns(report), list(report.baselines.values())),
        "",
        *table(MEMORY_COLUMNS, rows),
        "",
        "## The edge-detection decode's share of the FLOPs",
        "",
        *table(EDGE_SHARE_COLUMNS, rows),
    ]
    vae = config["vae"]
    # The benchmarked VAE has the real one's shape (FLUX.1's and SD3's are the same) at other widths.
    lines += cache_section(report, cpu) + compile_section(report, cpu)
    kl = [f for f in config["families"] if f.get("vae_class", "AutoencoderKL") == "AutoencoderKL"]
    real = get_model((kl or config["families"])[0]["model"])
    real_vae, edge_side = real.architecture.vae, size // (2 * real.vae_scale_factor)
    # The AutoencoderKL line names its families when other VAEs are in the report too.
    kl_users = None if not kl else "" if len(kl) == len(config["families"]) else " of " + ", ".join(f["family"] for f in kl)
    lines += [
        "",
        "## Configuration",
        "",
        *(_family_line(family, size) for family in config["families"]),
        *([f"* VAE{kl_users}: `AutoencoderKL` with the real layout (4 decoder up blocks, {vae['layers_per_block']} layers per block, "
           f"{vae['latent_channels']} latent channels, mid-block attention) at block widths {list(vae['block_out_channels'])} (real: "
           f"{list(real_vae['block_out_channels'])}), {vae['norm_num_groups']} norm groups; the edge decode turns a {edge_side}x{edge_side} "
           f"latent into a {size // 2}x{size // 2} image."] if kl_users is not None else []),
        *_other_vae_lines(config, size),
        "* Random weights (seeded; exactly-zero initialised layers filled so that latents and edge maps carry signal);",
        "  the same prompt embeddings for both pipelines; one image per call, a `torch.Generator` seeded 0 per call;",
        "  `output_type=\"latent\"` for both, so the final VAE decode is in neither.",
        _pipelines_line(config),
        "* Timing: one untimed warm-up call of each method with one step per stage (baseline: one step), the same",
        f"  shapes and code path; then {config['repeats']} rounds, each timing the baseline and every schedule in turn",
        "  (interleaved, so a change of machine load hits all methods), medians. On CPU the profiler is active in",
        "  the timed calls (a clock read per section edge, a handful per step); on CUDA sections synchronise the",
        "  device, so the itemisation comes from one extra profiled call per schedule.",
        f"* Schedules: {', '.join(config['schedules'])}"
        + ("" if size == PAPER_SIZE else f" (re-targeted from 1024x1024 to {size}x{size}: same stages, fewer tokens)") + ".",
        "",
        "## Machine",
        "",
        f"* CPU: {machine['cpu']}, {machine['cpu_count']} logical CPUs; torch intra-op threads {machine['torch_threads']}"
        + (f"; GPU: {machine['gpu']}" if "gpu" in machine else ""),
        f"* torch {machine['torch']}, diffusers {machine['diffusers']}, Python {machine['python']}, {machine['platform']}",
        f"* Load average (1, 5, 15 min) at the start {report.load_average.start}, at the end {report.load_average.end}.",
    ]
    if OPTIMISATION_LOG:
        lines += ["", "## What the runtime changes bought (measured once during development, not regenerated)", "", *OPTIMISATION_LOG]
    lines += ["", "## Discussion", "", *_discussion(report)]
    return "\n".join(lines) + "\n"


def config_repeats(report: SpeedReport) -> int:
    return int(report.config['repeats'])


def _discussion(report: SpeedReport) -> list[str]:
    rows = report.rows
    if not rows:
        return ["No schedule was measured."]
    cpu = any(row.cpu_time_speedup is not None for row in rows)
    out = []
    over = [r.schedule for r in rows if not r.targets.overhead_under_3_percent]
    worst = max(rows, key=lambda r: r.overhead_fraction)
    item, value = max(worst.overhead.items.items(), key=lambda kv: kv[1].seconds)
    if over:
        out.append(f"* **Overhead**: above {100 * OVERHEAD_TARGET:.0f} % for {', '.join(over)}; the largest item is "
                   f"{OVERHEAD_LABELS[item]} ({pct(value.fraction, 2)} of {worst.schedule}).")
    else:
        out.append(f"* **Overhead**: under {100 * OVERHEAD_TARGET:.0f} % for every schedule (largest {pct(worst.overhead_fraction, 2)}, "
                   f"{worst.schedule}; mostly {OVERHEAD_LABELS[item]}, {pct(value.fraction, 2)}).")
    for key, label in (("wall_over_flops", "Wall-clock"), ("cpu_time_over_flops", "CPU-time")):
        ratios = [getattr(r, key) for r in rows if getattr(r, key) is not None]
        if ratios:
            within = sum(abs(x - 1.0) <= WALL_FLOPS_TOLERANCE for x in ratios)
            out.append(f"* **{label} vs FLOPs**: {label.lower() if label == 'Wall-clock' else label} / FLOPs speed-up from {min(ratios):.3f} to {max(ratios):.3f}; "
                       f"{within} of {len(ratios)} schedules within {100 * WALL_FLOPS_TOLERANCE:.0f} %.")
    machine = [r.machine_factor for r in rows if r.machine_factor is not None]
    runtime = [r.runtime_factor for r in rows if r.runtime_factor is not None]
    if machine and runtime:
        out.append(
            f"* **Why**: the machine factor spans {min(machine):.3f} to {max(machine):.3f}, the runtime factor "
            f"{min(runtime):.3f} to {max(runtime):.3f} ({'CPU-time' if cpu else 'wall'} basis). A machine factor below 1 "
            "means the low-res and mixed stages run at a lower FLOP rate than the full-resolution baseline (or "
            "the edge decode at a lower rate than the transformer); above 1, the reverse. The runtime factor is "
            "what the RALU pipeline itself costs beyond bare evaluations."
        )
    for family, entries in report.forward_throughput.items():
        if len(entries) >= 2:
            low, full = entries[0], entries[-1]
            out.append(
                f"* {family}: {low.gflops_per_second:.1f} GFLOP/s at {low.image_tokens} image tokens, "
                f"{full.gflops_per_second:.1f} GFLOP/s at {full.image_tokens} (ratio {low.gflops_per_second / full.gflops_per_second:.2f})."
            )
    best = []
    for row in rows:
        base = report.baselines.get(f"{row.family}-{row.base_steps}")
        if base and len(base.seconds) > 1:
            best.append(min(base.seconds) / min(row.ralu_seconds_all) / row.config_flops_speedup_total)
    if best:
        out.append(f"* **Best-of-{config_repeats(report)} wall-clock** (each method's least disturbed run): {min(best):.3f} to {max(best):.3f} "
                   "of the FLOPs speed-up. Noise on a shared machine only ever adds time, so the fastest run is the closest "
                   "to the code's own speed; the medians above are what the issue asks for.")
    if cpu:
        spreads = []
        for base in report.baselines.values():
            if len(base.seconds) > 1:
                spreads.append(f"{base.family} baseline {min(base.seconds):.1f} to {max(base.seconds):.1f} s wall, "
                               f"{min(base.cpu_seconds):.1f} to {max(base.cpu_seconds):.1f} s CPU")
        if spreads:
            out.append("* **Noise**: run-to-run spread " + "; ".join(spreads) + ". Where wall and CPU time differ, other "
                       "processes held the cores; the CPU-time figures are the ones that describe the code.")
    for family, share in report.attention_share.items():
        out.append(
            f"* **Reduced widths move the FLOPs mix** ({family}): attention is {pct(share.config)} of a full-resolution "
            f"forward here, {pct(share.real)} in the real model. Attention is quadratic in the sequence length, so this "
            "configuration's FLOPs speed-ups differ from the real ones (compare the config and real columns); compare "
            "measured speed-ups with the config column."
        )
    if report.config['device'] == "cpu":
        out.append("* This report ran on a CPU only: GPU timings (bf16, real widths) come from `ralu-bench speed --device cuda`, "
                   "which writes the same report with absolute timings from one GPU.")
    mem = [r.schedule for r in rows if r.targets.memory_within_bound is False]
    if mem:
        out.append(f"* **Memory**: above the bound for {', '.join(mem)}.")
    elif any(r.peak_mem_ratio is not None for r in rows):
        top = max((r for r in rows if r.peak_mem_ratio is not None), key=lambda r: r.peak_mem_ratio)
        out.append(f"* **Memory**: within the plain pipeline plus the edge decode for every schedule (highest ratio "
                   f"{top.peak_mem_ratio:.2f}, {top.schedule}, bound {num(top.peak_mem_bound_ratio, 2)}).")
        decode = max((v.peak_bytes or 0) for v in report.edge_decode.values())
        plain = min((b.peak_bytes or 0) for b in report.baselines.values())
        if decode > plain:
            weights = ", ".join(f"{family} {value / 2**30:.1f} GiB" for family, value in report.real_transformer_bf16_bytes.items())
            out.append(
                f"  The ratio is well above 1 because here the edge decode's working memory (a {report.config['size'] // 2}x"
                f"{report.config['size'] // 2} image through the VAE) exceeds that of a reduced-width transformer step: the RALU "
                "peak *is* the edge decode. The ratio "
                "counts working memory only; the weights, resident in both pipelines, are left out"
                + (f" (real transformers in bf16: {weights}; on a GPU the ratio with weights is what `--device cuda` reports)." if weights else ".")
            )
    return out


def render_json(text: str) -> str:
    """The Markdown of a ``speed.json``."""
    return render_markdown(SpeedReport.model_validate_json(text))


if __name__ == "__main__":
    sys.exit(render_from_json(sys.argv[1:], "ralu_lab.bench.speed.report", render_json))
