"""Regenerate the shipped schedules (``schedules/``), their plots and ``reports/schedules.md``.

    python -m ralu.calibrate.shipped

Each paper layout (docs/method.md §5) is calibrated with our global optimiser at the
model's real base shift, and the outer search is run for the same speed-up target.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ralu.runtime.models import get_model
from ralu.runtime.schedule import Schedule, save_schedule, schedule_json_schema, write_text_atomic

from .calibration import calibrate
from .fewer_steps import compare
from .layout_search import FIRST_END_RANGE, SECOND_END_MAX
from .plot import plot_schedule
from .presets import PAPER_H0, PRESETS
from .progress_model import load_progress_model
from .search import DEFAULT_TRIALS as MAIN_JOB_TRIALS
from .search import MIN_SIGNAL, NTDMObjective, StageLayout, default_objective, optimise_paper

COMMAND = "python -m ralu.calibrate.shipped"

#: Models with no published preset: what the main job (``ralu-calibrate --model M --speedup X``)
#: writes at the paper's FLUX.1 budgets (4x and 7x), shipped as ``M-Xx``.
MAIN_JOB_BUDGETS: tuple[tuple[str, float], ...] = (
    ("flux-kontext-dev", 4), ("flux-kontext-dev", 7),
    ("chroma", 4), ("chroma", 7),
    ("flux2-dev", 4), ("flux2-dev", 7),
    ("flux2-klein-base-4b", 4), ("flux2-klein-base-4b", 7),
    ("qwen-image", 4), ("qwen-image", 7),
)


def _row(name: str, schedule: Schedule, paper_js: float | None) -> str:
    stages = schedule.stages
    return (
        f"| `{name}` | {'/'.join(str(s.steps) for s in stages)} | {'/'.join(f'{s.end:g}' for s in stages)} | "
        f"{'/'.join(f'{s.start:.3f}' for s in stages)} | {'/'.join(f'{s.shift:.3f}' for s in stages)} | "
        f"{schedule.z:.2f} ({schedule.c:.4f}) | {schedule.up_ratio:g} | {schedule.divergence.js_distance:.6f} | "
        f"{'' if paper_js is None else f'{paper_js:.6f}'} | {schedule.flops_speedup.linear:.2f}x | {schedule.flops_speedup.total:.2f}x | {_against_plain(schedule)} |"
    )


def _against_plain(schedule: Schedule) -> str:
    """J of the schedule and of the plain sampler at its budget, and the main job's verdict."""
    comparison = compare(schedule)
    return f"{comparison.ralu_error:.3f} vs {comparison.plain_error:.3f} ({comparison.plain.stages[0].steps} steps): {comparison.verdict}"


def judgement(reports_dir: Path, preset_names: list[str]) -> str:
    """What the registered quality harnesses (entry-point group ``ralu.schedule_judgements``,
    :mod:`ralu.calibrate.plugins`) say of the shipped schedules; a line saying none is
    installed otherwise."""
    from .plugins import schedule_judgements

    sections = [judge(reports_dir, preset_names) for judge in schedule_judgements()]
    return "\n\n".join(sections) or "No quality harness is installed to judge these files (docs/plugins.md)."


def regenerate(schedules_dir: Path, reports_dir: Path, trials: int, seed: int) -> str:
    write_text_atomic(schedules_dir / "schema.json", json.dumps(schedule_json_schema(), indent=2) + "\n")
    header = (
        "| schedule | steps | ends | starts (re-noised) | shifts | Z (c) | r | JS distance | paper optimiser, same h0 | "
        "speed-up linear | speed-up total | J vs plain: RALU or plain |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    def main_job(model: str, target: float) -> Schedule:
        """What ``ralu-calibrate --model MODEL --speedup TARGET`` writes (same trials and seed)."""
        return calibrate(model, speedup=target, trials=trials, seed=seed, objective=default_objective(True, "global"))

    def ship(name: str, schedule: Schedule, paper_js: float | None) -> str:
        """Write the schedule file and its plot; return its table row."""
        save_schedule(schedule, schedules_dir / f"{name}.json")
        plot_schedule(schedule, reports_dir / "schedules" / f"{name}.png")
        print(f"{name}: JS {schedule.divergence.js_distance:.6f}, {schedule.flops_speedup.linear:.2f}x linear")
        return _row(name, schedule, paper_js)

    rows, notes = [], []
    for preset in PRESETS:
        spec = get_model(preset.model)
        h0 = spec.base_shift(1024, 1024)
        paper_here = optimise_paper(NTDMObjective(StageLayout(preset.steps, preset.ends), h0)).js_distance
        # what `ralu-calibrate --steps ... --ends ...` and `ralu-calibrate --speedup X` write (their objectives by default)
        given = calibrate(preset.model, steps=list(preset.steps), ends=list(preset.ends), up_ratio=preset.up_ratio, seed=seed,
                          objective=default_objective(False, "global"))
        rows.append(ship(preset.name, given, paper_here))
        rows.append(ship(f"{preset.name}-searched", main_job(preset.model, preset.target), None))
        published = f"{preset.speedup}x" if preset.speedup else "not stated"
        notes.append(
            f"- `{preset.name}`: published shifts {', '.join(f'{h:g}' for h in preset.shifts)}, c = {preset.c:.4f} "
            f"(h0 = {PAPER_H0:g}); our linear-convention speed-up {given.flops_speedup.linear:.2f}x vs published {published}."
        )
    family_rows = [ship(f"{model}-{target:g}x", main_job(model, target), None) for model, target in MAIN_JOB_BUDGETS]
    plots = "\n".join(f"![{p.stem}](schedules/{p.name})" for p in sorted((reports_dir / "schedules").glob("*.png")))
    judged = judgement(reports_dir, [p.name for p in PRESETS])
    main_job = (": what the main job, `ralu-calibrate --model M --speedup X`, writes (same call, trials and seed)" if trials == MAIN_JOB_TRIALS
                else f"; the main job runs {MAIN_JOB_TRIALS} trials, so its output may differ")
    return f"""# Shipped schedules

Regenerate with: `{COMMAND}` (about 1.5 minutes on 2 CPU cores, one of them busy; seed {seed}, {trials} outer trials).

All at 1024x1024 with the base model's real shift h0 (FLUX.1-dev: exp(mu) = 3.158 at 4096
image tokens; SD3: 3.0), global inner optimiser, Z capped so that every transition keeps at
least a = s/e = {MIN_SIGNAL:g} of the signal (`--min-signal`).

- `NAME`: the paper's stage layout and up-ratio, calibrated with the paper's continuous JS
  objective.
- `NAME-searched`: the layout the outer Optuna search finds for the same target ({trials}
  trials, linear FLOPs, budget-filling layouts: each stage's share of the steps, as many
  steps as the budget affords) with the progress-aware objective J, the default for a
  searched layout (docs/method.md §4b), its terms fitted to measured image scores
  (`calibrate/progress_model.json`, version `{load_progress_model().version}`,
  [`progress-fit.md`](progress-fit.md)){main_job}.

Why these objectives: on testbed v2 (below, and reports/quality.md; run of 2026-12-01) the continuous
objective's searched FLUX 7x layout lost to the published preset on FD and fine accuracy,
while the progress objective's searched layout tied it on FD and accuracy and beat the
continuous one on fine accuracy; on the paper's own layouts the continuous objective was
the better of the two at 4x and 7x.  "paper optimiser, same h0" is the published local
method (L-BFGS-B from [3, 3, 3, 2]) on the same layout: the global optimiser is never worse
and usually better.  The last column is what `ralu-calibrate` prints for the file: J of the
schedule and of the plain sampler with the steps its budget affords, and the verdict, "cannot
tell" where the two differ by less than the fitted model's margin (docs/method.md §4b).

{header}
{chr(10).join(rows)}

## The newer families

No published preset exists for these models: each file is what the main job writes for the
model at the paper's FLUX.1 budgets, with each model's own base shift h0 at 1024x1024 and
baseline steps (docs/families.md).  They have not been judged for image quality: no testbed
of these families exists, and no image of the real models was made.

{header}
{chr(10).join(family_rows)}

## Against the published presets (h0 = {PAPER_H0:g})

{chr(10).join(notes)}

## What to watch

The JS divergence measures how the model evaluations are spread over time, not image
quality.  Two things it rewards deserve a quality check before a schedule is preferred:

- **Large Z (small c)**: each stage restarts close to pure noise (small re-noised start
  s_k), so little of the earlier stages' work survives.  Left unbounded (`--min-signal 0`),
  several searched layouts sat at the bound Z = 100; the cap keeps a = s_k / e_k >= {MIN_SIGNAL:g}
  (`ralu-calibrate` prints a note below that).
- **Long low-resolution stages**: the JS divergence cannot see them as a cost in detail, and
  the progress model J, fitted on layouts with e2 <= 0.7, prefers ever later ends beyond
  them; the layout search keeps e1 <= {FIRST_END_RANGE[1]:g} and e2 <= {SECOND_END_MAX:g}, where the best measured
  schedules lie (docs/method.md §4).

{judged}

## Plots

{plots}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ralu.calibrate.shipped", description=__doc__.splitlines()[0])
    parser.add_argument("--schedules-dir", type=Path, default=Path("schedules"), help="run from the repository root")
    parser.add_argument("--reports-dir", type=Path, default=Path("reports"))
    parser.add_argument("--trials", type=int, default=MAIN_JOB_TRIALS, help="outer search trials (default: the main job's, so -searched files are its output)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = regenerate(args.schedules_dir, args.reports_dir, args.trials, args.seed)
    write_text_atomic(args.reports_dir / "schedules.md", report)
    print(f"wrote {args.reports_dir / 'schedules.md'} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
