"""``ralu-calibrate --magcache SCHEDULE``: MagCache's magnitude ratios measured per stage of a
schedule on the user's own pipeline and prompts, written into the schedule's ``cache`` section.

MagCache skips a step when the accumulated change of the transformer's residual, predicted by
a table of per-step magnitude ratios, stays under a threshold.  That table depends on the step
grid, and each RALU stage walks its own shifted grid at its own token count, so the 50-step
table of the plain sampler does not describe a RALU run (``ralu.runtime.cache``).  This
measures one ratio per step of every stage (:func:`ralu.calibrate.magcache.measure_mag_ratios`)
on a few prompts and writes the schedule with a ``magcache`` section that ``ralu-generate
--schedule`` applies.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ralu.runtime.schedule import load_schedule, save_schedule, schedule_from_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("MagCache ratios (--magcache SCHEDULE; uses --pipeline, --prompts, --batch-size, --guidance-scale, --device)")
    group.add_argument("--magcache", metavar="SCHEDULE",
                       help="measure MagCache's per-stage magnitude ratios of this schedule (file or shipped name) on --pipeline with --prompts, "
                       "and write the schedule with a magcache cache section to --out")
    group.add_argument("--magcache-threshold", type=float, default=0.06, metavar="T",
                       help="MagCache's accumulated-error threshold written to the section (default 0.06, diffusers'; 0 never skips)")


def check(args: argparse.Namespace):
    """Every input of ``--magcache``, before the pipeline is loaded: the schedule."""
    from ralu.runtime.models import get_model

    from .quality_cli import check_pipeline_options

    conflicting = [name for name, value in (("--speedup", args.speedup), ("--steps", args.steps), ("--ends", args.ends)) if value is not None]
    if conflicting or args.objective == "quality":
        raise ValueError(f"--magcache measures an existing schedule; {', '.join(conflicting) or '--objective quality'} calibrates a new one. Fix: drop them")
    missing = [name for name, value in (("--pipeline", args.pipeline), ("--prompts", args.prompts)) if value is None]
    if missing:
        raise ValueError(f"--magcache needs {', '.join(missing)}. Fix: e.g. --magcache flux-dev-7x --pipeline DIR --prompts prompts.txt")
    if not 0.0 <= args.magcache_threshold <= 1.0:
        raise ValueError(f"--magcache-threshold {args.magcache_threshold}: must lie in [0, 1]. Fix: e.g. 0.06")
    check_pipeline_options(args)
    schedule = load_schedule(args.magcache)
    if schedule.family != get_model(args.model).family:
        raise ValueError(f"--magcache {args.magcache} is a {schedule.model} schedule but --model is {get_model(args.model).name}. Fix: pass a schedule of this model")
    return schedule.model_copy(update={"cache": None})


def run_magcache(args: argparse.Namespace, out: Path) -> int:
    from ralu.runtime.batch import read_prompts
    from ralu.runtime.cache import CacheSettings

    from .magcache import measure_mag_ratios
    from .quality_cli import guidance_scale, load, target
    from .quality_search import to_ralu

    schedule = check(args)
    jobs = read_prompts(args.prompts, args.seed)
    started = time.perf_counter()
    if Path(args.pipeline).is_dir():
        pipe, options = load(args)
    else:  # a registered quality target: its pipeline, its prompt encoder, the schedule at its own size
        found = target(args)
        pipe, options = found.pipe, found.options
        schedule = found.adapt_schedule(schedule)
    ralu = to_ralu(pipe)
    encode = options.get("encode")
    device = ralu._execution_device
    calls = []
    for i in range(0, len(jobs), args.batch_size):
        batch = jobs[i : i + args.batch_size]
        prompts = [job.prompt for job in batch]
        inputs = encode(prompts) if encode else {"prompt": prompts}
        inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in inputs.items()}
        calls.append({**inputs, "guidance_scale": guidance_scale(args, options), "generator": [torch.Generator("cpu").manual_seed(job.seed) for job in batch]})
    with torch.no_grad():
        ratios = measure_mag_ratios(ralu, schedule, calls)
    settings = CacheSettings(kind="magcache", threshold=args.magcache_threshold, mag_ratios=[[round(r, 6) for r in stage] for stage in ratios])
    written = schedule_from_dict({**schedule.model_dump(), "cache": settings.model_dump(exclude_none=True)}, str(out))
    save_schedule(written, out)
    print(f"MagCache ratios of {args.magcache} ({' + '.join(str(s.steps) for s in schedule.stages)} steps) on {len(jobs)} prompt(s), "
          f"{time.perf_counter() - started:.1f} s:", file=sys.stderr if args.quiet else sys.stdout)
    for k, stage in enumerate(settings.mag_ratios):
        print(f"  stage {k + 1}: " + " ".join(f"{r:.4f}" for r in stage))
    print(f"wrote {out} (cache: magcache, threshold {args.magcache_threshold:g}); run it with ralu-generate --schedule {out}")
    return 0
