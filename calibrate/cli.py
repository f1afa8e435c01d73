"""``ralu-calibrate``: calibrate a RALU schedule and write it as a versioned JSON file."""

from __future__ import annotations

# Only the standard library at import time: the console script imports this module before
# ``main`` can catch Ctrl-C, so everything heavier (numpy, scipy, Optuna, pydantic) is imported
# inside the functions, under ``main``'s handler.
import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ralu.runtime.schedule import Schedule


def build_parser() -> argparse.ArgumentParser:
    from ralu.runtime.models import ALIASES, MODELS

    from .clitools import OneLineParser
    from .densities import RESOLUTION_GAP, SHIFT_RATIO
    from .progress_model import load_progress_model
    from .search import DEFAULT_TRIALS, MIN_SIGNAL

    parser = OneLineParser(
        prog="ralu-calibrate",
        description="Calibrate a RALU schedule (NT-DM: per-stage shifts and noise strength minimising the "
        "Jensen-Shannon divergence to the base model's timestep distribution) and write it as JSON.",
        epilog="examples:\n  ralu-calibrate --model flux --speedup 7\n"
        "  ralu-calibrate --model flux --steps 2 3 5 --ends 0.2 0.3 1.0 --up-ratio 0.1 --optimizer paper --h0 3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, choices=sorted(set(MODELS) | set(ALIASES)), help="model family and size")
    parser.add_argument("--speedup", type=float, help="FLOPs speed-up target; without --steps an Optuna search picks the layout")
    parser.add_argument("--steps", type=int, nargs="+", metavar="N", help="steps per stage, e.g. 2 3 5")
    parser.add_argument("--ends", type=float, nargs="+", metavar="E", help="progress time where each stage ends, e.g. 0.2 0.3 1.0")
    parser.add_argument("--up-ratio", type=float, help="fraction of low-res tokens upsampled in the mixed stage (default: the largest of 0.3..0.1 meeting --speedup)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--h0", type=float, help="base schedule shift (default: the model's own at this resolution; FLUX.1-dev 3.158 at 1024 px)")
    parser.add_argument("--base-steps", type=int, help="baseline steps the speed-up is measured against (default: FLUX 50, SD3 28)")
    parser.add_argument("--optimizer", choices=("global", "paper"), default="global", help="inner search of shifts and c (default: global)")
    parser.add_argument("--objective", choices=("continuous", "discrete", "progress", "quality"),
                        help="default: progress when the layout is searched (--speedup without --steps) with the global optimizer, continuous "
                        "otherwise (chosen on testbed v2: reports/schedules.md).  continuous (the paper's) or discrete: JS distance of timestep "
                        "distributions; progress: the progress-aware error "
                        "(counts steps and what each re-noising keeps, docs/method.md §4b); quality: an Optuna search scored on images of a "
                        "pipeline against its 50-step samples (needs --pipeline and --prompts)")
    fitted = f"fitted to measured image scores, calibrate/progress_model.json {load_progress_model().version}"
    parser.add_argument("--resolution-gap", type=float, default=RESOLUTION_GAP, metavar="G",
                        help=f"progress objective: error of a low-resolution estimate relative to the data, g of docs/method.md §4b (default {RESOLUTION_GAP:g}, {fitted})")
    parser.add_argument("--shift-ratio", type=float, default=SHIFT_RATIO, metavar="R",
                        help=f"progress objective: a step's error is uniform in u = F_(R h0)(t), rho of docs/method.md §4b (default {SHIFT_RATIO:g}, {fitted})")
    parser.add_argument("--plain-out", type=Path, metavar="FILE",
                        help="also write the plain fewer-steps schedule at the same budget (one stage; runs exactly like the plain pipeline)")
    parser.add_argument("--z-bounds", type=float, nargs=2, metavar=("LOW", "HIGH"), default=(2.0, 100.0),
                        help="search range of Z = 1/sqrt(c) (default 2 100, the paper's); equal values fix c. A low HIGH keeps more of each stage's work at a transition")
    parser.add_argument("--min-signal", type=float, metavar="A",
                        help=f"least signal a = s/e every transition keeps, an upper bound on Z (default {MIN_SIGNAL:g}; 0 with --optimizer paper, "
                        "the published method; 0 means no bound)")
    parser.add_argument("--flops", choices=("total", "linear"), default="linear", help="FLOPs convention of the speed-up target (default: linear, the paper's)")
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help=f"outer search trials (default {DEFAULT_TRIALS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", help="Optuna storage shared by several processes (and resumed runs): a journal FILE.log or a database URL such as sqlite:///FILE.db; --trials counts the study's finished trials")
    parser.add_argument("--study-name", "--study", dest="study_name", help="Optuna study name (with --storage)")
    parser.add_argument("--out", type=Path, help="schedule file to write (default: MODEL-SPEEDUPx.json in the current folder)")
    parser.add_argument("--plot", type=Path, help="also write a PNG of the timestep distributions")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from . import magcache_cli, quality_cli

    quality_cli.add_arguments(parser)
    magcache_cli.add_arguments(parser)
    return parser


def default_out(model: str, target: float | None, steps: list[int] | None, magcache: str | None = None) -> Path:
    from ralu.runtime.models import get_model

    if magcache is not None:
        return Path(f"{Path(magcache).name.removesuffix('.json')}-magcache.json")
    if target is not None:
        return Path(f"{get_model(model).name}-{target:g}x.json")
    return Path(f"{get_model(model).name}-steps{'-'.join(str(n) for n in steps or ())}.json")


def summary(schedule: Schedule, seconds: float) -> str:
    from ralu.runtime.models import get_model, stage_image_tokens
    from ralu.runtime.plan import STAGE_ROLES

    from .search import MIN_SIGNAL

    tokens_full = get_model(schedule.model).image_tokens(schedule.height, schedule.width)
    tokens = stage_image_tokens(tokens_full, schedule.up_ratio, len(schedule.stages))
    names = STAGE_ROLES.get(len(schedule.stages), ("?",) * len(schedule.stages))
    cal = schedule.calibration
    ratio_rule = {"searched": " (searched with the layout)", "given": " (largest of 0.3..0.1 meeting the target)"}
    lines = [
        f"RALU schedule for {schedule.model} at {schedule.width}x{schedule.height} "
        f"(h0 = {cal.h0:.4f}, baseline {schedule.base_steps} steps, layout {cal.layout}, optimizer {cal.optimizer})",
        f"  {'stage':<6}{'tokens':>8}{'steps':>7}{'start':>9}{'end':>8}{'shift':>9}",
    ]
    for k, (stage, name, n_tokens) in enumerate(zip(schedule.stages, names, tokens)):
        lines.append(f"  {k + 1} {name:<4}{n_tokens:>8}{stage.steps:>7}{stage.start:>9.4f}{stage.end:>8.3f}{stage.shift:>9.4f}")
    lines += [
        f"  noise strength c = {schedule.c:.5f} (Z = 1/sqrt(c) = {schedule.z:.3f}); re-noised starts "
        + ", ".join(f"s{t.after_stage + 1} = {t.start:.4f} (a = {t.signal_scale:.3f}, b = {t.noise_scale:.3f})" for t in schedule.transitions),
        f"  up_ratio r = {schedule.up_ratio:g}" + (ratio_rule[cal.layout] if cal.target_speedup else ""),
        f"  JS distance {schedule.divergence.js_distance:.6f} (divergence {schedule.divergence.js_divergence:.3e}), {schedule.divergence.objective} objective",
        f"  FLOPs speed-up vs {schedule.base_steps} steps: {schedule.flops_speedup.linear:.2f}x linear (paper's convention), {schedule.flops_speedup.total:.2f}x total",
        f"  took {seconds:.1f} s",
    ]
    for t in schedule.transitions:
        if t.signal_scale < MIN_SIGNAL:
            lines.append(
                f"  note: stage {t.after_stage + 1} restarts at s = {t.start:.4f}, close to pure noise (signal kept a = s/e = {t.signal_scale:.3f} < {MIN_SIGNAL:g}): "
                "most of the earlier stages' work is discarded. The divergence is nearly flat in Z there; judge image quality before shipping it "
                "(ralu-bench quality --schedule FILE), or bound it with --min-signal."
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before a run began (imports, parsing): nothing to keep
        print("ralu-calibrate: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from .clitools import one_line
    from .search import default_objective

    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.storage is None) != (args.study_name is None):
        parser.error("--storage and --study-name go together")
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    if args.steps is not None and args.ends is not None and len(args.steps) != len(args.ends):
        parser.error(f"--steps has {len(args.steps)} values and --ends {len(args.ends)}: give one of each per stage")
    if args.objective is None and args.magcache is None:
        args.objective = default_objective(args.steps is None, args.optimizer)
    if args.optimizer == "paper" and args.objective == "discrete":
        print("ralu-calibrate: note: the discrete objective is piecewise constant; the paper's gradient method stays at its start. Use --optimizer global.", file=sys.stderr)
    try:
        return _run(args)
    except ValueError as error:  # every input problem, ScheduleError included
        print(f"ralu-calibrate: error: {one_line(error)}", file=sys.stderr)
        return 2
    except BaseException as error:
        if not _interrupted(error):
            raise
        print(f"ralu-calibrate: interrupted; {_kept(args)}", file=sys.stderr)
        return 130


def _interrupted(error: BaseException | None) -> bool:
    """Ctrl-C, or an error raised while a library was handling Ctrl-C."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__context__
    return False


def _run(args: argparse.Namespace) -> int:
    from ralu.runtime.schedule import save_schedule

    from .calibration import calibrate
    from .clitools import check_writable, one_line

    out = args.out or default_out(args.model, args.speedup, args.steps, args.magcache)
    # Checked before the search, which may take minutes, not after it.
    check_writable(out, "--out")
    if args.plot:
        check_writable(args.plot, "--plot")
        if args.plot.resolve() == out.resolve():
            raise ValueError(f"--plot and --out are both {out}. Fix: give the picture its own file name")
    if args.plain_out:
        check_writable(args.plain_out, "--plain-out")
        if args.plain_out.resolve() == out.resolve():
            raise ValueError(f"--plain-out and --out are both {out}. Fix: give the plain schedule its own file name")
    if args.magcache is not None:
        from .magcache_cli import run_magcache

        return run_magcache(args, out)
    if args.objective == "quality":
        from .quality_cli import run_quality

        return run_quality(args, out)
    started = time.perf_counter()
    schedule = calibrate(
        args.model, speedup=args.speedup, steps=args.steps, ends=args.ends, up_ratio=args.up_ratio,
        height=args.height, width=args.width, h0=args.h0, base_steps=args.base_steps,
        optimizer=args.optimizer, objective=args.objective, z_bounds=tuple(args.z_bounds), min_signal=args.min_signal, gap=args.resolution_gap, shift_ratio=args.shift_ratio, flops_convention=args.flops,
        trials=args.trials, seed=args.seed, storage=args.storage, study_name=args.study_name,
        show_progress=not args.quiet, log=lambda message: print(message, file=sys.stderr),
    )
    try:
        save_schedule(schedule, out)
    except OSError as error:
        raise ValueError(f"cannot write --out {out}: {error.strerror or error}. Fix: choose a writable file") from None
    print(summary(schedule, time.perf_counter() - started))
    plain = report_plain(schedule, args)
    print(f"wrote {out}")
    if plain is not None:
        try:
            save_schedule(plain, args.plain_out)
        except OSError as error:
            raise ValueError(f"cannot write --plain-out {args.plain_out}: {error.strerror or error}. Fix: choose a writable file") from None
        print(f"wrote {args.plain_out} (plain {plain.stages[0].steps} steps)")
    if args.plot:
        from .plot import plot_schedule

        try:
            plot_schedule(schedule, args.plot)
        except (OSError, ValueError) as error:
            raise ValueError(f"the schedule is written to {out}, but the plot failed: {one_line(error)}. Fix: ralu-plot {out} -o FILE.png") from None
        print(f"wrote {args.plot}")
    return 0


def report_plain(schedule: Schedule, args: argparse.Namespace) -> Schedule | None:
    """Print the honest comparison with the plain sampler at the same budget; the plain
    schedule when ``--plain-out`` asks for it."""
    from ralu.runtime.schedule import SHIFT_RANGE

    from .calibration import tool_version
    from .fewer_steps import PLAIN_BETTER, compare

    h0 = schedule.calibration.h0
    if not SHIFT_RANGE[0] <= h0 <= SHIFT_RANGE[1]:
        print(f"  no comparison with the plain sampler: its shift would be h0 = {h0:g}, outside the stage shifts a schedule can hold {list(SHIFT_RANGE)}")
        if args.plain_out:
            raise ValueError(f"--plain-out: a plain schedule needs shift h0 = {h0:g} within {list(SHIFT_RANGE)}. Fix: drop --plain-out, or a base shift --h0 in that range")
        return None
    comparison = compare(schedule, args.flops, args.resolution_gap, tool_version(), args.shift_ratio)
    print(comparison.describe())
    if comparison.verdict == PLAIN_BETTER and not args.plain_out:
        print("  (a model's prediction, not a measurement: --objective quality measures it on your pipeline; --plain-out FILE writes the plain schedule)")
    return comparison.plain if args.plain_out else None


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted run leaves behind, for the one line that reports it."""
    if args.storage is None:
        return "nothing was kept (without --storage the search lives in memory). Fix: rerun with --storage FILE.log --study-name NAME to make runs resumable"
    try:
        import optuna

        from .study import count, open_storage

        study = optuna.load_study(study_name=args.study_name, storage=open_storage(args.storage))
        finished = count(study, optuna.trial.TrialState.COMPLETE)
    except Exception:  # the storage itself may be what was interrupted; the line must still come
        return f"finished trials are kept in {args.storage} (study {args.study_name!r}); rerun the same command to resume"
    return f"{finished} finished trials are kept in {args.storage} (study {args.study_name!r}); rerun the same command to resume"


if __name__ == "__main__":
    sys.exit(main())
