"""``ralu-bench magcache``: the measurement (see the package docstring)."""

from __future__ import annotations

import argparse
import sys

import torch

from ralu.calibrate.magcache import measure_mag_ratios
from ralu.calibrate.testbed.conditioning import encode_labels
from ralu.calibrate.testbed.data import sample_labels
from ralu.calibrate.testbed.model import load_pipeline, testbed_schedule
from ralu.runtime import RALUFluxPipeline
from ralu.runtime.cache import CacheSettings
from ralu.runtime.schedule import ScheduleError, save_schedule, schedule_from_dict


def run_from_args(args: argparse.Namespace) -> int:
    if args.images < 1:
        print(f"ralu-bench magcache: --images {args.images}: need at least 1. Fix: pass --images 8", file=sys.stderr)
        return 2
    if not 0.0 <= args.threshold <= 1.0:
        print(f"ralu-bench magcache: --threshold {args.threshold}: must lie in [0, 1]. Fix: pass e.g. --threshold 0.06", file=sys.stderr)
        return 2
    try:
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
