"""``ralu-bench cache``: the measurement and its report (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

from ralu.calibrate.magcache import measure_mag_ratios
from ralu.runtime import RALUFluxPipeline, RALUStableDiffusion3Pipeline
from ralu.runtime.cache import disable_cache, enable_cache, mag_cache_config
from ralu.runtime.schedule import write_text_atomic
from ralu_lab.bench import cache as package
from ralu_lab.testbed.v2 import data
from ralu_lab.testbed.v2 import model as tb
from ralu_lab.testbed.v2.location import AUTOENCODER, FLUX, SD3, describe

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


def testbed_pipeline(arch: str, weights_dir: Path | None = None):
    """Testbed v2's generator of ``arch`` and its autoencoder in the RALU pipeline of ``arch``
    (``weights_dir``: a folder holding ``autoencoder/``, ``flux/``, ``sd3/``; default the
    repository's).  FileNotFoundError: one line with the fix."""
    folder = None if weights_dir is None else Path(weights_dir)
    part = FLUX if arch == "flux" else SD3
    pipe = tb.load_pipeline(arch, path=None if folder is None else folder / part, autoencoder=None if folder is None else folder / AUTOENCODER)
    ralu = (RALUFluxPipeline if arch == "flux" else RALUStableDiffusion3Pipeline).from_pipe(pipe)
    ralu.set_progress_bar_config(disable=True)
    return ralu


def testbed_call(arch: str, images: int, seed: int) -> dict:
    """A testbed v2 call of ``images`` random prompts (labels drawn from ``seed``) with its
    guidance (:func:`ralu_lab.testbed.v2.model.call_inputs`) and one noise generator per
    image (``seed + i``)."""
    labels = data.sample_labels(images, torch.Generator().manual_seed(seed))
    return {**tb.call_inputs(arch, labels), "generator": [torch.Generator().manual_seed(seed + i) for i in range(images)]}


def weights_used(arch: str, weights_dir: Path | None) -> dict[str, str]:
    """How the report names the weight folders of ``arch``'s runs."""
    folder = None if weights_dir is None else Path(weights_dir)
    return {part: describe(part, None if folder is None else folder / part) for part in (AUTOENCODER, FLUX if arch == "flux" else SD3)}


def testbed_configs(arch: str, ratios: list[list[float]]) -> dict:
    """The caches the report compares (diffusers' defaults where they fit a stage of a few
    steps); FirstBlockCache on FLUX only (it does not run on SD3: :mod:`ralu.runtime.cache`)."""
    first_block = {
        "first_block 0.05": FirstBlockCacheConfig(threshold=0.05),
        "first_block 0.2": FirstBlockCacheConfig(threshold=0.2),
    }
    return {
        **(first_block if arch == "flux" else {}),
        "taylorseer interval 2": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
        "magcache 0.06 (per-stage ratios)": mag_cache_config(ratios, threshold=0.06, retention_ratio=0.2),
        "magcache 0.2 (per-stage ratios)": mag_cache_config(ratios, threshold=0.2, retention_ratio=0.2),
    }


def render_markdown(report: dict) -> str:
    lines = [
        "# Step caches in RALU runs (testbed v2)",
        "",
        (DESCRIPTION or "").split("\n\n")[1].replace("\n", " "),
        "",
        (
            f"Regenerate: `{report['command']}`.  Images per row: {report['images']} (seed {report['seed']}); "
            "MagCache ratios measured per stage on other prompts and noise (seed + 1000)."
        ),
        "",
        (
            "On testbed v2 (docs/testbed-v2.md): each schedule moved to 64 px and run by the RALU pipeline of its family on "
            "the testbed's generator, with its guidance (FLUX: true classifier-free guidance, two forwards per step; SD3: "
            "classifier-free guidance over a doubled batch).  Weights: "
            + "; ".join(f"{part} {where}" for part, where in report["weights"].items()) + "."
        ),
        "",
    ]
    for block in report["schedules"]:
        lines += [f"## {block['schedule']} ({block['arch']}, steps per stage {block['steps']})", "", "| cache | linear FLOPs executed | latent RMS change |", "|---|---|---|"]
        for row in block["rows"]:
            lines.append(f"| {row['cache']} | {100 * row['flops_fraction']:.1f} % | {row['latent_rms_change']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    if args.images < 1:
        print(f"ralu-bench cache: --images {args.images}: need at least 1. Fix: pass --images 8", file=sys.stderr)
        return 2
    try:
        schedules = [tb.testbed_schedule(name) for name in args.schedules]
        arches = list(dict.fromkeys(schedule.family for schedule in schedules))
        pipes = {arch: testbed_pipeline(arch, args.weights_dir) for arch in arches}
        weights = {part: where for arch in arches for part, where in weights_used(arch, args.weights_dir).items()}
    except (ValueError, FileNotFoundError) as error:
        print(f"ralu-bench cache: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2

    blocks = []
    for name, schedule in zip(args.schedules, schedules):
        arch, pipe = schedule.family, pipes[schedule.family]
        ratios = measure_mag_ratios(pipe, schedule, [testbed_call(arch, args.images, args.seed + 1000)])
        rows = measure(pipe, schedule, testbed_configs(arch, ratios), testbed_call(arch, args.images, args.seed))
        blocks.append({"schedule": name, "arch": arch, "steps": [stage.steps for stage in schedule.stages], "mag_ratios": ratios, "rows": rows})
        for row in rows:
            print(f"{name:<14} {row['cache']:<34} FLOPs {100 * row['flops_fraction']:5.1f} %  latent change {row['latent_rms_change']:.4f}")
    report = {"command": getattr(args, "command_line", "ralu-bench cache"), "testbed": "v2", "weights": weights,
              "images": args.images, "seed": args.seed, "schedules": blocks}
    json_path = write_text_atomic(args.out_dir / f"{REPORT_NAME}.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    md_path = write_text_atomic(args.out_dir / f"{REPORT_NAME}.md", render_markdown(report))
    print(f"wrote {md_path} and {json_path}")
    return 0
