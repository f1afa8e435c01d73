"""Where in the spectrum the rows of ``ralu-bench quality`` differ from real scenes and from
the 50-step baseline (testbed v2, FLUX).

    python -m ralu.calibrate.bench.quality.v2.spectra --budget 4 --schedule A.json \\
        --rows base-steps bottleneck ralu-paper --out reports/quality-search-v2/spectra-4x

The harness's spectral distance compares a row's mean radial power spectrum with that of
real scenes.  A sampler can lower it in two ways: by following the generator more closely
(then it also comes nearer the 50-step baseline, the generator's own best), or by departing
from the generator where the generator itself is off (then it moves away from the
baseline).  A quality search scored against 50-step samples looks for the first kind only.
This report tells the two apart: per row, the distance to real scenes (the harness's
number), the distance to the 50-step baseline of the same noise and labels (``|log10``
ratio``|`` of the mean spectra, averaged over radii, with a bootstrap interval over the same
resampled images of both), the signed log power ratio in bands of radii, and a figure of
both ratios per radius.  It samples through the harness's planning, noise, work folder and
real reference (:mod:`ralu.calibrate.bench.quality.v2.heldout`), so its rows' distances to
real scenes are the harness's values.
"""

from __future__ import annotations

import datetime as _dt
import io
import shlex
import sys
import time
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict

from ralu.calibrate.bench.common import fail, write_report
from ralu.calibrate.bench.quality.v2.heldout import build_parser, check_args, prepare
from ralu.calibrate.bench.quality.v2.report import interval
from ralu.calibrate.bench.quality.v2.schema import Estimate
from ralu.calibrate.bench.quality.v2.stats import measure_seeds, seed_std
from ralu.calibrate.testbed.v2 import metrics
from ralu.runtime.schedule import write_bytes_atomic

PROG = "python -m ralu.calibrate.bench.quality.v2.spectra"
#: Bands of radii (cycles per 64-pixel image), both ends included.  The testbed's fine
#: attributes (texture, orientation, period) live in the upper two; a half-size latent
#: pixel is 4 image pixels (radius 16), so nearest upsampling's blocks show at 16 and 32.
BANDS = {"coarse (1-4)": (1, 4), "middle (5-12)": (5, 12), "fine (13-32)": (13, 32)}


class SpectrumRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    label: str
    describe: str
    gflops_total: float
    #: the harness's spectral distance (to real scenes)
    to_real: Estimate
    #: the same distance to the 50-step baseline's images of the same noise and labels
    to_baseline: Estimate
    #: per band: mean over its radii of log10(row power / real power), and / baseline power
    bands_real: dict[str, float]
    bands_baseline: dict[str, float]
    #: per radius 1 .. 32: log10 of the mean power ratio
    log_ratio_real: list[float]
    log_ratio_baseline: list[float]


class SpectrumReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str
    created: str
    budget: int
    seeds: list[int]
    images_per_seed: int
    threads: int
    bands: dict[str, tuple[int, int]]
    rows: list[SpectrumRow]


def log_ratio(spectra: torch.Tensor, other: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(R,)``: log10 of the ratio of two sets' mean radial spectra, radius 1 .. R."""
    return torch.log10(spectra.mean(0) + eps) - torch.log10(other.mean(0) + eps)


def band_means(ratio: torch.Tensor) -> dict[str, float]:
    return {name: ratio[lo - 1:hi].mean().item() for name, (lo, hi) in BANDS.items()}


def distance_to(spectra: torch.Tensor, other: torch.Tensor, seeds: int, resamples: int) -> Estimate:
    """:func:`metrics.spectral_distance` of two paired spectra sets, with an interval over
    images resampled alike for both (image i of each shares noise and label)."""
    pairs = torch.stack([spectra, other], dim=1)
    found = metrics.set_interval(pairs, lambda p: metrics.spectral_distance(p[:, 0], p[:, 1]), n_resamples=resamples)
    per_seed = [metrics.spectral_distance(s, o) for s, o in zip(spectra.chunk(seeds), other.chunk(seeds))]
    return Estimate(value=found.value, low=found.low, high=found.high, seed_std=seed_std(per_seed), per_seed=per_seed)


def run(args, log=print) -> SpectrumReport:
    prepared = prepare(args, baseline=True)
    sampler, stats, reference = prepared.sampler, prepared.stats, prepared.reference
    spectra, rows = {}, []
    for i, method in enumerate(prepared.chosen):
        t0 = time.process_time()
        costs = []

        def sample(labels, seed, method=method, costs=costs):
            images, cost, _ = sampler.run(method, labels, seed)
            costs.append(cost)
            return images

        m = measure_seeds(sample, prepared.config.seeds, prepared.config.images, reference)
        spectra[method.key] = mine = m.per_image["spectra"]
        base = spectra["baseline"]  # the baseline is the first chosen row
        ratio_real, ratio_base = log_ratio(mine, reference.spectra), log_ratio(mine, base)
        rows.append(SpectrumRow(method=method.key, label=method.label, describe=method.details.get("describe", ""), gflops_total=costs[0].total / 1e9,
                                to_real=Estimate(**stats.estimate("spectral_distance", m)),
                                to_baseline=distance_to(mine, base, len(prepared.config.seeds), stats.set_resamples),
                                bands_real=band_means(ratio_real), bands_baseline=band_means(ratio_base),
                                log_ratio_real=ratio_real.tolist(), log_ratio_baseline=ratio_base.tolist()))
        log(f"[{i + 1}/{len(prepared.chosen)}] {method.key:<40} to real {rows[-1].to_real.value:.3f}  to baseline {rows[-1].to_baseline.value:.3f}  "
            f"({time.process_time() - t0:.0f} s CPU)")
    return SpectrumReport(command=f"{PROG} {shlex.join(args.argv)}".strip(), created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                          budget=args.budget, seeds=list(prepared.config.seeds), images_per_seed=prepared.config.images,
                          threads=torch.get_num_threads(), bands=dict(BANDS), rows=rows)


def render_markdown(report: SpectrumReport, figure: str) -> str:
    bands = list(report.bands)
    lines = [
        f"# Spectra of the rows against real scenes and the 50-step baseline (testbed v2, FLUX {report.budget}x)",
        "",
        f"Regenerate: `{report.command}`.",
        "",
        f"Seeds {report.seeds}, {report.images_per_seed} images each, sampled as `ralu-bench quality` samples them.  Distances: mean over radii "
        "1-32 of `|log10 P_row(r) - log10 P_other(r)|`, P a set's mean radial power spectrum (0: same spectrum; 0.1: 26 % power apart on "
        "average); `value [95 % bootstrap interval over images] ±spread over seeds`.  Bands: mean signed `log10 P_row / P_other` over "
        "their radii (positive: more power than the other).",
        "",
        "| row | GFLOPs per image | to real scenes (the harness's) | to the 50-step baseline | "
        + " | ".join(f"vs real: {b}" for b in bands) + " | " + " | ".join(f"vs baseline: {b}" for b in bands) + " |",
        "|---|---|---|---|" + "---|" * (2 * len(bands)),
    ]
    for r in report.rows:
        lines.append(f"| {r.method} | {r.gflops_total:.2f} | {interval(r.to_real, 3)} | {interval(r.to_baseline, 3)} | "
                     + " | ".join(f"{r.bands_real[b]:+.3f}" for b in bands) + " | " + " | ".join(f"{r.bands_baseline[b]:+.3f}" for b in bands) + " |")
    lines += ["", f"![log power ratio per radius]({figure})", ""]
    return "\n".join(lines)


def figure_png(report: SpectrumReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, title in zip(axes, ("log_ratio_real", "log_ratio_baseline"), ("vs real scenes", "vs the 50-step baseline")):
        for k, r in enumerate(report.rows):
            values = getattr(r, key)
            ax.plot(range(1, len(values) + 1), values, marker="osD^v<>ph*"[k % 10], markersize=3, label=r.method)
        ax.axhline(0.0, color="grey", linewidth=1)
        for radius in (16, 32):
            ax.axvline(radius, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("radius (cycles per image)")
        ax.set_ylabel("log10 power ratio")
        ax.set_title(f"FLUX {report.budget}x: mean radial power {title}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(PROG, "spectra of ralu-bench quality rows against real scenes and the 50-step baseline (testbed v2, FLUX)",
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
