"""``reports/quality.md`` from the typed :class:`~ralu.calibrate.bench.quality.schema.QualityReport`.

The results and sweep tables share their metric columns, each declared once.  To print the
Markdown of a saved report (no torch): ``python -m ralu.calibrate.bench.quality.report FILE``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ralu.calibrate.bench.common import Column, num_std, render_from_json, table
from ralu.calibrate.bench.quality.config import (
    BASE_STEPS,
    METHOD_LABELS,
    METRICS,
    PSNR_CAP,
    REPORT_NAME,
)
from ralu.calibrate.bench.quality.schema import QualityReport
from ralu.calibrate.presets import PAPER_H0, PAPER_SIZE


def figure_paths(report: QualityReport) -> FigurePaths:
    """Where the figures go, relative to the report (no sweep figure without a sweep)."""
    return FigurePaths(f"{REPORT_NAME}/samples.png", f"{REPORT_NAME}/tradeoff.png", f"{REPORT_NAME}/sweep.png" if report.sweep else None)


@dataclass(frozen=True)
class FigurePaths:
    grid: str
    tradeoff: str
    sweep: str | None


def _metric(header: str, key: str, digits: int = 2) -> Column:
    """Mean ± std across seeds of one metric."""
    return Column(header, lambda r: num_std(getattr(r, key), getattr(r, f"{key}_std"), digits))


#: PSNR to blocking, in the results and the sweep.
METRIC_COLUMNS: list[Column] = [
    _metric("PSNR (dB)", "psnr"),
    _metric("SSIM", "ssim", 3),
    _metric("FD", "fd"),
    Column("FD pooled", lambda r: num_std(r.fd_pooled)),
    _metric("accuracy", "accuracy", 3),
    _metric("blocking", "edge_artifacts", 3),
    _metric("blocking 4x4", "edge_artifacts_4x4", 3),
]

DEFINITION_COLUMNS: list[Column] = [
    Column("method", lambda r: r.label),
    Column("budget", lambda r: f"{r.budget}x"),
    Column("definition", lambda r: r.details.get("describe", "")),
]

RESULT_COLUMNS: list[Column] = [
    Column("method", lambda r: r.label),
    Column("steps", lambda r: "/".join(str(s) for s in r.details.get("steps", [BASE_STEPS]))),
    Column("speed-up total (linear)", lambda r: f"{r.flops_speedup_total:.2f}x ({r.flops_speedup_linear:.2f}x)"),
    *METRIC_COLUMNS,
]

#: The sweep leaves out the pooled FD and the 4x4 blocking.
SWEEP_COLUMNS: list[Column] = [
    Column("Z", lambda p: f"{p.z:g}"),
    Column("c", lambda p: f"{p.c:.4f}"),
    Column("restarts s2, s3", lambda p: f"{p.starts[1]:.3f}, {p.starts[2]:.3f}"),
    Column("shifts", lambda p: "/".join(f"{h:.2f}" for h in p.shifts)),
    Column("JS distance", lambda p: f"{p.js_distance:.4f}"),
    *(c for c in METRIC_COLUMNS if c.header not in ("FD pooled", "blocking 4x4")),
]


def _winner_lines(report: QualityReport) -> list[str]:
    rows = report.rows
    label = lambda key: METHOD_LABELS.get(key, key)  # noqa: E731
    lines = []
    for budget, entry in report.winners.items():
        group = [r for r in rows if str(r.budget) == budget and r.method != "baseline"]
        speeds = ", ".join(f"{r.method} {r.flops_speedup_total:.2f}x" for r in group)
        lines.append(f"**Budget {budget}x** (measured total-FLOPs speed-ups: {speeds}):")
        lines.append("")
        for key, name, _higher in METRICS:
            e = entry[key]
            if len(rows[0].seeds) < 2:
                sep = " (one seed: no spread to judge by)"
            else:
                sep = "" if e.separable else " (within the seed spread: not separable)"
            verdict = "RALU beats every peer" if e.ralu_beats_peers else f"RALU loses to {label(e.best_peer)}"
            lines.append(f"- {name}: best **{label(e.best)}** ({e.value:.3f}), runner-up {label(e.runner_up)} by {e.margin:.3f}{sep}; "
                         f"best RALU row {label(e.best_ralu)}, best peer {label(e.best_peer)}: {verdict}.")
        counts = sum(1 for key, _, _ in METRICS if entry[key].ralu_beats_peers)
        lines.append(f"- Summary: the best RALU row beats the best peer on {counts} of {len(METRICS)} metrics at this budget.")
        lines.append("")
    return lines


def render_markdown(report: QualityReport, figures: FigurePaths) -> str:
    cfg, tb = report.config, report.testbed
    w = tb.weights
    rec = w.get("transformer_record", {})
    lines = [
        "# Image quality at matched cost (testbed)",
        "",
        f"Regenerate: `{report.command}` ({report.wall_seconds / 60:.1f} min, {tb.threads} CPU thread(s)).",
        "",
    ]
    planned, done = rec.get("steps_planned"), rec.get("steps_done")
    if planned and done and done < planned:
        lines += [
            f"**Provisional**: the transformer is a checkpoint after {done} of the {planned} planned training steps "
            "(the training run had not finished).  Rerun `ralu-bench quality` (the shipped weights by default) on the final "
            "weights before drawing conclusions.",
            "",
        ]
    if cfg['quick']:
        lines += [
            "**Quick mode** (CI): one seed, a handful of images, the paper's local optimiser for \"ours\" and the sweep, a "
            f"{cfg['trials']}-trial layout search.  It exercises every code path; its numbers mean nothing.",
            "",
        ]
    lines += [
        "RALU against its peers at the same total-FLOPs budget, on the quality testbed "
        "(`ralu.calibrate.testbed`): a small `FluxTransformer2DModel` in pixel space driven by a real "
        "`diffusers.FluxPipeline`, and a classifier that reads the conditioning back.  Everything is offline.",
        "",
        "## Set-up",
        "",
        f"- Images: {cfg['size']}x{cfg['size']} RGB, {tb.full_tokens} image tokens at full size, {tb.half_tokens} at half size, "
        f"{tb.text_tokens} text tokens; the testbed scheduler's base shift h0 = {tb.h0:.4f} (FLUX.1-dev's at {PAPER_SIZE} px); guidance input {tb.guidance_scale}.",
        f"- Transformer weights: `{w.get('transformer')}`"
        + (f" (`{rec.get('command')}`, {rec.get('steps_done')} steps, file time {w.get('transformer_modified')})" if rec else " (no training record found)") + ".",
        f"- Classifier: `{w.get('classifier')}`" + (f" (`{w['classifier_record'].get('command')}`)" if w.get("classifier_record") else "") + ".",
        f"- Seeds {tuple(cfg['seeds'])}, {cfg['images']} images per seed (labels `balanced_labels(n, seed)`, one noise generator per image: "
        "every method starts from the same noise as the baseline; RALU and the low-res peers use the full-size noise summed over 2x2 blocks / 2).  "
        "Table values: mean over seeds ± standard deviation across seeds.",
        f"- Baseline: plain `FluxPipeline`, {BASE_STEPS} steps ({tb.baseline_tflops_total * 1e3:.1f} GFLOPs per image, total).",
        "- Cost: total FLOPs (linear + attention) of the testbed transformer, counted with `count_flops` on the meta device at every "
        "token count a forward really saw (a hook records them; checked against the plan), per image.  "
        f"Forward at 256 / 64 tokens: {tb.forward_flops['256']['total'] / 1e6:.1f} / {tb.forward_flops.get('64', {}).get('total', float('nan')) / 1e6:.1f} MFLOPs.  "
        "The testbed's VAE is the identity, so RALU's edge-detection decode and the final decode cost **zero** here "
        "(on FLUX.1-dev the half-size decode is 2.48 TFLOPs); the text \"encoder\" is a table lookup.",
        "",
        "Metrics: **PSNR / SSIM** against the 50-step baseline from the same noise and labels (PSNR capped at "
        f"{PSNR_CAP:.0f} dB; SSIM with an 11x11 gaussian window, sigma 1.5, on [0, 1] RGB); **FD**: Frechet distance of the classifier's "
        f"128-d penultimate features to {cfg['real_images']} real procedural images (balanced labels), per seed; "
        "**accuracy**: fraction of images whose shape, colour and position the classifier reads back as conditioned; "
        "**blocking**: the 2x2 blocking index, `(E_b - E_i) / (E_b + E_i)` with `E_b`, `E_i` the mean squared luma differences "
        "across and inside the cells of the aligned 2x2 grid (0: no grid-aligned structure, 1: nearest-upsampled).",
        "",
        f"Floor for comparison, {report.reference.describe}: FD {num_std(report.reference.fd, report.reference.fd_std)}, "
        f"accuracy {num_std(report.reference.accuracy, report.reference.accuracy_std, 3)}, blocking {num_std(report.reference.edge_artifacts, report.reference.edge_artifacts_std, 3)}.",
        "",
        "## Methods",
        "",
        *table(DEFINITION_COLUMNS, report.rows),
        "",
        "Matched cost: at each budget the peers' step counts are the integers whose total FLOPs come closest to the RALU "
        "preset's (the published layout, shared by \"ours\"); the searched layout has its own cost.  Bottleneck Sampling as run "
        "here (docs/method.md §7, our reading): the FLUX defaults' steps 6/20/8 scaled to the budget, shifts 9/6/9 relative to the base 3 "
        "applied as 3, 2, 3 x h0, stage k runs from its restart noise level (1, 0.8, 0.6) to the next one (the last to 0); at each change "
        "the Tweedie estimate x0 = x - sigma v is resized (2x2 mean down, nearest up) and re-noised with fresh noise, "
        "x = (1 - sigma) x0 + sigma eps.  The published implementation may place its stage ends and choose its filters differently.",
        "",
        "## Results",
        "",
    ]
    for budget in sorted({r.budget for r in report.rows}):
        group = [r for r in report.rows if r.budget == budget]
        lines += [f"### {'baseline' if budget == 1 else f'budget {budget}x'}", "", *table(RESULT_COLUMNS, group), ""]
    lines += [
        "FD: mean ± std of the per-seed distances; FD pooled: all seeds' images together (less biased).  Blocking 4x4: the same "
        "index on the 4x4 grid of RALU's low-res tokens (seams between upsampled and not-upsampled cells); not used to pick winners.",
        "",
        "## Which method wins",
        "",
        "PSNR and SSIM measure fidelity to the 50-step sample *from the same noise*: they favour samplers that keep the "
        "baseline's noise all the way (fewer steps, naive upsampling) over those that inject fresh noise (RALU at every "
        "resolution change, Bottleneck Sampling), whatever the images look like.  FD and accuracy judge the images themselves.",
        "",
    ] + _winner_lines(report)
    lines += [
        f"Samples (seed {cfg['seeds'][0]}, first images; one row per method, same noise and labels in every column): ![samples]({figures.grid})",
        "",
        f"Quality against cost: ![trade-off]({figures.tradeoff})",
        "",
    ]
    sweep = report.sweep
    if sweep:
        best = sweep.best_z
        lines += [
            "## Noise strength sweep",
            "",
            f"Layout of the {sweep.budget}x preset (steps {sweep.layout.steps}, ends {sweep.layout.ends}, r = {sweep.layout.up_ratio}), "
            f"exact noise; for every Z = 1/sqrt(c) the shifts are re-optimised with Z fixed (`calibrate(..., z_bounds=(Z, Z))`).  "
            f"Seeds {sweep.seeds}, {sweep.images_per_seed} images each.  The global calibration puts Z at {sweep.global_optimum.z:.2f} "
            f"(JS distance {sweep.global_optimum.js_distance:.4f}).",
            "",
            *table(SWEEP_COLUMNS, sweep.points),
        ]
        same = "the same" if best.divergence == best.fd else "not the same"
        lines += [
            "",
            f"Divergence-optimal Z on this grid: **{best.divergence:g}**; quality-optimal Z: FD **{best.fd:g}**, accuracy {best.accuracy:g}, "
            f"PSNR {best.psnr:g}, SSIM {best.ssim:g}.  On this testbed the divergence optimum and the FD optimum are {same}.",
            "",
            f"![sweep]({figures.sweep})",
            "",
        ]
    lines += [
        "## Caveats",
        "",
        "- A tiny model (a few M parameters) on a procedural dataset at 32x32 px in pixel space: it tells how samplers compare "
        "on one real FLUX code path, not how FLUX.1-dev images look.  Absolute numbers mean nothing outside this testbed.",
        "- The \"VAE\" is the identity: RALU's edge-detection decode is free here (it is not on real models), and its Canny runs "
        "on a 16x16 image, where edges are coarse.  Upsampling acts on pixels directly, so blocking artifacts are visible in the "
        "images instead of being smoothed by a decoder.",
        "- RALU schedules are calibrated for FLUX.1-dev's timestep distribution at the testbed's h0 (3.158); the published preset "
        f"used h0 = {PAPER_H0:g}.  The searched layout comes from the outer search priced with FLUX.1-dev's cost model at {PAPER_SIZE} px, so its "
        "testbed cost differs from the preset's; each row reports its own.",
        f"- Blocking is {num_std(report.rows[0].edge_artifacts, None, 3)} for the {BASE_STEPS}-step baseline itself against "
        f"{num_std(report.reference.edge_artifacts, None, 3)} for real images: the model's own 2x2 token grid leaves structure; judge "
        "a sampler's blocking against the baseline's, not against 0.",
        "- FD from a few dozen images per seed is biased upwards and noisy (see the real-vs-real floor); compare methods, "
        "not absolute values.  Differences within the seed spread are not evidence.",
        "- Peers are run by the harness on the same transformer with plain Euler steps (Bottleneck Sampling and naive "
        "upsampling are not part of the runtime); the fewer-steps base model is the real `FluxPipeline`.",
        "",
    ]
    return "\n".join(lines)


def render_json(text: str) -> str:
    """The Markdown of a ``quality.json``, its figures linked where ``ralu-bench quality`` puts them."""
    report = QualityReport.model_validate_json(text)
    return render_markdown(report, figure_paths(report))


if __name__ == "__main__":
    sys.exit(render_from_json(sys.argv[1:], "ralu.calibrate.bench.quality.report", render_json))
