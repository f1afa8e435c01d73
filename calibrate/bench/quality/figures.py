"""The report's figures: the sample grid and the quality-against-cost and sweep plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files, never windows

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ralu.calibrate.bench.quality.config import BASE_STEPS, METHOD_LABELS, METRICS  # noqa: E402
from ralu.calibrate.bench.quality.schema import QualityReport  # noqa: E402
from ralu.calibrate.testbed.evaluate import image_grid  # noqa: E402


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


def write_plots(report: QualityReport, tradeoff: Path, sweep_path: Path | None) -> None:
    """PNG: each metric against the measured FLOPs speed-up; and the metrics along the noise sweep."""
    rows = [r for r in report.rows if r.method != "baseline"]
    keys = list(dict.fromkeys(r.method for r in rows))
    markers = "osD^v<>ph*"
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8))
    for ax, (metric, label, higher) in zip(axes, METRICS):
        for j, key in enumerate(keys):
            pts = sorted((r for r in rows if r.method == key), key=lambda r: r.flops_speedup_total)
            ax.errorbar([r.flops_speedup_total for r in pts], [getattr(r, metric) for r in pts], yerr=[getattr(r, f"{metric}_std") or 0.0 for r in pts],
                        marker=markers[j % len(markers)], capsize=3, label=METHOD_LABELS.get(key, key), linestyle="-" if len(pts) > 1 else "none")
        ax.set_xlabel("FLOPs speed-up (total, testbed)")
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tradeoff.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tradeoff, dpi=110)
    plt.close(fig)

    sweep = report.sweep
    if sweep_path is None or not sweep:
        return
    points = sweep.points
    z = [p.z for p in points]
    panels = [("fd", "FD (lower better)"), ("accuracy", "accuracy"), ("psnr", f"PSNR vs {BASE_STEPS} steps (dB)"), ("edge_artifacts", "blocking index"), ("js_distance", "JS distance (calibration objective)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        ax.errorbar(z, [getattr(p, key) for p in points], yerr=[getattr(p, f"{key}_std", None) or 0.0 for p in points], marker="o", capsize=3)
        ax.axvline(sweep.global_optimum.z, color="grey", linestyle="--", linewidth=1, label=f"calibrated Z = {sweep.global_optimum.z:.1f}")
        ax.set_xscale("log")
        ax.set_xticks(z)
        ax.set_xticklabels([f"{v:g}" for v in z], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("Z = 1/sqrt(c)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Noise strength sweep, {sweep.budget}x preset layout {sweep.layout.steps} / {sweep.layout.ends}, shifts re-optimised per Z", fontsize=10)
    fig.tight_layout()
    fig.savefig(sweep_path, dpi=110)
    plt.close(fig)
