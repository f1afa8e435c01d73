"""``ralu-bench magcache``: measure MagCache's per-stage magnitude ratios of a schedule on the
offline testbed model and write the schedule with a ``cache`` section that uses them.

The ratios depend on the model as well as on the step grid: these are the testbed FLUX
model's, at the testbed's 32x32 (the schedule is moved there, as ``ralu-bench quality`` does).
For a real checkpoint call :func:`ralu.calibrate.magcache.measure_mag_ratios` with its
pipeline and put the result in the schedule's ``cache`` section the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "magcache",
        help="measure MagCache's per-stage magnitude ratios of a schedule on the testbed and write it with a cache section",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  ralu-bench magcache --schedule flux-dev-4x --out flux-dev-4x-magcache.json",
    )
    parser.add_argument("--schedule", required=True, help="schedule file or shipped name (a flux-dev schedule)")
    parser.add_argument("--out", type=Path, required=True, help="schedule file to write (with the cache section)")
    parser.add_argument("--images", type=int, default=8, help="images measured on, random testbed prompts (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the noise (default 0)")
    parser.add_argument("--threshold", type=float, default=0.06, help="MagCache's error threshold written to the section (default 0.06, diffusers')")
    parser.add_argument("--weights", type=Path, help="testbed transformer folder (default: the shipped weights)")
    parser.set_defaults(run=run_from_args)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    from ralu.runtime.cache import CacheSettings
    from ralu.runtime.schedule import ScheduleError, save_schedule, schedule_from_dict

    if args.images < 1:
        print(f"ralu-bench magcache: --images {args.images}: need at least 1. Fix: pass --images 8", file=sys.stderr)
        return 2
    if not 0.0 <= args.threshold <= 1.0:
        print(f"ralu-bench magcache: --threshold {args.threshold}: must lie in [0, 1]. Fix: pass e.g. --threshold 0.06", file=sys.stderr)
        return 2
    try:
        import torch
        from ralu.calibrate.magcache import measure_mag_ratios
        from ralu.calibrate.testbed.conditioning import encode_labels
        from ralu.calibrate.testbed.data import sample_labels
        from ralu.calibrate.testbed.model import load_pipeline, testbed_schedule
        from ralu.runtime import RALUFluxPipeline

        schedule = testbed_schedule(args.schedule)
        pipe = load_pipeline(path=args.weights, pipeline_class=RALUFluxPipeline)
        generator = torch.Generator().manual_seed(args.seed)
        labels = sample_labels(args.images, generator)
        call = {**encode_labels(labels), "generator": [torch.Generator().manual_seed(args.seed + i) for i in range(args.images)]}
        ratios = measure_mag_ratios(pipe, schedule, [call])
        settings = CacheSettings(kind="magcache", threshold=args.threshold, mag_ratios=[[round(r, 6) for r in stage] for stage in ratios])
        out = schedule_from_dict({**schedule.model_dump(), "cache": settings.model_dump(exclude_none=True)}, str(args.out))
        save_schedule(out, args.out)
    except (ScheduleError, ValueError, FileNotFoundError) as error:
        print(f"ralu-bench magcache: {str(error).splitlines()[0] if str(error) else error!r}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: MagCache ratios per stage {settings.mag_ratios}")
    return 0
