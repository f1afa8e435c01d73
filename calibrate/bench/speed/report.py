"""The Markdown of ``reports/speed.md``."""

from __future__ import annotations

import statistics

from ralu.calibrate.bench.common import mark, mib, num, pct, times
from ralu.calibrate.bench.speed.schema import (
    OVERHEAD_LABELS,
    OVERHEAD_TARGET,
    WALL_FLOPS_TOLERANCE,
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
    "| SD3 mixed stage: position embeddings (sin-cos at fractional positions, float64) and the CFG copies made once per stage | `sd3.py` stage model, `sd3_tokens.token_forward(position_embeds=)` | every step: the evaluation, 3 synchronisations (range and integrality checks), 2 concatenations; 40-60 ms per step at SD3-medium width on one CPU core | once per stage; 0 synchronisations per step |",
    "| the canvas scattered once per stage end, not again at the transition | `sampler.run_stages` | 2 scatters per transition | 1 |",
    "| single-resolution layouts gather/scatter only their own resolution | `TokenLayout.gather/scatter` | both canvases built and zeroed, then `torch.where` | one canvas, written in place |",
    "| gather/scatter per image, flux-dev-7x / sd3-medium-3x | (the two rows above) | 12.4 ms / 37.4 ms | 7.6 ms / 32.0 ms |",
    "",
    "What remains per image: a handful of synchronisations per stage (token-layout bookkeeping, the renoise",
    "check, the edge selection's copy of the decoded image to the CPU for OpenCV), none per step. The state",
    "stays float32 between steps (one cast to the model dtype and back per step, as the diffusers scheduler",
    "does for its own step).",
]



def _family_line(family: dict, size: int) -> str:
    t = family["transformer"]
    if family["family"] == "flux":
        cls, blocks = "FluxTransformer2DModel", f"{t['num_layers']} dual-stream + {t['num_single_layers']} single-stream blocks"
    else:
        cls, blocks = "SD3Transformer2DModel", f"{t['num_layers']} joint blocks"
    width = t["num_attention_heads"] * t["attention_head_dim"]
    full = (size // 16) ** 2
    cfg = "; classifier-free guidance (the transformer batch is doubled, as in the real pipeline)" if family["cfg"] else ""
    return (
        f"* **{family['family']}** (schedules `{family['model']}-*`): `{cls}` with {blocks}, "
        f"{t['num_attention_heads']} head(s) x {t['attention_head_dim']} (width {width}), text {family['text_tokens']} tokens x "
        f"{family['text_dim']}, pooled {family['pooled_dim']}, guidance scale {family['guidance_scale']}; {full} image tokens at full "
        f"resolution, {full // 4} in the low-res stage{cfg}."
    )


def render_markdown(report: dict) -> str:
    config, rows, machine = report["config"], report["rows"], report["machine"]
    size = config["size"]
    cpu = any(row["cpu_time_speedup"] is not None for row in rows)
    basis = "CPU time" if cpu else "wall"
    lines = [
        f"Regenerate: `{report['command']}`",
        "",
        "# Speed of the RALU runtime (`ralu-bench speed`)",
        "",
        f"Configuration **{config['preset']}** on **{config['device']}** in **{config['dtype']}** at {size}x{size}; "
        f"{config['repeats']} timed runs per method after a warm-up, medians; created {report['created']}; the whole "
        f"benchmark took {report['elapsed_seconds'] / 60:.1f} min. Configuration and machine at the end.",
        "",
        "## Summary",
        "",
        "*Real FLOPs*: speed-up of the real architectures (FLUX.1-dev, SD3-medium; text encoders, every step, edge",
        "and final decodes; `ralu.calibrate.flops`), both conventions, beside the paper's (linear) figure.",
        "*Config FLOPs*: the same for the models that ran here (transformer steps + edge decode, counted on the",
        "meta device at each stage's token count; total convention). *Wall*: measured against the plain diffusers",
        "pipeline" + ("; *CPU time*: the same runs measured in process CPU time, which other processes on a shared"
                      " machine do not inflate (one thread: equal to wall time on an idle machine)." if cpu else "."),
        "",
    ]
    head = "| schedule | steps | r | real FLOPs total | real FLOPs linear | paper | config FLOPs | wall | wall / FLOPs |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    if cpu:
        head += " CPU time | CPU / FLOPs |"
        rule += "---|---|"
    lines += [head + " overhead | peak memory ratio (bound) |", rule + "---|---|"]
    for row in rows:
        memory = "n/a" if row["peak_mem_ratio"] is None else f"{row['peak_mem_ratio']:.2f} ({num(row['peak_mem_bound_ratio'], 2)})"
        line = (
            f"| {row['schedule']} | {'/'.join(map(str, row['steps']))} | {row['up_ratio']} | {times(row['flops_speedup_total'])} | "
            f"{times(row['flops_speedup_linear'])} | {times(row['paper_speedup_linear'])} | {times(row['config_flops_speedup_total'])} | "
            f"**{times(row['wall_speedup'])}** | {num(row['wall_over_flops'])} |"
        )
        if cpu:
            line += f" **{times(row['cpu_time_speedup'])}** | {num(row['cpu_time_over_flops'])} |"
        lines.append(line + f" {pct(row['overhead_fraction'], 2)} | {memory} |")

    lines += [
        "",
        "## Targets",
        "",
        f"Runtime overhead under {100 * OVERHEAD_TARGET:.0f} % of the RALU time; measured speed-up within "
        f"{100 * WALL_FLOPS_TOLERANCE:.0f} % of the same configuration's total-FLOPs speed-up; peak memory no higher than "
        "the plain pipeline's plus the edge decode's.",
        "",
        "| schedule | overhead < 3 % | wall within 10 % of FLOPs |" + (" CPU time within 10 % of FLOPs |" if cpu else "") + " memory within bound |",
        "|---|---|---|" + ("---|" if cpu else "") + "---|",
    ]
    for row in rows:
        t = row["targets"]
        line = f"| {row['schedule']} | {mark(t['overhead_under_3_percent'])} | {mark(t['wall_within_10_percent_of_flops'])} ({num(row['wall_over_flops'])}) |"
        if cpu:
            line += f" {mark(t['cpu_time_within_10_percent_of_flops'])} ({num(row['cpu_time_over_flops'])}) |"
        lines.append(line + f" {mark(t['memory_within_bound'])} |")

    lines += [
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
        f"| schedule | config FLOPs | predicted by bare evaluations | measured ({basis}) | machine factor | runtime factor |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        measured = row["cpu_time_speedup"] if cpu else row["wall_speedup"]
        lines.append(f"| {row['schedule']} | {times(row['config_flops_speedup_total'])} | {times(row['forward_time_speedup'])} | {times(measured)} | {num(row['machine_factor'])} | {num(row['runtime_factor'])} |")

    lines += [
        "",
        "## Overhead, itemised",
        "",
        "Per image, in the runtime's own work (`ralu.runtime.profiling` sections; exclusive: a nested section is",
        "charged to the innermost), as a share of the RALU wall time; 'transformer' is the model evaluations, 'other'",
        "the rest of the call (Euler updates, pipeline set-up and checks).",
        "",
        "| schedule | RALU s | " + " | ".join(OVERHEAD_LABELS.values()) + " | overhead | transformer | other |",
        "|---|---|" + "---|" * len(OVERHEAD_LABELS) + "---|---|---|",
    ]
    for row in rows:
        o = row["overhead"]
        cells = [f"{1000 * o['items'][k]['seconds']:.1f} ms ({pct(o['items'][k]['fraction'], 2)})" for k in OVERHEAD_LABELS]
        lines.append(
            f"| {row['schedule']} | {o['total_seconds']:.2f} | " + " | ".join(cells)
            + f" | **{pct(o['overhead_fraction'], 2)}** | {pct(o['transformer_seconds'] / o['total_seconds'])} | {pct(o['other_seconds'] / o['total_seconds'], 2)} |"
        )

    lines += [
        "",
        "## Absolute timings",
        "",
        "| method | image tokens per stage | config TFLOPs | median wall s | wall runs (s) |" + (" median CPU s | CPU runs (s) |" if cpu else ""),
        "|---|---|---|---|---|" + ("---|---|" if cpu else ""),
    ]

    def runs(values):
        return ", ".join(f"{v:.2f}" for v in values)

    for base in report["baselines"].values():
        line = f"| plain {base['family']} pipeline, {base['steps']} steps | {base['image_tokens']} | {base['config_tflops']:.3f} | {base['median_seconds']:.2f} | {runs(base['seconds'])} |"
        if cpu:
            line += f" {base['median_cpu_seconds']:.2f} | {runs(base['cpu_seconds'])} |"
        lines.append(line)
    for row in rows:
        line = f"| {row['schedule']} | {'/'.join(map(str, row['stage_image_tokens']))} | {row['config_ralu_tflops_total']:.3f} | {row['ralu_seconds']:.2f} | {runs(row['ralu_seconds_all'])} |"
        if cpu:
            line += f" {statistics.median(row['ralu_cpu_seconds_all']):.2f} | {runs(row['ralu_cpu_seconds_all'])} |"
        lines.append(line)

    lines += [
        "",
        "## Bare evaluations by sequence length",
        "",
        "Single transformer evaluations (text tokens included, the CFG batch for SD3; SD3 counts that form no",
        "native grid go through the runtime's token path, as in its mixed stage) and the bare edge decode, median",
        f"of the repeats after a warm-up; GFLOP/s on the {basis} basis.",
        "",
        "| family | image tokens | evaluated by | TFLOPs (total) | median wall s | median CPU s | GFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, entries in report["forward_throughput"].items():
        for entry in entries:
            lines.append(f"| {family} | {entry['image_tokens']} | {entry['path']} | {entry['tflops_total']:.4f} | {entry['seconds']:.3f} | {entry['cpu_seconds']:.3f} | {entry['gflops_per_second']:.1f} |")
        decode = report["edge_decode"][family]
        decode_basis = decode["cpu_seconds"] if cpu else decode["seconds"]
        lines.append(f"| {family} | edge decode, {size // 2}x{size // 2} image | VAE decode | {decode['config_tflops_total']:.4f} | {decode['seconds']:.3f} | {decode['cpu_seconds']:.3f} | {decode['config_tflops_total'] * 1e3 / decode_basis:.1f} |")

    lines += [
        "",
        "## Peak memory",
        "",
        f"Method: {report['memory_method'] or 'unavailable on this platform'}. Working memory of one call above what",
        "was held before it (weights and prompt embeddings are resident in both cases), on runs with one step per",
        "stage (baseline: one step): every step of a stage allocates the same tensors. The bound is the plain",
        "pipeline's peak plus the bare edge decode's. 'In all': the peak with everything held (on CUDA the",
        "allocated memory, weights included; on CPU the whole process's resident set, libraries included).",
        "",
        "| family | plain pipeline MiB | edge decode alone MiB | plain pipeline in all MiB |",
        "|---|---|---|---|",
    ]
    for base in report["baselines"].values():
        lines.append(f"| {base['family']} | {mib(base['peak_bytes'])} | {mib(report['edge_decode'][base['family']]['peak_bytes'])} | {mib(base.get('peak_total_bytes'))} |")
    lines += ["", "| schedule | RALU MiB | ratio to plain | bound | RALU in all MiB | ratio in all |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['schedule']} | {mib(row['peak_bytes'])} | {num(row['peak_mem_ratio'])} | {num(row['peak_mem_bound_ratio'])} | "
            f"{mib(row.get('peak_total_bytes'))} | {num(row.get('peak_mem_ratio_total'))} |"
        )

    lines += [
        "",
        "## The edge-detection decode's share of the FLOPs",
        "",
        "| schedule | real architecture, total | real, linear | this configuration, total |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['schedule']} | {pct(row['real_edge_decode_fraction_total'], 2)} | {pct(row['real_edge_decode_fraction_linear'], 2)} | {pct(row['config_edge_decode_fraction_total'], 2)} |")

    vae = config["vae"]
    lines += [
        "",
        "## Configuration",
        "",
        *(_family_line(family, size) for family in config["families"]),
        f"* VAE: `AutoencoderKL` with the real layout (4 decoder up blocks, {vae['layers_per_block']} layers per block, "
        f"16 latent channels, mid-block attention) at block widths {list(vae['block_out_channels'])} (real: "
        f"[128, 256, 512, 512]), {vae['norm_num_groups']} norm groups; the edge decode turns a {size // 16}x{size // 16} "
        f"latent into a {size // 2}x{size // 2} image.",
        "* Random weights (seeded; exactly-zero initialised layers filled so that latents and edge maps carry signal);",
        "  the same prompt embeddings for both pipelines; one image per call, a `torch.Generator` seeded 0 per call;",
        "  `output_type=\"latent\"` for both, so the final VAE decode is in neither.",
        "* Baseline: `FluxPipeline` / `StableDiffusion3Pipeline` with the schedules' base steps; RALU: "
        "`RALUFluxPipeline.from_pipe(pipe, dtype=...)` / `RALUStableDiffusion3Pipeline.from_pipe(pipe, dtype=...)` with `schedule=NAME`.",
        "* Timing: one untimed warm-up call of each method with one step per stage (baseline: one step), the same",
        f"  shapes and code path; then {config['repeats']} rounds, each timing the baseline and every schedule in turn",
        "  (interleaved, so a change of machine load hits all methods), medians. On CPU the profiler is active in",
        "  the timed calls (a clock read per section edge, a handful per step); on CUDA sections synchronise the",
        "  device, so the itemisation comes from one extra profiled call per schedule.",
        f"* Schedules: {', '.join(config['schedules'])}"
        + ("" if size == 1024 else f" (re-targeted from 1024x1024 to {size}x{size}: same stages, fewer tokens)") + ".",
        "",
        "## Machine",
        "",
        f"* CPU: {machine['cpu']}, {machine['cpu_count']} logical CPUs; torch intra-op threads {machine['torch_threads']}"
        + (f"; GPU: {machine['gpu']}" if "gpu" in machine else ""),
        f"* torch {machine['torch']}, diffusers {machine['diffusers']}, Python {machine['python']}, {machine['platform']}",
        f"* Load average (1, 5, 15 min) at the start {report['load_average']['start']}, at the end {report['load_average']['end']}.",
    ]
    if OPTIMISATION_LOG:
        lines += ["", "## What the runtime changes bought (measured once during development, not regenerated)", "", *OPTIMISATION_LOG]
    lines += ["", "## Discussion", "", *_discussion(report)]
    return "\n".join(lines) + "\n"


def config_repeats(report: dict) -> int:
    return int(report["config"]["repeats"])


def _discussion(report: dict) -> list[str]:
    rows = report["rows"]
    if not rows:
        return ["No schedule was measured."]
    cpu = any(row["cpu_time_speedup"] is not None for row in rows)
    out = []
    over = [r["schedule"] for r in rows if not r["targets"]["overhead_under_3_percent"]]
    worst = max(rows, key=lambda r: r["overhead_fraction"])
    item, value = max(worst["overhead"]["items"].items(), key=lambda kv: kv[1]["seconds"])
    if over:
        out.append(f"* **Overhead**: above {100 * OVERHEAD_TARGET:.0f} % for {', '.join(over)}; the largest item is "
                   f"{OVERHEAD_LABELS[item]} ({pct(value['fraction'], 2)} of {worst['schedule']}).")
    else:
        out.append(f"* **Overhead**: under {100 * OVERHEAD_TARGET:.0f} % for every schedule (largest {pct(worst['overhead_fraction'], 2)}, "
                   f"{worst['schedule']}; mostly {OVERHEAD_LABELS[item]}, {pct(value['fraction'], 2)}).")
    for key, label in (("wall_over_flops", "Wall-clock"), ("cpu_time_over_flops", "CPU-time")):
        ratios = [r[key] for r in rows if r[key] is not None]
        if ratios:
            within = sum(abs(x - 1.0) <= WALL_FLOPS_TOLERANCE for x in ratios)
            out.append(f"* **{label} vs FLOPs**: {label.lower() if label == 'Wall-clock' else label} / FLOPs speed-up from {min(ratios):.3f} to {max(ratios):.3f}; "
                       f"{within} of {len(ratios)} schedules within {100 * WALL_FLOPS_TOLERANCE:.0f} %.")
    machine = [r["machine_factor"] for r in rows if r["machine_factor"] is not None]
    runtime = [r["runtime_factor"] for r in rows if r["runtime_factor"] is not None]
    if machine and runtime:
        out.append(
            f"* **Why**: the machine factor spans {min(machine):.3f} to {max(machine):.3f}, the runtime factor "
            f"{min(runtime):.3f} to {max(runtime):.3f} ({'CPU-time' if cpu else 'wall'} basis). A machine factor below 1 "
            "means the low-res and mixed stages run at a lower FLOP rate than the full-resolution baseline (or "
            "the edge decode at a lower rate than the transformer); above 1, the reverse. The runtime factor is "
            "what the RALU pipeline itself costs beyond bare evaluations."
        )
    for family, entries in report["forward_throughput"].items():
        if len(entries) >= 2:
            low, full = entries[0], entries[-1]
            out.append(
                f"* {family}: {low['gflops_per_second']:.1f} GFLOP/s at {low['image_tokens']} image tokens, "
                f"{full['gflops_per_second']:.1f} GFLOP/s at {full['image_tokens']} (ratio {low['gflops_per_second'] / full['gflops_per_second']:.2f})."
            )
    best = []
    for row in rows:
        base = report["baselines"].get(f"{row['family']}-{row['base_steps']}")
        if base and len(base["seconds"]) > 1:
            best.append(min(base["seconds"]) / min(row["ralu_seconds_all"]) / row["config_flops_speedup_total"])
    if best:
        out.append(f"* **Best-of-{config_repeats(report)} wall-clock** (each method's least disturbed run): {min(best):.3f} to {max(best):.3f} "
                   "of the FLOPs speed-up. Noise on a shared machine only ever adds time, so the fastest run is the closest "
                   "to the code's own speed; the medians above are what the issue asks for.")
    if cpu:
        spreads = []
        for base in report["baselines"].values():
            if len(base["seconds"]) > 1:
                spreads.append(f"{base['family']} baseline {min(base['seconds']):.1f} to {max(base['seconds']):.1f} s wall, "
                               f"{min(base['cpu_seconds']):.1f} to {max(base['cpu_seconds']):.1f} s CPU")
        if spreads:
            out.append("* **Noise**: run-to-run spread " + "; ".join(spreads) + ". Where wall and CPU time differ, other "
                       "processes held the cores; the CPU-time figures are the ones that describe the code.")
    for family, share in report.get("attention_share", {}).items():
        out.append(
            f"* **Reduced widths move the FLOPs mix** ({family}): attention is {pct(share['config'])} of a full-resolution "
            f"forward here, {pct(share['real'])} in the real model. Attention is quadratic in the sequence length, so this "
            "configuration's FLOPs speed-ups differ from the real ones (compare the config and real columns); compare "
            "measured speed-ups with the config column."
        )
    if report["config"]["device"] == "cpu":
        out.append("* This report ran on a CPU only: GPU timings (bf16, real widths) come from `ralu-bench speed --device cuda`, "
                   "which writes the same report with absolute timings from one GPU.")
    mem = [r["schedule"] for r in rows if r["targets"]["memory_within_bound"] is False]
    if mem:
        out.append(f"* **Memory**: above the bound for {', '.join(mem)}.")
    elif any(r["peak_mem_ratio"] is not None for r in rows):
        top = max((r for r in rows if r["peak_mem_ratio"] is not None), key=lambda r: r["peak_mem_ratio"])
        out.append(f"* **Memory**: within the plain pipeline plus the edge decode for every schedule (highest ratio "
                   f"{top['peak_mem_ratio']:.2f}, {top['schedule']}, bound {num(top['peak_mem_bound_ratio'], 2)}).")
        decode = max((v["peak_bytes"] or 0) for v in report["edge_decode"].values())
        plain = min((b["peak_bytes"] or 0) for b in report["baselines"].values())
        if decode > plain:
            weights = ", ".join(f"{family} {value / 2**30:.1f} GiB" for family, value in report.get("real_transformer_bf16_bytes", {}).items())
            out.append(
                f"  The ratio is well above 1 because here the edge decode's working memory (a {report['config']['size'] // 2}x"
                f"{report['config']['size'] // 2} image through the VAE) exceeds that of a reduced-width transformer step: the RALU "
                "peak *is* the edge decode. The ratio "
                "counts working memory only; the weights, resident in both pipelines, are left out"
                + (f" (real transformers in bf16: {weights}; on a GPU the ratio with weights is what `--device cuda` reports)." if weights else ".")
            )
    return out
