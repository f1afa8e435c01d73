"""``ralu-plot``: a picture of a schedule: P_target against P(t), the per-stage timestep
grids with the re-noised starts, and which tokens are at which resolution per stage."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ralu.runtime.models import get_model, stage_image_tokens  # noqa: E402
from ralu.runtime.schedule import Schedule, load_schedule, write_bytes_atomic  # noqa: E402

from .clitools import OneLineParser, check_writable, one_line  # noqa: E402
from .densities import realised_density, target_density  # noqa: E402

STAGE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")


def stage_colour(k: int) -> str:
    # Schedules with more stages than colours still plot: colours repeat.
    return STAGE_COLOURS[k % len(STAGE_COLOURS)]
STAGE_NAMES = {1: ("full res",), 2: ("low res", "full res"), 3: ("low res", "mixed", "full res")}


def schedule_arrays(schedule: Schedule) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, starts, ends, shifts) as arrays with a leading batch axis of 1."""
    stages = schedule.stages
    return (
        np.array([s.steps for s in stages]),
        np.array([[s.start for s in stages]]),
        np.array([[s.end for s in stages]]),
        np.array([[s.shift for s in stages]]),
    )


def _draw_distributions(axis, schedule: Schedule) -> None:
    steps, starts, ends, shifts = schedule_arrays(schedule)
    t = np.linspace(0.0, 1.0, 1000)
    target = target_density(t, schedule.calibration.h0, ends, starts)[0]
    realised = realised_density(t, steps, starts, ends, shifts)[0]
    for k, stage in enumerate(schedule.stages):
        axis.axvspan(stage.start, stage.end, color=stage_colour(k), alpha=0.08, lw=0)
    axis.plot(t, target, color="black", lw=2, label=f"P_target (base shift h0 = {schedule.calibration.h0:.3f} + overlaps)")
    axis.plot(t, realised, color="#d62728", lw=1.6, ls="--", label="P(t) realised by the stages")
    for transition in schedule.transitions:
        axis.axvline(transition.start, color="grey", lw=0.8, ls=":")
    axis.set_yscale("log")
    axis.set_xlim(0, 1)
    axis.set_ylabel("density")
    axis.set_title(
        f"{schedule.model} {schedule.width}x{schedule.height}: JS distance {schedule.divergence.js_distance:.4f} "
        f"({schedule.divergence.objective}), FLOPs speed-up {schedule.flops_speedup.linear:.2f}x linear / {schedule.flops_speedup.total:.2f}x total"
    )
    axis.legend(loc="upper right", fontsize=8)


def _draw_timesteps(axis, schedule: Schedule) -> None:
    names = STAGE_NAMES.get(len(schedule.stages), tuple(f"stage {k + 1}" for k in range(len(schedule.stages))))
    n = len(schedule.stages)
    for k, stage in enumerate(schedule.stages):
        y = n - k
        t = 1.0 - schedule.sigmas(k)
        axis.plot([stage.start, stage.end], [y, y], color=stage_colour(k), lw=1)
        axis.plot(t[:-1], np.full(stage.steps, y), "o", color=stage_colour(k), ms=6, label=f"stage {k + 1} ({names[k]}): {stage.steps} steps, shift {stage.shift:.2f}")
        axis.plot(t[-1], y, "|", color=stage_colour(k), ms=14, mew=2)
    for transition in schedule.transitions:
        k = transition.after_stage
        axis.annotate(
            "", xy=(transition.start, n - k), xytext=(transition.end, n - k + 1),
            arrowprops=dict(arrowstyle="->", color="grey", lw=1),
        )
        axis.text(transition.start, n - k - 0.32, f"re-noise to s={transition.start:.3f}", fontsize=7, ha="left", color="grey")
    axis.set_yticks(range(1, n + 1), [f"stage {n - i}" for i in range(n)])
    axis.set_ylim(0.3, n + 0.7)
    axis.set_xlim(0, 1)
    axis.set_xlabel("progress time t (0 = noise, 1 = data)")
    axis.set_title(f"model evaluations (dots) per stage; c = {schedule.c:.4f} (Z = {schedule.z:.2f})", fontsize=10)
    axis.legend(loc="lower right", fontsize=7)


def _draw_token_maps(figure, grid_spec, schedule: Schedule) -> None:
    """Per stage, an 8x8 sketch of the low-res token grid: dark = full resolution."""
    n = len(schedule.stages)
    full = get_model(schedule.model).image_tokens(schedule.height, schedule.width)
    counts = stage_image_tokens(full, schedule.up_ratio, n) if n <= 3 else [full] * n
    names = STAGE_NAMES.get(n, tuple(f"stage {k + 1}" for k in range(n)))
    side = 8
    # A fixed pattern stands for "the highest-edge tokens": in the runtime they are chosen per image.
    order = np.argsort(np.random.default_rng(0).random(side * side))
    for k in range(n):
        axis = figure.add_subplot(grid_spec[k])
        if names[k] == "low res":
            fine = 0
        elif names[k] == "mixed":
            fine = int(np.floor(schedule.up_ratio * side * side))
        else:
            fine = side * side
        cells = np.zeros(side * side)
        cells[order[:fine]] = 1.0
        axis.imshow(cells.reshape(side, side), cmap="Greys", vmin=-0.3, vmax=1.3)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(f"stage {k + 1}: {names[k]}\n{counts[k]} image tokens", fontsize=8, color=stage_colour(k))
    figure.text(0.5, 0.015, f"dark = token at full resolution (4 tokens), light = low-res token; mixed stage upsamples the top r = {schedule.up_ratio:g} by edge score, chosen per image",
                ha="center", fontsize=8)


#: One dot per model evaluation is drawn: beyond this many per stage the picture (and the
#: time to draw it) stops making sense; calibrated schedules have at most a few dozen.
MAX_DRAWN_STEPS = 1000


def plot_schedule(schedule: Schedule, path: str | Path) -> Path:
    """Write the schedule's picture to ``path`` (PNG), atomically."""
    if max(stage.steps for stage in schedule.stages) > MAX_DRAWN_STEPS:
        raise ValueError(f"a stage of this schedule has {max(s.steps for s in schedule.stages)} steps; ralu-plot draws one dot per step, at most {MAX_DRAWN_STEPS} per stage. Fix: plot a schedule with fewer steps")
    figure = plt.figure(figsize=(11, 9))
    outer = figure.add_gridspec(3, 1, height_ratios=[3, 2.2, 1.6], hspace=0.45)
    _draw_distributions(figure.add_subplot(outer[0]), schedule)
    _draw_timesteps(figure.add_subplot(outer[1]), schedule)
    _draw_token_maps(figure, outer[2].subgridspec(1, len(schedule.stages), wspace=0.4), schedule)
    try:
        picture = io.BytesIO()
        figure.savefig(picture, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(figure)
    return write_bytes_atomic(path, picture.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="ralu-plot", description="Plot a RALU schedule's timestep distributions and stages.")
    parser.add_argument("schedule", help="schedule file or shipped name (e.g. flux-dev-7x)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        check_writable(args.out, "-o")
        schedule = load_schedule(args.schedule)  # any unreadable or invalid file is a ScheduleError
        print(f"wrote {plot_schedule(schedule, args.out)}")
    except (ValueError, OSError) as error:
        print(f"ralu-plot: error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
