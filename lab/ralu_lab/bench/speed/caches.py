"""Step caches in the timed runs: every schedule with each cache its family supports, and the
plain pipeline of the same FLOPs budget with the same caches.

The caches and their settings are the quality harness's (``ralu-bench quality --testbed v2``:
:data:`ralu_lab.bench.quality.v2.sampler.CACHE_SETTINGS`, which kinds run on which
family and on which rows: :mod:`ralu_lab.bench.quality.v2.plan`), so a speed-up here
and a quality verdict there are about the same runs.  MagCache's per-stage ratios are measured
(:func:`ralu.calibrate.magcache.measure_mag_ratios`) on other prompt embeddings and noise than
the timed calls'.

A cache skips work inside the forwards, so the configuration's FLOPs (every forward in full)
overstate a cached call's cost: each row also gives the transformer's linear FLOPs that really
executed (:func:`ralu_lab.bench.cache.run.executed_linear_flops`, forward hooks on every
``nn.Linear``), counted in a separate untimed call so that no hook runs in a timed one.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ralu.calibrate.flops.pricing import ZERO
from ralu.calibrate.magcache import measure_mag_ratios
from ralu.runtime.cache import disable_cache, enable_cache
from ralu_lab.bench.cache.run import executed_linear_flops
from ralu_lab.bench.common import median
from ralu_lab.bench.quality.v2.plan import CACHED_METHODS, MAG_SEED_OFFSET
from ralu_lab.bench.quality.v2.sampler import CACHE_SETTINGS
from ralu_lab.bench.speed.config import BenchConfig
from ralu_lab.bench.speed.cost import equal_cost_steps, ralu_config_flops
from ralu_lab.bench.speed.measure import on_cpu_time, progress, timed
from ralu_lab.bench.speed.models import FamilyRun, call_baseline, call_ralu
from ralu_lab.bench.speed.schema import CacheRow


@dataclass
class Method:
    """One call measured in this table: ``call()`` runs it uncached; ``cache`` is enabled around it."""

    key: tuple  # identical calls of different schedules' rows share one measurement
    method: str  # "ralu" or "plain"
    kind: str  # a cache kind, or "none"
    steps: list[int]
    call: Callable[[], Any]
    cache: Any = None  # the diffusers config, or None


@contextmanager
def cached(transformer, config):
    """``config`` enabled on ``transformer`` within the block (nothing for None)."""
    if config is None:
        yield
        return
    enable_cache(transformer, config)
    try:
        yield
    finally:
        disable_cache(transformer)


def other_inputs(config: BenchConfig, run: FamilyRun) -> dict:
    """The timed calls' keyword arguments with other prompt embeddings and noise (MagCache's
    ratios are measured on these), without ``output_type`` (the measurement sets it)."""
    generator = torch.Generator("cpu").manual_seed(config.seed + MAG_SEED_OFFSET)
    # Float tensors (embeddings, Kontext's reference latents) redrawn; masks kept.
    inputs = {
        key: torch.randn(value.shape, generator=generator).to(value) if torch.is_tensor(value) and value.is_floating_point() and "mask" not in key else value
        for key, value in run.inputs.items() if key != "output_type"
    }
    return {**inputs, "generator": torch.Generator(config.device).manual_seed(config.seed + MAG_SEED_OFFSET)}


def methods_of(config: BenchConfig, run: FamilyRun, name: str, schedule, forward, edge_flops) -> tuple[list[Method], list | None, int]:
    """The rows of one schedule (RALU with each cache; the plain pipeline of equal cost, uncached
    and with each cache the quality harness runs on it), MagCache's ratios, and the uncached
    RALU call's executed linear FLOPs."""
    family = run.config.family
    kinds = run.config.adapter.cache_kinds
    plan = run.ralu.plan(schedule)
    steps = [stage.steps for stage in schedule.stages]
    edge = edge_flops if len(steps) == 3 else ZERO
    ralu_flops = ralu_config_flops(forward, [stage.tokens for stage in plan.stages], steps, edge)
    plain_steps = equal_cost_steps(forward, run.config.image_tokens(config.size), ralu_flops, schedule.base_steps)
    # Untimed: MagCache's ratios, and (the same call) the uncached RALU call's executed linear
    # FLOPs, which no input changes: without a cache every forward runs in full.
    ratios = None
    with executed_linear_flops(run.base.transformer) as counter:
        if "magcache" in kinds:
            progress(f"{family}: {name}: MagCache ratios on other prompts and noise")
            ratios = [[round(float(r), 6) for r in stage] for stage in measure_mag_ratios(run.ralu, schedule, [other_inputs(config, run)])]
        else:
            call_ralu(config, run, schedule)
    out = [
        Method(("ralu", name, kind), "ralu", kind, steps, lambda: call_ralu(config, run, schedule), CACHE_SETTINGS[kind][0](ratios))
        for kind in kinds
    ]
    if run.config.adapter.plain_caches:
        # MagCache on the plain pipeline needs a ratio table of its own grid; the quality harness
        # measures one, this bench does not yet (its rows stay RALU-only for MagCache).
        plain = [kind for kind in kinds if "base-steps" in CACHED_METHODS[kind] and kind != "magcache"]
        out += [
            Method(("plain", plain_steps, kind), "plain", kind, [plain_steps], lambda: call_baseline(config, run, plain_steps),
                   None if kind == "none" else CACHE_SETTINGS[kind][0](None))
            for kind in ("none", *plain)
        ]
    return out, ratios, counter["flops"]


def measure_cache_rows(config: BenchConfig, run: FamilyRun, forward, edge_flops, measured: dict) -> list[CacheRow]:
    """The cache rows of one family.  ``measured``: :func:`.measure.measure_family`'s timings of
    the uncached baseline and RALU calls (the speed-ups' references, timed in the same process)."""
    family, transformer = run.config.family, run.base.transformer
    per_schedule, unique, flops = [], {}, {}
    for name, schedule, _ in run.schedules:
        methods, ratios, flops["ralu", name, "none"] = methods_of(config, run, name, schedule, forward, edge_flops)
        per_schedule.append((name, schedule, methods, ratios))
        for method in methods:
            unique.setdefault(method.key, method)

    # Untimed: the linear FLOPs that execute (hooks never run in a timed call).  An uncached
    # plain step always runs the same forward, so one step, counted, prices any step count.
    progress(f"{family}: executed linear FLOPs of the cache rows (untimed)")
    with executed_linear_flops(transformer) as counter:
        call_baseline(config, run, 1)
    plain_step_flops = counter["flops"]
    for key, method in unique.items():
        if method.kind == "none":
            flops[key] = plain_step_flops * method.steps[0]
            continue
        with cached(transformer, method.cache), executed_linear_flops(transformer) as counter:
            method.call()
        flops[key] = counter["flops"]

    timings = {key: {"seconds": [], "cpu_seconds": []} for key in unique}
    for repeat in range(config.repeats):
        for key, method in unique.items():
            with cached(transformer, method.cache):
                elapsed, cpu, _ = timed(method.call, config.device)
            timings[key]["seconds"].append(elapsed)
            timings[key]["cpu_seconds"].append(cpu)
            progress(f"{family}: cache rows, repeat {repeat + 1}/{config.repeats}: {method.method} {method.steps} + {method.kind} {elapsed:.2f} s (CPU {cpu:.2f} s)")

    cpu_basis = on_cpu_time(config)
    rows = []
    for name, schedule, methods, ratios in per_schedule:
        base = measured["baseline"][schedule.base_steps]
        base_wall, base_cpu = median(base["seconds"]), median(base["cpu_seconds"])
        for method in methods:
            timing = timings[method.key]
            wall, cpu = median(timing["seconds"]), median(timing["cpu_seconds"])
            if method.method == "ralu":
                reference = measured["ralu"][name]
                uncached_key = ("ralu", name, "none")
            else:
                reference = timings[("plain", method.steps[0], "none")]
                uncached_key = ("plain", method.steps[0], "none")
            ref_wall, ref_cpu = median(reference["seconds"]), median(reference["cpu_seconds"])
            executed, uncached = flops[method.key], flops[uncached_key]
            baseline_flops = plain_step_flops * schedule.base_steps
            rows.append(CacheRow(
                schedule=name, family=family, method=method.method, cache=method.kind,
                settings=CACHE_SETTINGS[method.kind][1] if method.kind in CACHE_SETTINGS else None,
                steps=method.steps, base_steps=schedule.base_steps,
                seconds_all=timing["seconds"], cpu_seconds_all=timing["cpu_seconds"], seconds=wall, cpu_seconds=cpu,
                wall_speedup=base_wall / wall, cpu_time_speedup=base_cpu / cpu if cpu_basis else None,
                wall_gain=None if method.kind == "none" else ref_wall / wall,
                cpu_time_gain=ref_cpu / cpu if cpu_basis and method.kind != "none" else None,
                executed_linear_tflops=executed / 1e12, uncached_linear_tflops=uncached / 1e12,
                baseline_linear_tflops=baseline_flops / 1e12,
                flops_speedup=baseline_flops / executed, flops_gain=uncached / executed,
                mag_ratios=ratios if method.kind == "magcache" else None,
            ))
    return rows
