"""``reports/quality.md`` from the typed :class:`~ralu_lab.bench.quality.v2.schema.V2Report`.

To print the Markdown of a saved report (no torch):
``python -m ralu_lab.bench.quality.v2.report FILE``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ralu_lab.bench.common import Column, render_from_json, table
from ralu_lab.bench.quality.v2.plan import ARCH_NAMES, REPORT_NAME
from ralu_lab.bench.quality.v2.replication import judge, winner
from ralu_lab.bench.quality.v2.schema import Estimate, V2Report
from ralu_lab.bench.quality.v2.stats import ATTRIBUTE_METRICS, HELDOUT_ROW_METRICS, METRICS, SCHEDULE_METRICS, SCHEDULE_QUESTION

#: Digits per metric in the tables.
DIGITS = {"fd": 2, "spectral_distance": 3, "fine_accuracy": 3, "accuracy": 3, "psnr": 2, "ssim": 3, "blocking": 3,
          "fd_to_baseline": 1, "spectral_to_baseline": 3}


@dataclass(frozen=True)
class FigurePaths:
    grids: dict[str, str]
    tradeoff: str
    sweep: str | None


def figure_paths(report: V2Report) -> FigurePaths:
    """Where the figures go, relative to the report."""
    return FigurePaths({a: f"{REPORT_NAME}/samples-{a}.png" for a in report.testbed}, f"{REPORT_NAME}/tradeoff.png",
                       f"{REPORT_NAME}/sweep.png" if report.sweeps else None)


def interval(e: Estimate | None, digits: int) -> str:
    """``value [low, high] ±seed-spread``."""
    if e is None:
        return "n/a"
    text = f"{e.value:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}]"
    return text if e.seed_std is None else f"{text} ±{e.seed_std:.{digits}f}"


def _metric(key: str, label: str) -> Column:
    return Column(label, lambda r: interval(r.metrics.get(key), DIGITS[key]))


METRIC_COLUMNS = [_metric(key, label) for key, label, _, _ in METRICS]
ROW_COLUMNS = [
    Column("method", lambda r: r.label),
    Column("steps", lambda r: "/".join(str(s) for s in r.details.get("steps", []))),
    Column("speed-up total (linear)", lambda r: (f"{r.flops_speedup_total:.2f}x" if r.flops_speedup_total else "n/a") + f" ({r.flops_speedup_linear:.2f}x)"),
    *METRIC_COLUMNS,
]
DEFINITION_COLUMNS = [Column("method", lambda r: r.label), Column("budget", lambda r: f"{r.budget}x"), Column("definition", lambda r: r.details.get("describe", ""))]
VERDICT_COLUMNS = [
    Column("metric", lambda v: v.metric),
    Column("question", lambda v: v.question),
    Column("A", lambda v: v.a),
    Column("B", lambda v: v.b),
    Column("A, B", lambda v: f"{v.a_value:.{DIGITS[v.metric]}f}, {v.b_value:.{DIGITS[v.metric]}f}"),
    Column("A - B [95 % interval]", lambda v: f"{v.difference:+.{DIGITS[v.metric] + 1}f} [{v.low:+.{DIGITS[v.metric] + 1}f}, {v.high:+.{DIGITS[v.metric] + 1}f}]"),
    Column("verdict", lambda v: f"**{v.verdict}**" if v.verdict != "not separable" else v.verdict),
]


def replicated_mark(v) -> str:
    """`` (replicates)`` or `` (not in both halves)`` for a verdict that names a winner and
    has halves (the replication check); nothing otherwise."""
    if not v.halves or winner(v) is None:
        return ""
    return " (replicates)" if judge(v)[0] else " (not in both halves)"


def halves_text(halves: list, metric: str) -> str:
    """Each half's difference, ``*`` where that half names a winner at 95 %."""
    d = DIGITS[metric] + 1
    return " / ".join(f"{h.difference:+.{d}f}{'*' if h.verdict != 'not separable' else ''}" for h in halves)


def halves_cell(v) -> str:
    """:func:`halves_text` and, for a verdict that names a winner, whether it replicates."""
    return halves_text(v.halves, v.metric) + replicated_mark(v).replace(" (", ": ").replace(")", "")


HALVES_COLUMN = Column("halves A - B (* at 95 %)", halves_cell)
REGIME_COLUMNS = [
    Column("metric", lambda m: m.metric),
    Column("baseline", lambda m: f"{m.baseline:.{DIGITS[m.metric]}f}"),
    Column("fewer steps", lambda m: f"{m.fewer_steps:.{DIGITS[m.metric]}f}"),
    Column("difference [95 %]", lambda m: f"{m.difference:+.{DIGITS[m.metric] + 1}f} [{m.low:+.{DIGITS[m.metric] + 1}f}, {m.high:+.{DIGITS[m.metric] + 1}f}]"),
    Column("verdict", lambda m: m.verdict),
    Column("seed spread", lambda m: "n/a" if m.seed_spread is None else f"{m.seed_spread:.{DIGITS[m.metric] + 1}f}"),
    Column("worse beyond spread", lambda m: "yes" if m.worse else "no"),
]

#: The regime check's differences on each half of the seeds (the replication check).
REGIME_HALVES = Column("halves (* at 95 %)", lambda m: halves_text(m.halves, m.metric))


def _reuse_note(report: V2Report) -> str:
    """Why the run's time may not be the sampling time: rows whose images came from the work folder."""
    reused = sum(r.reused for r in report.rows)
    if not reused:
        return ""
    return f"; the images of {reused} of {len(report.rows)} rows came from the work folder, so that time is mostly measuring, not sampling"


def verdict_cell(v) -> str:
    d = DIGITS[v.metric] + 1
    said = {"not separable": "n.s.", f"{v.a} better": "**schedule better**"}.get(v.verdict, "**other better**")
    return f"{v.difference:+.{d}f} [{v.low:+.{d}f}, {v.high:+.{d}f}] {said}{replicated_mark(v)}"


def _cell_of(cells: dict, key: str):
    return lambda other: cells.get((other, key), "")


#: A row that beats a ``--schedule`` row counts as costing more when its GFLOPs exceed the
#: schedule's by more than this fraction: it is then outside the schedule's budget.
COSTLIER = 0.01


def extra_cost(rows: list, name: str, other: str) -> float:
    """How much more ``other`` costs per image than ``name`` (a fraction; rows of one budget):
    in total GFLOPs, or in executed linear GFLOPs when either is a cache row (whose total is
    unknown), so the two are always counted alike."""
    by_method = {r.method: r for r in rows}
    a, b = by_method[name], by_method[other]
    if a.gflops_total is None or b.gflops_total is None:
        return b.gflops_linear / a.gflops_linear - 1.0
    return b.gflops_total / a.gflops_total - 1.0


def beaters(names: list[str], rows: list, name: str) -> str:
    """Rows that beat ``name``, those that cost more marked with how much more."""
    if not names:
        return "none"
    marked = []
    for other in sorted(names):
        more = extra_cost(rows, name, other)
        marked.append(other + (f" (costs {100 * more:.0f} % more)" if more > COSTLIER else ""))
    return ", ".join(marked)


def schedule_tables(found: list, rows: list) -> list[str]:
    """Per ``--schedule`` row: a table of its paired verdicts against every other row of the
    budget (``rows``: that budget's rows) and whether any row beats it; a row that beats it
    at more cost than the schedule's is marked, since it is outside the schedule's budget."""
    lines = []
    labels = {key: label for key, label, _, _ in METRICS}
    for name in dict.fromkeys(v.a for v in found):
        mine = [v for v in found if v.a == name]
        others = list(dict.fromkeys(v.b for v in mine))
        beaten = sorted({v.b for v in mine if v.verdict == f"{v.b} better"})
        within = [b for b in beaten if extra_cost(rows, name, b) <= COSTLIER]
        cells = {(v.b, v.metric): verdict_cell(v) for v in mine}
        columns = [Column("other row", lambda o: o)] + [Column(f"{labels[k]}: schedule - other", _cell_of(cells, k)) for k in SCHEDULE_METRICS]
        if not beaten:
            verdict = "no row beats it on any of these metrics at 95 %"
        else:
            verdict = f"beaten by {beaters(beaten, rows, name)}" + ("" if within else "; no row at its cost or less beats it")
        per_metric = "; ".join(
            f"{labels[k]}: " + beaters([v.b for v in mine if v.metric == k and v.verdict == f"{v.b} better"], rows, name)
            for k in SCHEDULE_METRICS
        )
        lines += [f"`{name}` against every other row (paired bootstrap): **{verdict}**.", "", f"Beaten, metric by metric: {per_metric}.", "",
                  *table(columns, others), ""]
    return lines


def _cache_cell(key: str):
    """The cell of one metric in the cache table: cached minus uncached, its interval and the verdict."""
    return lambda effect: _cache_text(effect, key)


def _difference_text(v, key: str, a_word: str, b_word: str) -> str:
    """A paired difference a - b with its interval, and who wins in words (n.s. when neither)."""
    d = DIGITS[key] + 1
    sign = {"not separable": "n.s."}.get(v.verdict, a_word if v.verdict == f"{v.a} better" else b_word)
    return f"{v.difference:+.{d}f} [{v.low:+.{d}f}, {v.high:+.{d}f}] {sign}{replicated_mark(v)}"


def _cache_text(effect, key: str) -> str:
    return _difference_text(next(v for v in effect.verdicts if v.metric == key), key, "cached better", "uncached better")


CACHE_COLUMNS = [
    Column("row", lambda c: c.method),
    Column("cache", lambda c: c.cache),
    Column("speed-up uncached -> cached (linear)", lambda c: f"{c.speedup_uncached:.2f}x -> {c.speedup_cached:.2f}x ({c.gain:.2f}x gained)"),
    *[Column(f"{label}: cached - uncached", _cache_cell(key)) for key, label, _, _ in METRICS],
]


def _against_plain_cell(key: str):
    return lambda effect: _difference_text(next(v for v in effect.against_plain if v.metric == key), key, "cached RALU better", "fewer steps better")


#: Cached RALU rows against the plain pipeline with fewer steps, uncached (CacheEffect.against_plain).
CACHED_VS_PLAIN_COLUMNS = [
    Column("row", lambda c: f"{c.method} + {c.cache}"),
    Column("speed-up (linear): cached RALU, fewer steps", lambda c: f"{c.speedup_cached:.2f}x, {c.plain_speedup:.2f}x"),
    *[Column(f"{label}: cached RALU - fewer steps", _against_plain_cell(key)) for key, label, _, _ in METRICS if key in SCHEDULE_METRICS],
]
#: Accuracy of every attribute (pooled value only), per row.
ATTRIBUTE_COLUMNS = [
    Column("method", lambda r: r.label),
    Column("budget", lambda r: f"{r.budget}x"),
    *[Column(key.removeprefix("accuracy_"), (lambda k: lambda r: f"{r.metrics[k].value:.3f}")(key)) for key in ATTRIBUTE_METRICS],
]
SWEEP_COLUMNS = [
    Column("Z", lambda p: f"{p.z:g}"),
    Column("c", lambda p: f"{p.c:.4f}"),
    Column("shifts", lambda p: "/".join(f"{h:.2f}" for h in p.shifts)),
    Column("JS distance", lambda p: f"{p.js_distance:.4f}"),
    *METRIC_COLUMNS,
]


def verdict_lines(report: V2Report, found: list) -> list[str]:
    """A budget's verdict table; with the replication check, each half's difference beside it."""
    if report.intervals is None:
        return ["Verdicts (paired bootstrap over the same images; a winner only at 95 % confidence):", "", *table(VERDICT_COLUMNS, found), ""]
    how = "a paired cluster bootstrap over the seeds" if report.intervals.unit == "seeds" else "a paired bootstrap over the images of one seed"
    columns = VERDICT_COLUMNS + ([HALVES_COLUMN] if any(v.halves for v in found) else [])
    return [f"Verdicts ({how}; a winner only at 95 % confidence):", "", *table(columns, found), ""]


def intervals_text(report: V2Report) -> str:
    """How the report's values and intervals are made (reports before issue 28 resampled images)."""
    found = report.intervals
    if found is None:
        return "Values are over the images of all seeds pooled: `value [95 % bootstrap interval over images] ±standard deviation across seeds`."
    text = "Values are over the images of all seeds pooled: `value [95 % interval] ±standard deviation across seeds`.  "
    if found.unit == "seeds":
        return text + ("Every interval and paired verdict is a pairs cluster bootstrap over the seeds: seeds drawn with replacement, each with all "
                       "its images, the same seeds for both rows of a comparison (images of one seed share `paper_compat`'s noise draw, so they "
                       f"are not independent), widened by {found.widening:.2f} for {found.seeds} seeds (docs/testbed-v2.md §2d).")
    return text + ("**One seed: the intervals resample images**, which takes the images of the seed as independent; `paper_compat` rows share one "
                   "noise draw per seed, so their intervals and verdicts are too narrow.  Give several seeds for intervals over seeds.")


def replication_lines(report: V2Report) -> list[str]:
    """The Replication section: per question and metric, how many verdicts that name a winner
    hold on both halves of the seeds, and the claims that do not."""
    r = report.replication
    if r is None:
        if report.intervals is None:
            return []
        return ["## Replication", "", "One seed: no halves to replicate the verdicts on.", ""]
    percent = lambda x: "n/a" if x is None else f"{100 * x:.0f} %"  # noqa: E731
    columns = [Column("question", lambda g: g.question), Column("metric", lambda g: g.metric), Column("verdicts", lambda g: str(g.verdicts)),
               Column("claimed (a winner named)", lambda g: str(g.claimed)), Column("replicated", lambda g: str(g.replicated)),
               Column("strictly", lambda g: str(g.strict)), Column("share", lambda g: percent(g.share))]
    failed = [c for c in r.claims if not c.replicated]
    claim_columns = [Column("arch", lambda c: ARCH_NAMES[c.arch]), Column("budget", lambda c: f"{c.budget}x"), Column("question", lambda c: c.question),
                     *VERDICT_COLUMNS[:1], *VERDICT_COLUMNS[2:4], Column("verdict, all seeds", lambda c: c.verdict), HALVES_COLUMN]
    lines = ["## Replication", "",
             f"Every verdict of this report was made again on each half of the seeds ({r.halves[0]} and {r.halves[1]}; intervals over {r.unit}).  "
             f"Definition: {r.definition}.",
             "",
             f"**{r.replicated} of {r.claimed} verdicts that name a winner replicate ({percent(r.share)}); strictly, {r.strict} "
             f"({percent(r.strict_share)}).**  {r.verdicts} verdicts were made in all.",
             "", *table(columns, r.groups), ""]
    if failed:
        lines += ["Verdicts that name a winner on all seeds but do not replicate:", "", *table(claim_columns, failed), ""]
    return lines


def heldout_lines(report: V2Report) -> list[str]:
    """The last section: the ``--schedule`` rows against the plain pipeline with fewer steps,
    Bottleneck Sampling and the published preset on the held-out seeds."""
    h = report.heldout
    if h is None:
        return []
    columns = [Column("method", lambda r: r.method), Column("arch", lambda r: ARCH_NAMES[r.arch]), Column("budget", lambda r: f"{r.budget}x"),
               *[Column(label, (lambda k: lambda r: interval(r.metrics[k], DIGITS[k]))(key)) for key, label, _, _ in METRICS if key in HELDOUT_ROW_METRICS]]
    return ["## Held-out seeds (reported last)", "",
            f"Seeds {h.seeds}, {h.images_per_seed} images each: seeds on which nothing above was chosen or judged.  Only the `--schedule` rows and, "
            "at their budgets, the plain pipeline with fewer steps, Bottleneck Sampling (FLUX) and the published preset are sampled here, as above; "
            f"intervals and verdicts resample {h.unit}.  No baseline is sampled on these seeds, so PSNR and SSIM are left out.",
            "", *table(columns, h.rows), "",
            "Each `--schedule` row against each of those rows (paired, a winner only at 95 % confidence):", "", *table(VERDICT_COLUMNS, h.verdicts), ""]


def render_markdown(report: V2Report, figures: FigurePaths) -> str:
    cfg = report.config
    lines = [
        "# Image quality at matched cost (testbed v2)",
        "",
        f"Regenerate: `{report.command}` ({report.wall_seconds / 60:.1f} min, {cfg['threads_used']} CPU thread(s){_reuse_note(report)}).",
        "",
    ]
    if cfg["quick"]:
        lines += ["**Quick mode** (CI): a handful of images, short searches, few resamples.  It exercises every code path; its numbers mean nothing.", ""]
    lines += [
        "RALU against its peers at the same cost on testbed v2 (`ralu_lab.testbed.v2`, docs/testbed-v2.md): 64 px scenes in a factor-2 "
        "latent space, a FLUX generator in `FluxPipeline` and an SD3 generator in `StableDiffusion3Pipeline` (both with real classifier-free guidance), "
        "RALU through `from_pipe`, prompts of six attributes, three of them fine detail (texture, orientation, period), unprompted thin marks "
        "in every scene, and a classifier that reads all of it.",
        "",
        "## Set-up",
        "",
        f"- Seeds {cfg['seeds']}, {cfg['images']} images per seed: labels `balanced_labels(n, seed)`, one noise generator per image "
        f"(`image_generators`), the same for every row.  {intervals_text(report)}",
        f"- Weights: {', '.join(f'{k} `{v}`' for k, v in report.weights['folders'].items())} (file hashes in the JSON).",
        "- Metrics: **FD** in the v2 classifier's features against "
        f"{cfg['real_images']} real scenes; **spectral distance** of the mean radial power spectrum to the same real scenes; **fine accuracy**: "
        "texture, orientation and period all read back right; **accuracy**: all six prompt attributes right; **PSNR / SSIM** against the "
        "baseline sample of the same noise and labels; **blocking** on the 4 px grid of half-size latent pixels.",
        "- Cost, per image.  *Total*: every transformer forward priced by `count_flops` on the meta device at the image-token count it really ran "
        "(a hook on the first block records it), times its batch rows (both guide: FLUX in two forwards per step, SD3 in one forward over two rows), plus every "
        "decode priced the same way at the latent size really decoded: the final 64 px decode for every row and RALU's edge-selection decode of the "
        "half-size latent at 32 px.  *Linear*: the `nn.Linear` multiply-adds really executed (forward hooks: what a cache skips is not counted) plus "
        "the decodes' convolution and linear FLOPs; cache rows have only this one.",
        "",
    ]
    for arch, t in report.testbed.items():
        f = t.forward_gflops
        lines.append(f"- {ARCH_NAMES[arch]}: `{t.pipeline}`, baseline {t.base_steps} steps, h0 = {t.h0:.4f}, guidance {t.guidance_scale}, "
                     f"{t.guidance_branches} transformer row(s) per step; forward at {t.full_tokens} / {t.half_tokens} tokens "
                     f"{f[str(t.full_tokens)]['total']:.3f} / {f[str(t.half_tokens)]['total']:.3f} GFLOPs; decode at 64 / 32 px "
                     f"{t.decode_gflops['64 px']['total']:.3f} / {t.decode_gflops['32 px']['total']:.3f} GFLOPs; baseline {t.baseline_gflops_total:.2f} GFLOPs per image.")
    r = report.reference
    lines += ["", f"Floor (fresh real scenes with the same labels): FD {interval(r['fd'], 2)}, spectral distance {interval(r['spectral_distance'], 3)}, "
              f"fine accuracy {interval(r['fine_accuracy'], 3)}, accuracy {interval(r['accuracy'], 3)}, blocking {interval(r['blocking'], 3)}.", ""]
    if "sd3" in report.testbed:
        lines += ["Bottleneck Sampling and naive upsampling run on FLUX only: the harness's staged Euler sampler follows FluxPipeline's conventions "
                  "(packing, rotary positions, guidance input); SD3's patch embedding and classifier-free guidance would need a second sampler.", ""]
    lines += replication_lines(report)
    for arch in report.testbed:
        rows = [x for x in report.rows if x.arch == arch]
        lines += [f"## {ARCH_NAMES[arch]}", "", "### Methods", "", *table(DEFINITION_COLUMNS, [x for x in rows if x.cache is None]), ""]
        for budget in sorted({x.budget for x in rows}):
            group = [x for x in rows if x.budget == budget and x.cache is None]
            lines += [f"### {'baseline' if budget == 1 else f'{budget}x'}", "", *table(ROW_COLUMNS, group), ""]
            found = [v for v in report.verdicts if v.arch == arch and v.budget == budget and v.question != SCHEDULE_QUESTION]
            if found:
                lines += verdict_lines(report, found)
            lines += schedule_tables([v for v in report.verdicts if v.arch == arch and v.budget == budget and v.question == SCHEDULE_QUESTION],
                                    [r for r in report.rows if r.arch == arch and r.budget == budget])
            effects = [c for c in report.caches if c.arch == arch and c.budget == budget]
            if effects:
                lines += [f"Caches at {budget}x (speed-up in linear FLOPs executed, decoder included; quality change paired against the same row uncached):", "",
                          *table(CACHE_COLUMNS, effects), ""]
                against = [c for c in effects if c.against_plain]
                if against:
                    lines += ["The same cached RALU rows against the plain pipeline with fewer steps, uncached (paired bootstrap): what a cache on RALU "
                              "is worth next to the plain sampler of about its cost.", "", *table(CACHED_VS_PLAIN_COLUMNS, against), ""]
        g = report.regime.get(arch)
        if g:
            lines += [f"### Regime check ({g.budget}x)", "",
                      f"The plain pipeline with {g.fewer_steps} steps against the {g.baseline_steps}-step baseline: passed when it is worse on at least one "
                      "metric with 95 % confidence and by more than the spread across seeds.  "
                      f"**{'Passed' if g.passed else 'Not passed'}.**", "",
                      *table(REGIME_COLUMNS + ([REGIME_HALVES] if any(m.halves for m in g.metrics) else []), g.metrics), ""]
        lines += ["Accuracy per attribute (the first three survive a half-size stage, the last four are fine detail):", "",
                  *table(ATTRIBUTE_COLUMNS, [x for x in rows if x.cache is None]), ""]
        lines += [f"Samples (seed {cfg['seeds'][0]}; one row per method): ![samples {arch}]({figures.grids[arch]})", ""]
        for sweep in [s for s in report.sweeps if s.arch == arch]:
            lines += [f"### Noise strength sweep ({sweep.budget}x layout)", "",
                      f"RALU (ours, exact noise{', crop' if arch == 'sd3' else ''}) with the shifts re-optimised for each fixed Z; seeds {sweep.seeds}, "
                      f"{sweep.images_per_seed} images each; the global calibration puts Z at {sweep.global_z:.2f}.", "", *table(SWEEP_COLUMNS, sweep.points), ""]
    lines += [f"Quality against cost (bars: 95 % intervals): ![trade-off]({figures.tradeoff})", ""]
    if figures.sweep:
        lines += [f"![sweep]({figures.sweep})", ""]
    lines += heldout_lines(report)
    return "\n".join(lines)


def render_json(text: str) -> str:
    report = V2Report.model_validate_json(text)
    return render_markdown(report, figure_paths(report))


if __name__ == "__main__":
    sys.exit(render_from_json(sys.argv[1:], "ralu_lab.bench.quality.v2.report", render_json))
