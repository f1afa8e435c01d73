"""v2's figures: the sample grids, quality against the measured speed-up with interval bars,
and the noise sweeps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files, never windows

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ralu_lab.bench.quality.v2.plan import ARCH_NAMES  # noqa: E402
from ralu_lab.bench.quality.v2.schema import V2Report  # noqa: E402
from ralu_lab.testbed.v2.evaluate import image_grid  # noqa: E402

#: The plotted metrics: key and title.
PANELS = (("fd", "FD (lower better)"), ("fine_accuracy", "fine accuracy (higher better)"), ("spectral_distance", "spectral distance (lower better)"))


@dataclass
class SampleGrid:
    """The first images of the first seed: the real images, then every method's, one row each."""

    order: list[tuple[str, float, str]]  # (method key, budget, label) per row
    images: list[Any]  # a (n, 3, H, W) tensor in [-1, 1] per row


def write_grid(samples: SampleGrid, path: Path) -> None:
    """PNG: one row per method (seed 0's first images), labelled on the left."""
    order, images = samples.order, samples.images
    columns = images[0].shape[0]
    scale = 3
    picture = image_grid(torch.cat(images), columns=columns, scale=scale)
    cell = picture.height // len(order)
    margin = 270
    canvas = Image.new("RGB", (picture.width + margin, picture.height), "white")
    canvas.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (key, budget, label) in enumerate(order):
        text = label if key in ("baseline", "real") else f"{budget}x  {label}"
        draw.text((6, row * cell + cell // 2 - 6), text[:52], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _bars(estimates) -> list[list[float]]:
    # a percentile interval of a set metric need not contain the full set's value: clip at 0
    return [[max(0.0, e.value - e.low) for e in estimates], [max(0.0, e.high - e.value) for e in estimates]]


def write_plots(report: V2Report, out_dir: Path, figures) -> None:
    arches = list(report.testbed)
    fig, axes = plt.subplots(len(arches), len(PANELS), figsize=(4.4 * len(PANELS), 3.8 * len(arches)), squeeze=False)
    for row, arch in enumerate(arches):
        rows = [r for r in report.rows if r.arch == arch and r.method != "baseline"]
        keys = list(dict.fromkeys(r.method for r in rows))
        for ax, (metric, title) in zip(axes[row], PANELS):
            for j, key in enumerate(keys):
                pts = sorted((r for r in rows if r.method == key), key=lambda r: r.flops_speedup_linear)
                xs = [r.flops_speedup_total or r.flops_speedup_linear for r in pts]
                es = [r.metrics[metric] for r in pts]
                ax.errorbar(xs, [e.value for e in es], yerr=_bars(es), marker="osD^v<>ph*"[j % 10], capsize=3, label=key, linestyle="-" if len(pts) > 1 else "none")
            ax.set_xlabel("FLOPs speed-up (total; cache rows: linear)")
            ax.set_title(f"{ARCH_NAMES[arch]}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=6)
    fig.tight_layout()
    path = Path(out_dir) / figures.tradeoff
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    if not figures.sweep:
        return
    fig, axes = plt.subplots(len(report.sweeps), len(PANELS), figsize=(4.2 * len(PANELS), 3.6 * len(report.sweeps)), squeeze=False)
    for row, sweep in enumerate(report.sweeps):
        z = [p.z for p in sweep.points]
        for ax, (metric, title) in zip(axes[row], PANELS):
            es = [p.metrics[metric] for p in sweep.points]
            ax.errorbar(z, [e.value for e in es], yerr=_bars(es), marker="o", capsize=3)
            ax.axvline(sweep.global_z, color="grey", linestyle="--", linewidth=1, label=f"calibrated Z = {sweep.global_z:.1f}")
            ax.set_xscale("log")
            ax.set_xlabel("Z = 1/sqrt(c)")
            ax.set_title(f"{ARCH_NAMES[sweep.arch]} {sweep.budget}x: {title}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / figures.sweep, dpi=100)
    plt.close(fig)
