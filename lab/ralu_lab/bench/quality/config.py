"""What every row of the quality harness shares: the published FLUX presets, the peers' defaults, the
noise sweep's Z values, the rows' labels and the ``--schedule`` rows' names."""

from __future__ import annotations

from pathlib import Path

from ralu.calibrate.presets import PRESETS, PublishedPreset
from ralu.runtime.models import get_model

#: Steps of FLUX.1-dev's baseline.
BASE_STEPS = get_model("flux-dev").base_steps

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

METHOD_LABELS = {
    "baseline": f"baseline ({BASE_STEPS} steps)",
    "base-steps": "base model, fewer steps",
    "bottleneck": "Bottleneck Sampling",
    "naive-upsample": "naive two-stage upsampling",
    "ralu-paper": "RALU, published preset (paper_compat)",
    "ralu-ours": "RALU, ours (exact noise, global calibration)",
    "ralu-searched": "RALU, searched layout",
}


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
    """The command-line values the configuration takes as they are (None: not given).
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
