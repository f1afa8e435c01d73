"""What the quality benchmark runs: the published presets, the peers' defaults, the metrics, and its configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ralu.calibrate.presets import PRESETS, PublishedPreset
from ralu.runtime.models import get_model

REPORT_NAME = "quality-v1"
#: Steps of the baseline (FLUX.1-dev's).
BASE_STEPS = get_model("flux-dev").base_steps
#: PSNR of identical images (dB): the cap keeps every number finite in JSON.
PSNR_CAP = 100.0
#: Generator seed of the real reference images (disjoint from the sample seeds).
REAL_SEED = 1_000_000_033

#: The published FLUX presets by budget (docs/method.md §5, calibrated by the paper with h0 =
#: ``PAPER_H0``): the budgets of the table are named after them.
PAPER_PRESETS: dict[int, PublishedPreset] = {int(p.target): p for p in PRESETS if p.model == "flux-dev"}

#: Bottleneck Sampling's FLUX defaults (docs/method.md §7): resolutions, steps, shifts relative to
#: the base shift 3, and the noise level each stage restarts from.
BOTTLENECK_ROLES = ("full", "half", "full")
BOTTLENECK_STEPS = (6, 20, 8)
BOTTLENECK_SHIFT_FACTORS = (9.0 / 3.0, 6.0 / 3.0, 9.0 / 3.0)
BOTTLENECK_RESTARTS = (1.0, 0.8, 0.6)

DEFAULT_Z_VALUES = (2.5, 4.0, 6.0, 9.0, 14.0, 22.0, 35.0, 55.0, 90.0)
QUICK_Z_VALUES = (4.0, 35.0)

#: Metrics: (key, label, True when higher is better).
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("psnr", "PSNR (dB)", True),
    ("ssim", "SSIM", True),
    ("fd", "FD", False),
    ("accuracy", "accuracy", True),
    ("edge_artifacts", "blocking", False),
)

#: Reported but not used to pick winners: blocking on the 4x4 grid of RALU's low-res tokens
#: (seams between upsampled and not-upsampled cells).
EXTRA_METRICS: tuple[tuple[str, str, bool], ...] = (("edge_artifacts_4x4", "blocking 4x4", False),)

METHOD_LABELS = {
    "baseline": f"baseline ({BASE_STEPS} steps)",
    "base-steps": "base model, fewer steps",
    "bottleneck": "Bottleneck Sampling",
    "naive-upsample": "naive two-stage upsampling",
    "ralu-paper": "RALU, published preset (paper_compat)",
    "ralu-ours": "RALU, ours (exact noise, global calibration)",
    "ralu-searched": "RALU, searched layout",
}
RALU_METHODS = ("ralu-paper", "ralu-ours", "ralu-searched")
PEER_METHODS = ("base-steps", "bottleneck", "naive-upsample")


@dataclass
class Config:
    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    images: int = 128
    budgets: tuple[int, ...] = (4, 7)
    schedules: tuple[str, ...] = ()
    z_values: tuple[float, ...] = DEFAULT_Z_VALUES
    sweep_seeds: tuple[int, ...] = (0,)
    sweep_budget: int = 4
    trials: int = 80
    real_images: int = 1000
    grid_images: int = 12
    batch_size: int = 64
    threads: int | None = 2
    weights: str | None = None
    classifier: str | None = None
    size: int = 32
    h0: float = 0.0
    guidance_scale: float = 3.5


def schedule_row_name(path) -> str:
    """The row a ``--schedule`` file adds is named after the file, without ``.json``."""
    return Path(str(path)).name.removesuffix(".json")


def check_row_names(paths) -> None:
    """Two ``--schedule`` files of one name would share a row (ValueError: one line with the fix)."""
    seen: dict[str, str] = {}
    for path in paths:
        name = schedule_row_name(path)
        if name in seen:
            raise ValueError(f"--schedule {seen[name]} and --schedule {path} would both be the row 'schedule:{name}'. Fix: copy one to a file of another name")
        seen[name] = str(path)


def shared_overrides(args) -> dict:
    """The command-line values both testbeds' configurations take as they are (None: not given).
    ValueError when two ``--schedule`` files would share a row."""
    check_row_names(args.schedule or ())
    return {
        "seeds": tuple(args.seeds) if args.seeds else None,
        "images": args.images,
        "schedules": tuple(str(s) for s in args.schedule) if args.schedule else None,
        "z_values": tuple(args.z_values) if args.z_values is not None else None,
        "trials": args.trials,
        "real_images": args.real_images,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
