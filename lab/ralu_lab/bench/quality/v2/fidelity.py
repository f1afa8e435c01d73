"""The quality search's own score on held-out seeds: how far each row of ``ralu-bench quality``
and each schedule file stays from the 50-step baseline, and where its spectrum departs.

    python -m ralu_lab.bench.quality.v2.fidelity --budget 4 --schedule PICK.json \\
        --rows base-steps bottleneck ralu-paper --out reports/experiments/quality-search-v2/budget-filling/fidelity-4x

``ralu-calibrate --objective quality`` scores a candidate by the Frechet distance, in the
classifier's features, between its samples and 50-step samples of the same prompts drawn from
other noise.  This report measures that score for the chosen rows on the harness's held-out
seeds, sampled exactly as the harness samples them (:mod:`.heldout`: labels, noise, work
folder, real reference).  The reference set is the 50-step baseline for the same labels from
independent noise (seed + :data:`REFERENCE_NOISE_OFFSET`), as in the search: a row that keeps
every image near its own baseline image (the plain sampler with fewer steps) gets no credit
for the pairing that a same-noise reference would give it.

Beside the score it reports the spectral distance to that reference and to real scenes (the
harness's), the signed log power ratio in bands of radii, and a figure per radius.  The two
references answer different questions.  The testbed's generator is itself off real scenes
(its 50-step baseline: FD 1036 and spectral distance 0.276 to real scenes, the real floor 91
and 0.031), so a row can come nearer real scenes in two ways: by following the generator
more closely (it then also comes nearer the baseline) or by departing from the generator
where the generator is off (it then moves away from the baseline).  A search scored against
50-step samples looks for the first kind; this report shows which kind each row's edge is.

Every schedule row meets every other row (not the reference) on :data:`FIDELITY_METRICS`,
with the harness's paired cluster bootstrap: the same resampled seeds for both rows and the
reference (one seed: images).
"""

from __future__ import annotations

import datetime as _dt
import io
import shlex
import sys
import time
from collections.abc import Callable, Sequence

import torch

from ralu.runtime.schedule import write_bytes_atomic
from ralu_lab.bench.common import fail, write_report
from ralu_lab.bench.quality.v2.heldout import HeldoutReport, HeldoutRow, build_parser, check_args, gflops_cell, interval_legend, intervals_unit, prepare, row_fields
from ralu_lab.bench.quality.v2.report import DIGITS, beaters, interval, verdict_cell
from ralu_lab.bench.quality.v2.schema import Estimate, Verdict
from ralu_lab.bench.quality.v2.stats import seed_std
from ralu_lab.testbed.v2 import metrics

PROG = "python -m ralu_lab.bench.quality.v2.fidelity"
#: The reference's noise seed is the held-out seed plus this (labels stay the seed's own).
REFERENCE_NOISE_OFFSET = 1000
#: Distances to the reference: the search's score (FD in classifier features) and the
#: spectral distance, as (key, label, items measured, set metric of two item sets).
FIDELITY_METRICS: tuple[tuple[str, str, str, Callable[[torch.Tensor, torch.Tensor], float]], ...] = (
    ("fd_to_baseline", "FD to 50-step samples (the search's score)", "features", metrics.frechet_distance),
    ("spectral_to_baseline", "spectral distance to 50-step samples", "spectra", metrics.spectral_distance),
)
QUESTION = "schedule vs row: distance to 50-step samples of other noise"
#: Bands of radii (cycles per 64-pixel image), both ends included.  The testbed's fine
#: attributes (texture, orientation, period) show in the upper two; a half-size latent pixel
#: is 4 image pixels, so nearest upsampling's blocks would show at radii 16 and 32.
BANDS = {"coarse (1-4)": (1, 4), "middle (5-12)": (5, 12), "fine (13-32)": (13, 32)}


class FidelityRow(HeldoutRow):
    """A held-out row whose ``metrics`` are :data:`FIDELITY_METRICS`' distances to the
    reference, then the harness's to real scenes (``fd``, ``spectral_distance``)."""

    #: per band: mean over its radii of log10(row power / real power), and / reference power
    bands_real: dict[str, float]
    bands_baseline: dict[str, float]
    #: per radius 1 .. 32: log10 of the ratio of mean powers
    log_ratio_real: list[float]
    log_ratio_baseline: list[float]


class FidelityReport(HeldoutReport):
    reference_noise_offset: int
    bands: dict[str, tuple[int, int]]
    rows: list[FidelityRow]


def log_ratio(spectra: torch.Tensor, other: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(R,)``: log10 of the ratio of two sets' mean radial spectra, radius 1 .. R."""
    return torch.log10(spectra.mean(0) + eps) - torch.log10(other.mean(0) + eps)


def band_means(ratio: torch.Tensor) -> dict[str, float]:
    return {name: ratio[lo - 1:hi].mean().item() for name, (lo, hi) in BANDS.items()}


def paired(distance: Callable[[torch.Tensor, torch.Tensor], float]) -> Callable[[torch.Tensor], float]:
    """A set metric of ``(n, 2, ...)`` pairs (row item, reference item): resampling image i
    resamples its reference image too."""
    return lambda pairs: distance(pairs[:, 0], pairs[:, 1])


def seed_clusters(n: int, seeds: int) -> torch.Tensor:
    """Which seed each of ``n`` items pooled seed after seed belongs to (the chunks of ``torch.chunk``)."""
    return torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(torch.arange(n).chunk(seeds))])


def distance_to(items: torch.Tensor, reference: torch.Tensor, distance, seeds: int, resamples: int) -> Estimate:
    """``distance(items, reference)`` with a bootstrap interval over seeds (each with its
    reference images; one seed: over images) and its value per seed."""
    found = metrics.cluster_set_interval(torch.stack([items, reference], dim=1), seed_clusters(items.shape[0], seeds), paired(distance), n_resamples=resamples)
    per_seed = [distance(a, b) for a, b in zip(items.chunk(seeds), reference.chunk(seeds))]
    return Estimate(value=found.value, low=found.low, high=found.high, seed_std=seed_std(per_seed), per_seed=per_seed)


def run(args, log=print) -> FidelityReport:
    prepared = prepare(args, baseline=True)
    stats, real, seeds = prepared.stats, prepared.reference, prepared.config.seeds
    reference_method, *chosen = prepared.chosen  # prepare puts the baseline first
    t0 = time.process_time()
    reference, _ = prepared.measure(reference_method, REFERENCE_NOISE_OFFSET)
    log(f"[reference] 50-step samples, noise seeds {[s + REFERENCE_NOISE_OFFSET for s in seeds]}  ({time.process_time() - t0:.0f} s CPU)")
    rows, measured = [], {}
    for i, method in enumerate(chosen):
        t0 = time.process_time()
        m, cost = prepared.measure(method)
        measured[method.key] = m
        found = {key: distance_to(m.per_image[items], reference.per_image[items], distance, len(seeds), stats.set_resamples)
                 for key, _, items, distance in FIDELITY_METRICS}
        found.update({key: Estimate(**stats.estimate(key, m)) for key in ("fd", "spectral_distance")})
        ratio_real, ratio_base = log_ratio(m.per_image["spectra"], real.spectra), log_ratio(m.per_image["spectra"], reference.per_image["spectra"])
        rows.append(FidelityRow(**row_fields(method, cost), metrics=found, bands_real=band_means(ratio_real), bands_baseline=band_means(ratio_base),
                                log_ratio_real=ratio_real.tolist(), log_ratio_baseline=ratio_base.tolist()))
        log(f"[{i + 1}/{len(chosen)}] {method.key:<40} FD to 50-step {found['fd_to_baseline'].value:8.1f}  "
            f"spectral to 50-step {found['spectral_to_baseline'].value:.3f}  ({time.process_time() - t0:.0f} s CPU)")
    by_key = {r.method: r for r in rows}
    verdicts = []
    for a in (r for r in rows if r.method.startswith("schedule:")):
        for b in (r for r in rows if r is not a):
            for key, _, items, distance in FIDELITY_METRICS:
                pair_a = torch.stack([measured[a.method].per_image[items], reference.per_image[items]], dim=1)
                pair_b = torch.stack([measured[b.method].per_image[items], reference.per_image[items]], dim=1)
                c = metrics.paired_cluster_set_bootstrap(pair_a, pair_b, reference.image_seeds, paired(distance), False, n_resamples=stats.set_resamples,
                                                         names=(a.method, b.method))
                verdicts.append(Verdict(arch="flux", budget=args.budget, metric=key, question=QUESTION, a=a.method, b=b.method,
                                        a_value=by_key[a.method].metrics[key].value, b_value=by_key[b.method].metrics[key].value,
                                        difference=c.difference, low=c.low, high=c.high, verdict=c.verdict))
    return FidelityReport(command=f"{PROG} {shlex.join(args.argv)}".strip(), created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                          budget=args.budget, seeds=list(seeds), images_per_seed=prepared.config.images, reference_noise_offset=REFERENCE_NOISE_OFFSET,
                          threads=torch.get_num_threads(), bands=dict(BANDS), rows=rows, verdicts=verdicts, intervals=intervals_unit(seeds))


def render_markdown(report: FidelityReport, figure: str) -> str:
    bands = list(report.bands)
    labels = {key: label for key, label, _, _ in FIDELITY_METRICS}
    lines = [
        f"# The quality search's score on held-out seeds, and spectra (testbed v2, FLUX {report.budget}x)",
        "",
        f"Regenerate: `{report.command}`.",
        "",
        f"Seeds {report.seeds}, {report.images_per_seed} images each, sampled as `ralu-bench quality` samples them.  The reference: 50-step "
        f"samples of the same labels from other noise (seed + {report.reference_noise_offset}), as the search scores candidates.  "
        f"{interval_legend(report, spread=True)}.  Spectral distance: mean over radii 1-32 of "
        "`|log10 P_row(r) - log10 P_other(r)|`, P a set's mean radial power spectrum (0.1: 26 % power apart on average).  "
        "Bands: mean signed `log10 P_row / P_other` over their radii (positive: more power than the other).",
        "",
        "| row | GFLOPs per image (total) | " + " | ".join(labels.values()) + " | FD to real scenes (the harness's) | spectral distance to real scenes (the harness's) | "
        + " | ".join(f"vs real: {b}" for b in bands) + " | " + " | ".join(f"vs 50-step: {b}" for b in bands) + " |",
        "|---|---|" + "---|" * (len(labels) + 2 + 2 * len(bands)),
    ]
    for r in report.rows:
        lines.append(f"| {r.method} | {gflops_cell(r)} | " + " | ".join(interval(r.metrics[k], DIGITS[k]) for k in labels)
                     + f" | {interval(r.metrics['fd'], 1)} | {interval(r.metrics['spectral_distance'], 3)} | "
                     + " | ".join(f"{r.bands_real[b]:+.3f}" for b in bands) + " | " + " | ".join(f"{r.bands_baseline[b]:+.3f}" for b in bands) + " |")
    for name in dict.fromkeys(v.a for v in report.verdicts):
        mine = [v for v in report.verdicts if v.a == name]
        said = []
        for key, label in labels.items():
            beaten = sorted({v.b for v in mine if v.metric == key and v.verdict == f"{v.b} better"})
            said.append(f"{label}: **beaten by {beaters(beaten, report.rows, name)}**" if beaten else f"{label}: beaten by none")
        lines += ["", f"`{name}`: " + "; ".join(said) + ".", "",
                  "| other row | " + " | ".join(f"{label}: schedule - other" for label in labels.values()) + " |",
                  "|---|" + "---|" * len(labels)]
        cells = {(v.b, v.metric): verdict_cell(v) for v in mine}
        for other in dict.fromkeys(v.b for v in mine):
            lines.append(f"| {other} | " + " | ".join(cells[(other, k)] for k in labels) + " |")
    lines += ["", f"![log power ratio per radius]({figure})", ""]
    return "\n".join(lines)


def figure_png(report: FidelityReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # figures are files, never windows
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    # one colour per row (tab20 has 20); schedule files solid, the first (the one under test) bold, harness rows dashed
    colours = plt.get_cmap("tab20" if len(report.rows) > 10 else "tab10")
    first = next((r.method for r in report.rows if r.method.startswith("schedule:")), None)
    for ax, key, title in zip(axes, ("log_ratio_real", "log_ratio_baseline"), ("vs real scenes", "vs 50-step samples of other noise")):
        for k, r in enumerate(report.rows):
            values = getattr(r, key)
            style = dict(linewidth=2.6, zorder=3) if r.method == first else dict(linewidth=1.1, linestyle="-" if r.method.startswith("schedule:") else "--")
            ax.plot(range(1, len(values) + 1), values, color=colours(k % colours.N), marker="osD^v<>ph*"[k % 10], markersize=3, label=r.method, **style)
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.set_xlabel("radius (cycles per image)")
        ax.set_ylabel("log10 power ratio")
        ax.set_title(f"FLUX {report.budget}x: mean radial power {title}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(PROG, "the quality search's score (distance to 50-step samples) of ralu-bench quality rows on held-out seeds (testbed v2, FLUX)",
                          ("base-steps", "bottleneck", "ralu-paper"))
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        check_args(args)
        report = run(args)
    except (FileNotFoundError, ValueError) as error:
        return fail(PROG, error)
    figure = f"{args.out.name}.png"
    write_bytes_atomic(args.out.parent / figure, figure_png(report))
    md, _ = write_report(args.out.parent, args.out.name, render_markdown(report, figure), report.model_dump(mode="json"))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
