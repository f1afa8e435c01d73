"""The quality benchmark end to end: configuration, sampling, metrics, the noise sweep, winners, the files."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch

from ralu.calibrate.bench.common import fail, write_report
from ralu.calibrate.bench.quality.config import (
    BASE_STEPS,
    METRICS,
    PAPER_PRESETS,
    PEER_METHODS,
    QUICK_Z_VALUES,
    RALU_METHODS,
    REAL_SEED,
    REPORT_NAME,
    Config,
    shared_overrides,
)
from ralu.calibrate.bench.quality.cost import TestbedCost
from ralu.calibrate.bench.quality.figures import SampleGrid, write_grid, write_plots
from ralu.calibrate.bench.quality.methods import plan_methods, ralu_method
from ralu.calibrate.bench.quality.metrics import aggregate, evaluate_images
from ralu.calibrate.bench.quality.report import figure_paths, render_markdown
from ralu.calibrate.bench.quality.sampler import TestbedSampler
from ralu.calibrate.bench.quality.schedules import ours_schedule
from ralu.calibrate.bench.quality.schema import (
    BestZ,
    GlobalOptimum,
    MethodRow,
    QualityReport,
    Reference,
    Sweep,
    SweepLayout,
    SweepPoint,
    Testbed,
    Winner,
)
from ralu.calibrate.testbed import data
from ralu.calibrate.testbed.classifier import features, load_classifier
from ralu.calibrate.testbed.conditioning import TEXT_TOKENS
from ralu.calibrate.testbed.evaluate import balanced_labels
from ralu.calibrate.testbed.location import classifier_dir, describe, transformer_dir
from ralu.calibrate.testbed.model import (
    GUIDANCE_SCALE,
    load_pipeline,
    testbed_h0,
    testbed_schedule,
)


def make_config(args: argparse.Namespace) -> Config:
    if args.quick:
        # threads None: keep the process's setting (the test suite runs single-threaded)
        config = Config(quick=True, seeds=(0,), images=4, z_values=QUICK_Z_VALUES, trials=20, real_images=200, grid_images=4, batch_size=4, threads=None)
    else:
        config = Config()
    overrides = {
        **shared_overrides(args),
        "budgets": tuple(args.budgets) if args.budgets else None,
        "weights": str(args.weights) if args.weights else None,
        "classifier": str(args.classifier) if args.classifier else None,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    for budget in config.budgets:
        if budget not in PAPER_PRESETS:
            raise ValueError(f"--budgets {budget}: budgets are named after the published presets, one of {sorted(PAPER_PRESETS)}")
    for path in config.schedules:
        check_schedule_file(path)
    sweep_budget = 4 if 4 in config.budgets else config.budgets[0]
    if config.images < 2 or config.real_images < 2:
        raise ValueError("--images and --real-images must be at least 2 (Frechet distances need a covariance)")
    sweep_seeds = config.seeds[: max(1, args.sweep_seeds or len(config.seeds))]
    return replace(config, sweep_seeds=sweep_seeds, sweep_budget=sweep_budget, h0=testbed_h0(), guidance_scale=GUIDANCE_SCALE,
                   batch_size=min(config.batch_size, config.images))


def v1_refusal(args: argparse.Namespace) -> str | None:
    """The v2-only options a v1 run refuses, as one line (None: none given)."""
    if getattr(args, "arch", None) and set(args.arch) != {"flux"}:
        return "--arch sd3: testbed v1 is a FLUX transformer only. Fix: use --testbed v2 for SD3"
    for name in ("weights_dir", "work_dir"):
        if getattr(args, name, None) is not None:
            return f"--{name.replace('_', '-')} is a testbed v2 option. Fix: use --weights / --classifier with --testbed v1"
    if getattr(args, "no_caches", False):
        return "--no-caches is a testbed v2 option (v1 has no cache rows). Fix: leave it out with --testbed v1"
    return None


def check_schedule_file(path: str) -> None:
    """A ``--schedule`` must load, be for FLUX (the testbed is a FLUX transformer) and be
    calibrated for the testbed's base shift (FLUX.1-dev at 1024 px)."""
    try:
        testbed_schedule(path)
    except ValueError as error:
        raise ValueError(f"--schedule {path}: {error}") from None


def weights_info(config: Config) -> dict:
    transformer, classifier = transformer_dir(config.weights), classifier_dir(config.classifier)
    info: dict[str, Any] = {"transformer": describe("transformer", config.weights), "classifier": describe("classifier", config.classifier)}
    for name, folder, record in (("transformer", transformer, "training.json"), ("classifier", classifier, "classifier.json")):
        path = folder / record
        if path.is_file():
            data = json.loads(path.read_text())
            info[f"{name}_record"] = {k: data.get(k) for k in ("command", "steps_done", "wall_seconds", "accuracy_fresh_clean", "final_losses") if k in data}
            if "steps" in data.get("args", {}):
                info[f"{name}_record"]["steps_planned"] = data["args"]["steps"]
            info[f"{name}_modified"] = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc).replace(microsecond=0).isoformat()
    return info


def run_benchmark(config: Config, command: str, log: Callable[[str], None] = print) -> tuple[QualityReport, SampleGrid]:
    """Sample and measure every method (and the sweep); the report and the images of the sample grid."""
    started = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    weights = weights_info(config)  # read with the weights (a training run may rewrite its record later)
    pipe = load_pipeline(path=config.weights)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(config.classifier)
    cost = TestbedCost(pipe.transformer.config, TEXT_TOKENS)
    full = (config.size // 2) ** 2
    log(f"ralu-bench quality: {len(config.seeds)} seed(s) x {config.images} images, budgets {list(config.budgets)}, testbed h0 = {config.h0:.4f}")
    methods, schedules = plan_methods(config, cost, log)
    sampler = TestbedSampler(pipe, config.batch_size, config.guidance_scale, config.size)
    baseline_cost = cost.of([full] * BASE_STEPS)

    real_labels = balanced_labels(config.real_images, REAL_SEED)
    real_images, _ = data.make_batch(REAL_SEED, config.real_images, labels=real_labels)
    real_features = features(classifier, real_images).numpy()

    per_method: dict[int, list[dict]] = {i: [] for i in range(len(methods))}
    measured: dict[int, list[int]] = {}
    seconds: dict[int, float] = {i: 0.0 for i in range(len(methods))}
    grid: dict[int, Any] = {}
    baselines: dict[int, Any] = {}
    reference = []
    for seed in config.seeds:
        labels = balanced_labels(config.images, seed)
        real_seed_images, _ = data.make_batch(REAL_SEED + 1 + seed, config.images, labels=labels)
        ref = evaluate_images(real_seed_images, labels, None, classifier, real_features)
        reference.append(ref)
        if seed == config.seeds[0]:
            real_grid = real_seed_images[: config.grid_images]
        baseline_images = None
        for i, method in enumerate(methods):
            t0 = time.time()
            images, tokens = sampler.generate(method, labels, seed)
            seconds[i] += time.time() - t0
            if method.key == "baseline":
                baseline_images = images
                baselines[seed] = images
            if sorted(tokens) != sorted(method.forwards):
                raise RuntimeError(f"{method.key} at {method.budget}x ran forwards at {tokens} tokens, planned {method.forwards}")
            measured[i] = tokens
            per_method[i].append(evaluate_images(images, labels, baseline_images, classifier, real_features))
            if seed == config.seeds[0]:
                grid[i] = images[: config.grid_images]
            r = per_method[i][-1]
            log(f"  seed {seed} {method.key:<16} {method.budget:>3}x  {time.time() - t0:6.1f} s  PSNR {r['psnr']:6.2f}  SSIM {r['ssim']:.3f}  "
                f"FD {r['fd']:7.2f}  acc {r['accuracy']:.3f}  blocking {r['edge_artifacts']:+.3f}")

    rows = []
    for i, method in enumerate(methods):
        flops = cost.of(measured[i])
        rows.append(MethodRow(
            method=method.key,
            label=method.label,
            budget=method.budget,
            flops_speedup_total=baseline_cost.total / flops.total,
            flops_speedup_linear=baseline_cost.linear / flops.linear,
            tflops_total=flops.total / 1e12,
            forwards=len(measured[i]),
            **aggregate(per_method[i], real_features).model_dump(),
            seeds=list(config.seeds),
            images_per_seed=config.images,
            seconds=round(seconds[i], 1),
            details=method.details,
        ))
    ref_row = aggregate(reference, real_features)
    reference_summary = Reference(
        describe=f"{config.images} fresh real procedural images per seed (same labels) against the {config.real_images}-image real reference",
        **ref_row.model_dump(include=set(Reference.model_fields)),
    )

    sweep = run_sweep(config, sampler, classifier, real_features, baselines, schedules, log) if config.z_values else None
    report = QualityReport(
        command=command,
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        wall_seconds=round(time.time() - started, 1),
        config=asdict(config),
        testbed=Testbed(
            size=config.size, full_tokens=full, half_tokens=full // 4, text_tokens=TEXT_TOKENS, h0=config.h0,
            guidance_scale=config.guidance_scale,
            forward_flops={str(n): asdict(cost.forward(n)) for n in sorted(cost._cache)},
            baseline_tflops_total=baseline_cost.total / 1e12,
            edge_decode_flops=0.0,
            weights=weights,
            threads=torch.get_num_threads(),
        ),
        rows=rows,
        reference=reference_summary,
        sweep=sweep,
        winners=winners(rows),
    )
    samples = SampleGrid(
        order=[("real", 1, "real images, same labels")] + [(m.key, m.budget, m.label) for m in methods],
        images=[real_grid] + [grid[i] for i in range(len(methods))],
    )
    return report, samples


def run_sweep(config: Config, sampler: TestbedSampler, classifier, real_features, baselines: dict, schedules: dict, log) -> Sweep:
    """Noise strength sweep at the preset layout of ``config.sweep_budget``: for every Z,
    shifts re-optimised with Z fixed, then RALU (exact noise) sampled and measured."""
    budget = config.sweep_budget
    size, h0 = config.size, config.h0
    optimizer = "paper" if config.quick else "global"
    points = []
    full = (size // 2) ** 2
    for z in config.z_values:
        t0 = time.time()
        schedule = ours_schedule(budget, size, h0, optimizer=optimizer, z_bounds=(z, z))
        method = ralu_method("ralu-ours", budget, schedule, full, False)
        per_seed = []
        for seed in config.sweep_seeds:
            labels = balanced_labels(config.images, seed)
            images, _ = sampler.generate(method, labels, seed)
            per_seed.append(evaluate_images(images, labels, baselines[seed], classifier, real_features))
        point = SweepPoint(z=z, c=schedule.c, js_distance=schedule.divergence.js_distance, shifts=[s.shift for s in schedule.stages],
                           starts=[s.start for s in schedule.stages], **aggregate(per_seed, real_features).model_dump())
        points.append(point)
        log(f"  sweep Z = {z:6.2f}  JS {point.js_distance:.4f}  PSNR {point.psnr:6.2f}  FD {point.fd:7.2f}  acc {point.accuracy:.3f}  "
            f"blocking {point.edge_artifacts:+.3f}  ({time.time() - t0:.1f} s)")
    ours = schedules[budget]["ours"]
    p = PAPER_PRESETS[budget]
    best = BestZ(
        divergence=min(points, key=lambda q: q.js_distance).z,
        fd=min(points, key=lambda q: q.fd).z,
        accuracy=max(points, key=lambda q: q.accuracy).z,
        psnr=max(points, key=lambda q: q.psnr).z,
        ssim=max(points, key=lambda q: q.ssim).z,
    )
    return Sweep(
        budget=budget,
        layout=SweepLayout(steps=list(p.steps), ends=list(p.ends), up_ratio=p.up_ratio),
        seeds=list(config.sweep_seeds),
        images_per_seed=config.images,
        global_optimum=GlobalOptimum(z=ours.z, js_distance=ours.divergence.js_distance),
        points=points,
        best_z=best,
    )


def winners(rows: list[MethodRow]) -> dict[str, dict[str, Winner]]:
    """Per budget and metric: the best method, whether the runner-up is within the seed
    spread, and the best RALU row against the best peer."""
    out: dict[str, dict[str, Winner]] = {}
    for budget in sorted({r.budget for r in rows if r.method != "baseline"}):
        group = [r for r in rows if r.budget == budget and r.method != "baseline"]
        entry = {}
        for key, _, higher in METRICS:
            value = attrgetter(key)
            ranked = sorted(group, key=value, reverse=higher)
            best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
            spread = max(getattr(best, f"{key}_std") or 0.0, (getattr(second, f"{key}_std") if second else None) or 0.0)
            ralu = [r for r in ranked if r.method in RALU_METHODS or r.method.startswith("schedule:")]
            peers = [r for r in ranked if r.method in PEER_METHODS]
            entry[key] = Winner(
                best=best.method,
                value=value(best),
                runner_up=second.method if second else None,
                margin=abs(value(best) - value(second)) if second else None,
                separable=bool(second is not None and abs(value(best) - value(second)) > spread and len(best.seeds) > 1),
                best_ralu=ralu[0].method if ralu else None,
                best_peer=peers[0].method if peers else None,
                ralu_beats_peers=bool(ralu and peers and ((value(ralu[0]) > value(peers[0])) == higher) and value(ralu[0]) != value(peers[0])),
            )
        out[str(budget)] = entry
    return out


def write_reports(report: QualityReport, samples: SampleGrid, out_dir: Path) -> tuple[Path, Path]:
    """The figures under ``out_dir/quality/``, then the Markdown and the JSON."""
    out_dir = Path(out_dir)
    figures = figure_paths(report)
    write_grid(samples, out_dir / figures.grid)
    write_plots(report, out_dir / figures.tradeoff, out_dir / figures.sweep if figures.sweep else None)
    return write_report(out_dir, REPORT_NAME, render_markdown(report, figures), report.model_dump(mode="json"))


def run_from_args(args: argparse.Namespace) -> int:
    if getattr(args, "testbed", "v1") == "v2":
        from ralu.calibrate.bench.quality.v2.run import run_v2_from_args

        return run_v2_from_args(args)
    problem = v1_refusal(args)
    if problem:
        return fail("ralu-bench quality", ValueError(problem))
    try:
        config = make_config(args)
    except ValueError as error:
        return fail("ralu-bench quality", error)
    command = getattr(args, "command_line", "ralu-bench quality")
    try:
        report, samples = run_benchmark(config, command)
    except FileNotFoundError as error:
        return fail("ralu-bench quality", error)
    md_path, json_path = write_reports(report, samples, args.out_dir)
    for r in report.rows:
        print(f"{r.method:<20} {r.budget:>3}x  speed-up {r.flops_speedup_total:5.2f}x  PSNR {r.psnr:6.2f}  SSIM {r.ssim:.3f}  "
              f"FD {r.fd:7.2f}  acc {r.accuracy:.3f}  blocking {r.edge_artifacts:+.3f}")
    print(f"wrote {md_path} and {json_path}")
    return 0
