"""``ralu-calibrate --objective quality``: the quality-in-the-loop search from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ralu.runtime.schedule import save_schedule

#: ``--guidance-scale`` of a pipeline folder when none is given.
DEFAULT_GUIDANCE_SCALE = 3.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quality search (--objective quality)")
    group.add_argument("--pipeline", help="local diffusers pipeline folder (FLUX or SD3), or the name of a registered quality target "
                       "(entry-point group ralu.quality_targets, docs/plugins.md; the lab registers 'testbed')")
    group.add_argument("--prompts", type=Path, help="prompts file: one prompt per line, or *.jsonl with prompt and seed (seeds default to --seed + index)")
    group.add_argument("--metric", help="distance to the base model's samples: pixel (default for a folder, no weights), a folder holding a feature model "
                       "saved with torch.export.save as features.pt2, or a name a quality target knows (the testbed's default: testbed-v2-fd)")
    group.add_argument("--reference-seed-offset", type=int, default=0, metavar="K",
                       help="draw the base model's samples from seed + K (default 0: the same seeds; with a set metric such as testbed-v2-fd, "
                       "K != 0 compares distributions instead of rewarding a retrace of the base model's path)")
    group.add_argument("--spectral-weight", type=float, default=None, metavar="W",
                       help="score = distance x (1 + W x spectral distance), the spectral distance between the mean radial power spectra of the "
                       "candidate's images and the base model's samples (default 4: the reason is in ralu.calibrate.quality_search.SPECTRAL_WEIGHT; "
                       "0: the distance alone)")
    group.add_argument("--cache-dir", type=Path, help="where the base model's reference samples are kept between runs (default .ralu-references)")
    group.add_argument("--batch-size", type=int, default=8, help="images per pipeline call and per pruning report (default 8)")
    group.add_argument("--guidance-scale", type=float, default=None, help="default: the quality target's own, else 3.5")
    group.add_argument("--device", default="cpu", help="torch device of the pipeline (default cpu)")
    group.add_argument("--candidate", action="append", default=[], metavar="SCHEDULE",
                       help="a schedule file or shipped name the search also tries among its first trials (repeatable), e.g. a published preset "
                       "or the file plain ralu-calibrate wrote; its score is printed beside the best")


def check(args: argparse.Namespace) -> None:
    """Every input the quality search needs, before loading anything."""
    missing = [name for name, value in (("--pipeline", args.pipeline), ("--prompts", args.prompts), ("--speedup", args.speedup)) if value is None]
    if missing:
        raise ValueError(f"--objective quality needs {', '.join(missing)}. Fix: e.g. --objective quality --pipeline DIR --prompts prompts.txt --speedup 4")
    if args.steps is not None:
        raise ValueError("--objective quality searches the whole schedule; --steps/--ends fix a layout. Fix: drop --steps and --ends")
    if args.min_signal is not None:
        from .search import check_min_signal

        check_min_signal(args.min_signal)
    if args.spectral_weight is not None:
        from .quality_search import check_spectral_weight

        check_spectral_weight(args.spectral_weight, "--spectral-weight ")
    check_pipeline_options(args)


def check_pipeline_options(args: argparse.Namespace) -> None:
    """--batch-size and --pipeline, shared by every option that runs a pipeline (quality search, --magcache)."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be at least 1")
    if not Path(args.pipeline).is_dir():
        from .plugins import quality_target

        quality_target(args.pipeline)  # a registered target, or one line naming those there are


def candidates(args: argparse.Namespace) -> list[tuple[str, object]]:
    """``--candidate`` schedules, loaded and checked before the pipeline is."""
    from ralu.runtime.schedule import load_schedule

    out = []
    for name in args.candidate:
        try:
            out.append((f"candidate {name}", load_schedule(name)))
        except (OSError, ValueError) as error:
            raise ValueError(f"--candidate {name}: {str(error).splitlines()[0]}") from None
    return out


def load(args: argparse.Namespace):
    """(pipeline, search keyword arguments) for ``--pipeline``: a folder, or a registered
    quality target (:func:`target`)."""
    if not Path(args.pipeline).is_dir():
        found = target(args)
        return found.pipe, dict(found.options)
    from ralu.runtime.cli import CLIError, pipeline_class

    try:
        cls, _family = pipeline_class(Path(args.pipeline))
        pipe = cls.from_pretrained(args.pipeline, local_files_only=True).to(args.device)
    except CLIError as error:
        raise ValueError(str(error)) from None
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load the pipeline from {args.pipeline!r} without the network: {str(error).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    options = dict(height=args.height, width=args.width, h0=args.h0, base_steps=args.base_steps, metric=args.metric,
                   pipeline_id=str(Path(args.pipeline).resolve()))
    return pipe, options


def target(args: argparse.Namespace):
    """The :class:`ralu.calibrate.plugins.QualityTarget` registered as ``--pipeline`` (not a
    folder), built for ``--model``, ``--metric`` and ``--device``."""
    from ralu.runtime.models import get_model

    from .plugins import quality_target

    return quality_target(args.pipeline)(model=get_model(args.model).name, metric=args.metric, device=args.device)


def guidance_scale(args: argparse.Namespace, options: dict) -> float:
    """``--guidance-scale``, else the target's own, else 3.5."""
    if args.guidance_scale is not None:
        return args.guidance_scale
    return options.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)


def run_quality(args: argparse.Namespace, out: Path) -> int:
    from ralu.runtime.batch import read_prompts

    from .quality_search import search

    check(args)
    jobs = read_prompts(args.prompts, args.seed)
    known = candidates(args)
    started = time.perf_counter()
    pipe, options = load(args)
    options["guidance_scale"] = guidance_scale(args, options)
    result = search(
        pipe, [job.prompt for job in jobs], args.speedup, seeds=[job.seed for job in jobs],
        batch_size=args.batch_size, trials=args.trials, seed=args.seed, storage=args.storage, study_name=args.study_name,
        extra_candidates=known, cache_dir=args.cache_dir or Path(".ralu-references"), reference_seed_offset=args.reference_seed_offset, show_progress=not args.quiet, log=lambda message: print(message, file=sys.stderr),
        **({} if args.min_signal is None else {"min_signal": args.min_signal}),
        **({} if args.spectral_weight is None else {"spectral_weight": args.spectral_weight}), **options,
    )
    save_schedule(result.best, out)
    print(result.describe())
    print(f"  took {time.perf_counter() - started:.1f} s")
    print(f"wrote {out}" + (" (the plain fewer-steps schedule: it scored best)" if result.plain_wins else ""))
    if args.plain_out:
        if result.plain is None:
            print("  no plain candidate finished, so --plain-out is not written")
        else:
            save_schedule(result.plain, args.plain_out)
            print(f"wrote {args.plain_out} (best plain schedule)")
    return 0
