"""Which calibration objective picks better schedules on the quality testbed?

    python -m ralu.calibrate.objectives_report --seeds 0 1 --images 32 --out reports/experiments/objectives

At each budget of ``ralu-bench quality`` (the published 4x and 7x presets' testbed cost)
it samples, from the harness's labels and noise of every seed: the plain sampler with the
fewer steps the budget affords (the harness's ``base-steps`` row), the continuous-JS
calibration of the preset layout and of a searched layout (the harness's ``ralu-ours`` and
``ralu-searched``), the same two with the progress-aware objective (docs/method.md §4b),
and any ``--schedule`` file.  Metrics are the harness's: Frechet distance of classifier
features to real images (FD), conditioning accuracy, blocking.  Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .bench.quality.config import BASE_STEPS, PAPER_PRESETS, REAL_SEED
from .bench.quality.cost import TestbedCost
from .bench.quality.methods import Method, closest, ralu_forwards, ralu_method
from .bench.quality.metrics import evaluate_images, frechet_distance
from .bench.quality.sampler import TestbedSampler
from .bench.quality.schedules import ours_schedule, paper_schedule, searched_schedule
from .calibration import calibrate
from .flops.pricing import flops_speedup
from .search import NTDMObjective, StageLayout
from .testbed import data
from .testbed.classifier import features, load_classifier
from .testbed.conditioning import TEXT_TOKENS
from .testbed.evaluate import balanced_labels
from .testbed.model import GUIDANCE_SCALE, load_pipeline, testbed_h0, testbed_schedule

SIZE = data.IMAGE_SIZE
FULL = (SIZE // 2) ** 2


def progress_schedules(budget: int, h0: float, trials: int) -> dict:
    """The progress objective on the preset layout and in the layout search (as the harness's JS rows)."""
    p = PAPER_PRESETS[budget]
    preset = calibrate("flux-dev", steps=list(p["steps"]), ends=list(p["ends"]), up_ratio=p["up_ratio"], height=SIZE, width=SIZE,
                       h0=h0, objective="progress", flops_convention="total")
    target = flops_speedup("flux-dev", 1024, 1024, list(p["steps"]), p["up_ratio"]).total
    searched = calibrate("flux-dev", speedup=round(target, 3), h0=h0, objective="progress", flops_convention="total", trials=trials, seed=0)
    return {"progress-preset": preset, "progress-searched": testbed_schedule(searched)}


def methods_for(budget: int, cost: TestbedCost, h0: float, trials: int, files: list[str], builtin: bool = True, budgets: tuple[int, ...] = (4, 7)) -> list[Method]:
    paper = paper_schedule(budget, SIZE)
    target = cost.of(ralu_forwards(paper, FULL)).total
    steps = closest(list(range(1, 2 * BASE_STEPS + 1)), lambda k: cost.of([FULL] * k), target)
    methods = [Method("plain", budget, f"plain sampler, {steps} steps", "pipeline", steps=steps, forwards=[FULL] * steps, details={"steps": [steps]})]
    rows = {}
    if builtin:
        rows = {"js-preset": ours_schedule(budget, SIZE, h0), "js-searched": searched_schedule(budget, SIZE, h0, trials), **progress_schedules(budget, h0, trials)}
    labels = {"js-preset": "continuous JS, preset layout", "js-searched": "continuous JS, searched layout",
              "progress-preset": "progress objective, preset layout", "progress-searched": "progress objective, searched layout"}
    for key, schedule in rows.items():
        methods.append(ralu_method(key, budget, schedule, FULL, False, label=labels[key]))
    for path in files:
        schedule = testbed_schedule(path)
        speed = cost.of([FULL] * BASE_STEPS).total / cost.of(ralu_forwards(schedule, FULL)).total
        if min(budgets, key=lambda b: abs(math.log(speed / b))) != budget:  # as ralu-bench quality assigns --schedule rows
            continue
        name = Path(path).name.removesuffix(".json")
        if len(schedule.stages) == 1:
            n = schedule.stages[0].steps
            methods.append(Method(f"file:{name}", budget, f"schedule {name}", "ralu", schedule=schedule, forwards=[FULL] * n, details={"file": str(path)}))
        else:
            methods.append(ralu_method(f"file:{name}", budget, schedule, FULL, False, label=f"schedule {name}", extra={"file": str(path)}))
    for method in methods:
        method.details["speedup_total"] = cost.of([FULL] * BASE_STEPS).total / cost.of(method.forwards).total
    return methods


def describe(method: Method) -> dict:
    schedule = method.schedule
    out = {"key": method.key, "label": method.label, "budget": method.budget, "speedup_total": round(method.details["speedup_total"], 3)}
    if schedule is None:
        out["steps"] = [method.steps]
        return out
    out.update(steps=[s.steps for s in schedule.stages], ends=[s.end for s in schedule.stages], shifts=[round(s.shift, 3) for s in schedule.stages],
               z=round(schedule.z, 2) if len(schedule.stages) > 1 else None, up_ratio=schedule.up_ratio,
               starts=[round(s.start, 4) for s in schedule.stages])
    return out


def summarise(values: list[float]) -> dict:
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if array.size > 1 else None
    return {"mean": float(array.mean()), "std": std, "min": float(array.min()), "max": float(array.max()), "per_seed": [float(v) for v in array]}


def run(args: argparse.Namespace, command: str) -> dict:
    started = time.time()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier()
    cost = TestbedCost(pipe.transformer.config, TEXT_TOKENS)
    h0 = testbed_h0()
    sampler = TestbedSampler(pipe, args.batch_size, GUIDANCE_SCALE, SIZE)
    real_labels = balanced_labels(args.real_images, REAL_SEED)
    real_images, _ = data.make_batch(REAL_SEED, args.real_images, labels=real_labels)
    real_features = features(classifier, real_images).numpy()
    rows = []
    for budget in args.budgets:
        for method in methods_for(budget, cost, h0, args.trials, args.schedule or [], builtin=not args.schedules_only, budgets=tuple(args.budgets)):
            per_seed, feats = [], []
            for seed in args.seeds:
                labels = balanced_labels(args.images, seed)
                images, tokens = sampler.generate(method, labels, seed)
                if sorted(tokens) != sorted(method.forwards):
                    raise RuntimeError(f"{method.key}: ran {tokens}, planned {method.forwards}")
                result = evaluate_images(images, labels, None, classifier, real_features)
                feats.append(result.pop("_features"))
                per_seed.append(result)
            row = describe(method)
            for key in ("fd", "accuracy", "edge_artifacts"):
                row[key] = summarise([r[key] for r in per_seed])
            row["fd_pooled"] = frechet_distance(torch.cat(feats).numpy(), real_features)
            rows.append(row)
            print(f"  {budget}x {method.key:<26} FD {row['fd']['mean']:7.2f} (pooled {row['fd_pooled']:6.2f})  acc {row['accuracy']['mean']:.3f}", flush=True)
    return {
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "wall_seconds": round(time.time() - started, 1),
        "seeds": list(args.seeds), "images_per_seed": args.images, "real_images": args.real_images, "layout_trials": args.trials,
        "h0": h0, "rows": rows,
    }


def cell(summary: dict, digits: int) -> str:
    if summary["std"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f} [{summary['min']:.{digits}f}, {summary['max']:.{digits}f}]"


def objective_values(row: dict, h0: float) -> tuple[float, float]:
    """(progress error J, continuous JS distance) of a row's schedule (plain: base grid, shift h0)."""
    steps = tuple(row["steps"])
    ends = tuple(row.get("ends") or [1.0])
    shifts = tuple(row.get("shifts") or [h0])
    z = row.get("z") or 2.0
    layout = StageLayout(steps, ends)
    params = np.array([[*shifts, z]])
    progress = NTDMObjective(layout, h0, "progress", z_bounds=(z, z), up_ratio=row.get("up_ratio") or 0.0).distance(params)[0]
    return float(progress), float(NTDMObjective(layout, h0).distance(params)[0])


def paired_lines(report: dict) -> list[str]:
    """Per-seed FD differences of the progress rows against the JS rows (same labels and noise)."""
    lines = []
    for budget in sorted({r["budget"] for r in report["rows"]}):
        rows = {r["key"]: r for r in report["rows"] if r["budget"] == budget}
        for a, b in (("progress-preset", "js-preset"), ("progress-searched", "js-searched"), ("plain", "js-preset"), ("plain", "progress-preset")):
            if a in rows and b in rows:
                diff = [x - y for x, y in zip(rows[a]["fd"]["per_seed"], rows[b]["fd"]["per_seed"])]
                pooled = rows[a]["fd_pooled"] - rows[b]["fd_pooled"]
                lines.append(f"- {budget}x, {rows[a]['label']} minus {rows[b]['label']}: per seed {', '.join(f'{d:+.1f}' for d in diff)}; pooled {pooled:+.1f}")
    return lines


def render(report: dict) -> str:
    lines = [
        "# Calibration objectives on the quality testbed",
        "",
        f"Regenerate: `{report['command']}` ({report['wall_seconds'] / 60:.0f} min on a shared 2-core machine).",
        "",
        f"Reduced run: {len(report['seeds'])} seeds x {report['images_per_seed']} images (the full harness uses 3 x 128), layout searches "
        f"with {report['layout_trials']} trials.  FD of {report['images_per_seed']} images is biased upwards against the harness's "
        "128-image numbers; compare rows with each other only.  Cells: mean ± sample std over seeds [min, max]; `pooled` is FD of all seeds' images together.",
        "",
        "| budget | row | steps | ends | shifts | Z | speed-up (testbed, total) | J (progress) | JS distance | FD | FD pooled | accuracy | blocking |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        progress, js = objective_values(r, report["h0"])
        lines.append(
            f"| {r['budget']}x | {r['label']} | {'/'.join(map(str, r['steps']))} | {'/'.join(f'{e:g}' for e in r.get('ends', [1.0]))} | "
            f"{'/'.join(f'{h:.2f}' for h in r.get('shifts', []))} | {r.get('z') or ''} | {r['speedup_total']:.2f}x | {progress:.4f} | {js:.4f} | {cell(r['fd'], 1)} | "
            f"{r['fd_pooled']:.1f} | {cell(r['accuracy'], 3)} | {cell(r['edge_artifacts'], 3)} |"
        )
    lines += ["", "Paired differences in FD (negative: the first row is better; same labels and noise per seed):", "", *paired_lines(report)]
    if report.get("notes"):
        lines += ["", *report["notes"]]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ralu.calibrate.objectives_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 7], choices=sorted(PAPER_PRESETS))
    parser.add_argument("--trials", type=int, default=40, help="layout-search trials of the searched rows (default 40)")
    parser.add_argument("--real-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--schedule", action="append", help="add a row for this schedule file (at the budget nearest its testbed cost)")
    parser.add_argument("--schedules-only", action="store_true", help="only the plain row and the --schedule rows")
    parser.add_argument("--out", type=Path, default=Path("reports/experiments/objectives"), help="writes OUT.md and OUT.json")
    parser.add_argument("--render", action="store_true", help="only re-render OUT.md from OUT.json")
    args = parser.parse_args(argv)
    if args.render:
        write_atomic(args.out.with_suffix(".md"), render(json.loads(args.out.with_suffix(".json").read_text())))
        return 0
    if args.images < 2:
        parser.error("--images must be at least 2 (FD needs a covariance)")
    command = "python -m ralu.calibrate.objectives_report " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = run(args, command)
    write_atomic(args.out.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    write_atomic(args.out.with_suffix(".md"), render(report))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
