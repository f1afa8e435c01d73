"""``ralu-bench magcache``: the measurement (see the package docstring)."""

from __future__ import annotations

import argparse
import sys

from ralu.calibrate.magcache import measure_mag_ratios
from ralu.runtime.cache import CacheSettings
from ralu.runtime.schedule import ScheduleError, save_schedule, schedule_from_dict
from ralu_lab.bench.cache.run import testbed_call, testbed_pipeline
from ralu_lab.testbed.v2 import model as tb


def run_from_args(args: argparse.Namespace) -> int:
    if args.images < 1:
        print(f"ralu-bench magcache: --images {args.images}: need at least 1. Fix: pass --images 8", file=sys.stderr)
        return 2
    if not 0.0 <= args.threshold <= 1.0:
        print(f"ralu-bench magcache: --threshold {args.threshold}: must lie in [0, 1]. Fix: pass e.g. --threshold 0.06", file=sys.stderr)
        return 2
    try:
        schedule = tb.testbed_schedule(args.schedule)
        pipe = testbed_pipeline(schedule.family, args.weights_dir)
        ratios = measure_mag_ratios(pipe, schedule, [testbed_call(schedule.family, args.images, args.seed)])
        settings = CacheSettings(kind="magcache", threshold=args.threshold, mag_ratios=[[round(r, 6) for r in stage] for stage in ratios])
        out = schedule_from_dict({**schedule.model_dump(), "cache": settings.model_dump(exclude_none=True)}, str(args.out))
        save_schedule(out, args.out)
    except (ScheduleError, ValueError, FileNotFoundError) as error:
        print(f"ralu-bench magcache: {str(error).splitlines()[0] if str(error) else error!r}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: MagCache ratios per stage {settings.mag_ratios}")
    return 0
