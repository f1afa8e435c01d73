"""``ralu-bench cache``: the measurement and its report (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager

import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

from ralu.calibrate.bench import cache as package
from ralu.calibrate.magcache import measure_mag_ratios
from ralu.calibrate.testbed.conditioning import encode_labels
from ralu.calibrate.testbed.data import sample_labels
from ralu.calibrate.testbed.model import load_pipeline, testbed_schedule
from ralu.runtime import RALUFluxPipeline
from ralu.runtime.cache import disable_cache, enable_cache, mag_cache_config
from ralu.runtime.schedule import write_text_atomic

REPORT_NAME = "cache"
#: The package docstring: its second paragraph opens the report.
DESCRIPTION = package.__doc__


@contextmanager
def executed_linear_flops(transformer):
    """Within the block, ``counter["flops"]`` sums ``2 * rows * in * out`` over every
    ``nn.Linear`` call of ``transformer`` (what actually ran)."""
    counter = {"flops": 0}

    def count(module, args, output):
        counter["flops"] += 2 * args[0].numel() * module.out_features

    handles = [module.register_forward_hook(count) for module in transformer.modules() if isinstance(module, torch.nn.Linear)]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def measure(pipe, schedule, configs: dict, call: dict) -> list[dict]:
    """One row per named diffusers cache config (None: no cache, the reference): executed
    linear FLOPs, their fraction of the uncached run's, and the relative RMS change of the
    final latents.  ``call``: the pipeline's keyword arguments (a list of generators is
    re-seeded identically for every row)."""
    seeds = [g.initial_seed() for g in call["generator"]]
    rows, reference = [], None
    for name, config in {"none": None, **configs}.items():
        kwargs = {**call, "generator": [torch.Generator().manual_seed(s) for s in seeds]}
        if config is not None:
            enable_cache(pipe.transformer, config)
        try:
            with executed_linear_flops(pipe.transformer) as counter:
                latents = pipe(**kwargs, schedule=schedule, output_type="latent").images.float()
        finally:
            if config is not None:
                disable_cache(pipe.transformer)
        if reference is None:
            reference = (latents, counter["flops"])
        change = float((latents - reference[0]).pow(2).mean().sqrt() / reference[0].pow(2).mean().sqrt())
        rows.append({"cache": name, "linear_flops": counter["flops"], "flops_fraction": counter["flops"] / reference[1], "latent_rms_change": change})
    return rows


def testbed_configs(schedule, ratios: list[list[float]]) -> dict:
    """The caches the report compares (diffusers' defaults where they fit a stage of a few steps)."""
    return {
        "first_block 0.05": FirstBlockCacheConfig(threshold=0.05),
        "first_block 0.2": FirstBlockCacheConfig(threshold=0.2),
        "taylorseer interval 2": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
        "magcache 0.06 (per-stage ratios)": mag_cache_config(ratios, threshold=0.06, retention_ratio=0.2),
        "magcache 0.2 (per-stage ratios)": mag_cache_config(ratios, threshold=0.2, retention_ratio=0.2),
    }


def render_markdown(report: dict) -> str:
    lines = [
        "# Step caches in RALU runs (testbed)",
        "",
        (DESCRIPTION or "").split("\n\n")[1].replace("\n", " "),
        "",
        (
            f"Regenerate: `{report['command']}`.  Images per row: {report['images']} (seed {report['seed']}); "
            "MagCache ratios measured per stage on other prompts and noise (seed + 1000)."
        ),
        "",
    ]
    for block in report["schedules"]:
        lines += [f"## {block['schedule']} (steps per stage {block['steps']})", "", "| cache | linear FLOPs executed | latent RMS change |", "|---|---|---|"]
        for row in block["rows"]:
            lines.append(f"| {row['cache']} | {100 * row['flops_fraction']:.1f} % | {row['latent_rms_change']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    if args.images < 1:
        print(f"ralu-bench cache: --images {args.images}: need at least 1. Fix: pass --images 8", file=sys.stderr)
        return 2
    try:
        schedules = [testbed_schedule(name) for name in args.schedules]
        pipe = load_pipeline(path=args.weights, pipeline_class=RALUFluxPipeline)
    except (ValueError, FileNotFoundError) as error:
        print(f"ralu-bench cache: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2

    def call(seed):
        labels = sample_labels(args.images, torch.Generator().manual_seed(seed))
        return {**encode_labels(labels), "generator": [torch.Generator().manual_seed(seed + i) for i in range(args.images)]}

    blocks = []
    for name, schedule in zip(args.schedules, schedules):
        ratios = measure_mag_ratios(pipe, schedule, [call(args.seed + 1000)])
        rows = measure(pipe, schedule, testbed_configs(schedule, ratios), call(args.seed))
        blocks.append({"schedule": name, "steps": [stage.steps for stage in schedule.stages], "mag_ratios": ratios, "rows": rows})
        for row in rows:
            print(f"{name:<14} {row['cache']:<34} FLOPs {100 * row['flops_fraction']:5.1f} %  latent change {row['latent_rms_change']:.4f}")
    report = {"command": getattr(args, "command_line", "ralu-bench cache"), "images": args.images, "seed": args.seed, "schedules": blocks}
    json_path = write_text_atomic(args.out_dir / f"{REPORT_NAME}.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    md_path = write_text_atomic(args.out_dir / f"{REPORT_NAME}.md", render_markdown(report))
    print(f"wrote {md_path} and {json_path}")
    return 0
