"""The speed benchmark end to end: measure, assemble the report, write it."""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ralu.calibrate.flops.pricing import ZERO, flops_speedup, ralu_breakdown
from ralu_lab.bench.common import fail, median, write_report
from ralu_lab.bench.speed.caches import measure_cache_rows
from ralu_lab.bench.speed.compiled import measure_compile_rows
from ralu_lab.bench.speed.config import BenchConfig, make_config
from ralu_lab.bench.speed.cost import (
    edge_decode_flops,
    forward_flops_model,
    paper_speedup,
    ralu_config_flops,
    real_attention_share,
    real_transformer_bytes,
)
from ralu_lab.bench.speed.measure import (
    MemoryMeter,
    edge_decode_seconds,
    forward_throughput,
    load_average,
    machine_info,
    measure_family,
    measure_memory,
    on_cpu_time,
    overhead_summary,
    progress,
    stage_token_counts,
)
from ralu_lab.bench.speed.models import build_family
from ralu_lab.bench.speed.report import render_markdown
from ralu_lab.bench.speed.schema import (
    OVERHEAD_TARGET,
    REPORT_NAME,
    WALL_FLOPS_TOLERANCE,
    AttentionShare,
    Baseline,
    EdgeDecode,
    LoadAverage,
    Overhead,
    ScheduleRow,
    SpeedReport,
    Targets,
)


def _ratio(a, b) -> float | None:
    return a / b if a and b else None


def attention_share(flops) -> float:
    return flops.attention / flops.total


def run_benchmark(config: BenchConfig, command: str) -> SpeedReport:
    """Run everything; returns the report (what ``speed.json`` holds)."""

    started = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    load_start = load_average()
    runs, measured, flops_models, decode_flops, decode_seconds, throughput = [], {}, {}, {}, {}, {}
    cache_rows, compile_rows = [], []
    # On CUDA each family's memory is measured right after its timings and its models are then
    # released (real-size models of every family do not fit one GPU together); on CPU memory
    # comes after all timing (its allocator setting slows allocation), the reduced models kept.
    meter = MemoryMeter(config.device)
    memory = {}
    per_family_memory = torch.device(config.device).type == "cuda"
    for family in config.families:
        run = build_family(config, family)
        if not run.schedules:
            continue
        runs.append(run)
        progress(f"{family.family}: counting FLOPs of the benchmarked models")
        flops_models[family.family] = forward_flops_model(family)
        decode_flops[family.family] = edge_decode_flops(config, family.family)
        measured[family.family] = measure_family(config, run)
        progress(f"{family.family}: forward throughput by token count")
        throughput[family.family] = forward_throughput(config, run, flops_models[family.family], stage_token_counts(run))
        decode_seconds[family.family] = edge_decode_seconds(config, run)
        # Before the memory measurement, whose allocator setting slows allocation.
        if config.caches:
            cache_rows += measure_cache_rows(config, run, flops_models[family.family], decode_flops[family.family], measured[family.family])
        if config.compile_backend:
            compile_rows += measure_compile_rows(config, run, config.compile_backend, measured[family.family])
        if per_family_memory:
            progress(f"{family.family}: peak memory")
            memory[family.family] = measure_memory(config, run, meter)
            runs[-1] = released(run)
            run = None  # the last reference to the models: freed before the next family is built
            gc.collect()
            torch.cuda.empty_cache()
    if not per_family_memory:
        progress("peak memory")
        memory = {run.config.family: measure_memory(config, run, meter) for run in runs}

    rows, baselines = [], {}
    cpu_basis = on_cpu_time(config)
    basis_key = "cpu_seconds" if cpu_basis else "seconds"
    for run in runs:
        name_family = run.config.family
        forward = flops_models[name_family]
        full_tokens = run.config.image_tokens(config.size)
        for steps, timing in measured[name_family]["baseline"].items():
            baselines[f"{name_family}-{steps}"] = Baseline(
                family=name_family, steps=steps, seconds=timing["seconds"], median_seconds=median(timing["seconds"]),
                cpu_seconds=timing["cpu_seconds"], median_cpu_seconds=median(timing["cpu_seconds"]),
                image_tokens=full_tokens, config_tflops=(forward(full_tokens) * steps).total / 1e12,
                peak_bytes=memory[name_family]["baseline"],
                peak_total_bytes=memory[name_family]["total"]["baseline"],
            )
        # Single forwards at each token count, and the edge decode, timed alone.
        forward_seconds = {entry.image_tokens: getattr(entry, basis_key) for entry in throughput[name_family]}
        decode_alone = decode_seconds[name_family][basis_key]
        for name, schedule, shipped in run.schedules:
            plan = run.ralu.plan(schedule)
            steps = [stage.steps for stage in schedule.stages]
            tokens = [stage.tokens for stage in plan.stages]
            three = len(steps) == 3
            base_flops = forward(full_tokens) * schedule.base_steps
            edge = decode_flops[name_family] if three else ZERO
            ralu_flops = ralu_config_flops(forward, tokens, steps, edge)
            config_speedup = base_flops / ralu_flops
            real = flops_speedup(shipped.model, shipped.height, shipped.width, steps, shipped.up_ratio, shipped.base_steps)
            real_parts = ralu_breakdown(shipped.model, shipped.height, shipped.width, steps, shipped.up_ratio)
            real_total = sum(real_parts.values(), start=ZERO)
            real_edge = real_parts.get("vae_edge_decode")

            base_timing = measured[name_family]["baseline"][schedule.base_steps]
            result = measured[name_family]["ralu"][name]
            base_seconds, ralu_seconds = median(base_timing["seconds"]), median(result["seconds"])
            wall = base_seconds / ralu_seconds
            cpu_speedup = median(base_timing["cpu_seconds"]) / median(result["cpu_seconds"]) if cpu_basis else None
            measured_speedup = cpu_speedup if cpu_basis else wall
            # The speed-up bare evaluations predict: the machine's throughput curve.
            forward_speedup = None
            if all(n in forward_seconds for n in [full_tokens, *tokens]):
                ralu_alone = sum(s * forward_seconds[n] for n, s in zip(tokens, steps)) + (decode_alone if three else 0.0)
                forward_speedup = schedule.base_steps * forward_seconds[full_tokens] / ralu_alone
            overhead = Overhead(**overhead_summary(result["profiles"]))

            base_peak = memory[name_family]["baseline"]
            ralu_peak = memory[name_family]["ralu"][name]
            decode_peak = memory[name_family]["edge_decode"]
            mem_ratio = ralu_peak / base_peak if base_peak and ralu_peak else None
            bound = (base_peak + (decode_peak if three else 0)) / base_peak if base_peak and decode_peak is not None else None
            rows.append(ScheduleRow(
                schedule=name,
                family=name_family,
                model=shipped.model,
                steps=steps,
                up_ratio=shipped.up_ratio,
                base_steps=shipped.base_steps,
                stage_image_tokens=tokens,
                flops_speedup_total=real.total,
                flops_speedup_linear=real.linear,
                paper_speedup_linear=paper_speedup(shipped),
                real_edge_decode_fraction_total=real_edge.total / real_total.total if real_edge else 0.0,
                real_edge_decode_fraction_linear=real_edge.linear / real_total.linear if real_edge else 0.0,
                config_flops_speedup_total=config_speedup.total,
                config_flops_speedup_linear=config_speedup.linear,
                config_edge_decode_fraction_total=edge.total / ralu_flops.total,
                config_ralu_tflops_total=ralu_flops.total / 1e12,
                baseline_seconds=base_seconds,
                ralu_seconds=ralu_seconds,
                ralu_seconds_all=result["seconds"],
                ralu_cpu_seconds_all=result["cpu_seconds"],
                wall_speedup=wall,
                wall_over_flops=wall / config_speedup.total,
                cpu_time_speedup=cpu_speedup,
                cpu_time_over_flops=cpu_speedup / config_speedup.total if cpu_speedup else None,
                timing_basis="cpu" if cpu_basis else "wall",
                forward_time_speedup=forward_speedup,
                machine_factor=forward_speedup / config_speedup.total if forward_speedup else None,
                runtime_factor=measured_speedup / forward_speedup if forward_speedup else None,
                overhead_fraction=overhead.overhead_fraction,
                overhead=overhead,
                peak_mem_ratio=mem_ratio,
                peak_mem_bound_ratio=bound,
                peak_bytes=ralu_peak,
                peak_total_bytes=memory[name_family]["total"]["ralu"][name],
                peak_mem_ratio_total=_ratio(memory[name_family]["total"]["ralu"][name], memory[name_family]["total"]["baseline"]),
                targets=Targets(
                    overhead_under_3_percent=overhead.overhead_fraction < OVERHEAD_TARGET,
                    wall_within_10_percent_of_flops=abs(wall / config_speedup.total - 1.0) <= WALL_FLOPS_TOLERANCE,
                    cpu_time_within_10_percent_of_flops=abs(cpu_speedup / config_speedup.total - 1.0) <= WALL_FLOPS_TOLERANCE if cpu_speedup else None,
                    memory_within_bound=(mem_ratio <= bound + 0.01) if mem_ratio is not None and bound is not None else None,
                ),
            ))
    config_dict = asdict(config)
    config_dict["families"] = [
        {**asdict(f), "cfg": f.cfg, "transformer_batch": f.transformer_batch} for f in config.families
    ]
    return SpeedReport(
        command=command,
        config=config_dict,
        rows=rows,
        baselines=baselines,
        edge_decode={
            family: EdgeDecode(
                config_tflops_total=flops.total / 1e12, config_tflops_linear=flops.linear / 1e12,
                seconds=decode_seconds[family]["seconds"], cpu_seconds=decode_seconds[family]["cpu_seconds"],
                peak_bytes=memory[family]["edge_decode"],
            )
            for family, flops in decode_flops.items()
        },
        forward_throughput=throughput,
        real_transformer_bf16_bytes={run.config.family: real_transformer_bytes(run.config) for run in runs},
        attention_share={
            run.config.family: AttentionShare(
                config=attention_share(flops_models[run.config.family](run.config.image_tokens(config.size))),
                real=real_attention_share(run.config.model, run.config.image_tokens(config.size)),
            )
            for run in runs
        },
        memory_method=meter.method,
        machine=machine_info(config),
        load_average=LoadAverage(start=load_start, end=load_average()),
        timing="median of repeats after a warm-up; baseline and RALU runs interleaved; output_type='latent' for both (no final VAE decode)",
        elapsed_seconds=time.time() - started,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        cache_rows=cache_rows if config.caches else None,
        compile_rows=compile_rows if config.compile_backend else None,
    )


class _Planned:
    """What the report still needs of a released family: its stage plans."""

    def __init__(self, plans: dict):
        self._plans = plans

    def plan(self, schedule):
        return self._plans[id(schedule)]


def released(run):
    """``run`` without its models (they are freed; the GPU's memory goes to the next family):
    its configuration, schedules and stage plans only."""
    plans = _Planned({id(schedule): run.ralu.plan(schedule) for _, schedule, _ in run.schedules})
    return type(run)(run.config, None, plans, {}, list(run.schedules))


def write_reports(report: SpeedReport, out_dir: Path, name: str = REPORT_NAME) -> tuple[Path, Path]:
    return write_report(out_dir, name, render_markdown(report), report.model_dump(mode="json"))


def run_from_args(args: argparse.Namespace) -> int:
    try:
        config = make_config(args.device, args.quick, args.widths, args.dtype, args.repeats, args.threads, tuple(args.schedules) if args.schedules else None,
                             caches=getattr(args, "caches", True), compile_backend=getattr(args, "compile", None))
    except ValueError as error:
        return fail("ralu-bench speed", error)
    if config.device == "cuda":
        if not torch.cuda.is_available():
            return fail("ralu-bench speed", "--device cuda but torch sees no CUDA device")
    command = getattr(args, "command_line", "ralu-bench speed")
    report = run_benchmark(config, command)
    md_path, json_path = write_reports(report, args.out_dir, getattr(args, "name", REPORT_NAME))
    for row in report.rows:
        memory = "n/a" if row.peak_mem_ratio is None else f"{row.peak_mem_ratio:.2f}"
        print(f"{row.schedule:<24} FLOPs (config) {row.config_flops_speedup_total:6.2f}x  wall {row.wall_speedup:6.2f}x  "
              f"wall/FLOPs {row.wall_over_flops:.3f}  overhead {100 * row.overhead_fraction:.2f} %  peak mem {memory}")
    for row in report.cache_rows or []:
        gain = "" if row.wall_gain is None else f"  gain {row.wall_gain:.2f}x"
        print(f"{row.schedule:<24} {row.method} {'/'.join(map(str, row.steps))} + {row.cache:<11} wall {row.wall_speedup:6.2f}x{gain}  "
              f"linear FLOPs {row.flops_speedup:6.2f}x (executed {100 / row.flops_gain:.1f} % of uncached)")
    for row in report.compile_rows or []:
        what = f"{row.method} {row.schedule or ''} {'/'.join(map(str, row.steps))}"
        print(f"compiled ({row.backend}) {what:<32} " + (f"failed: {row.error}" if row.error else f"wall {row.wall_speedup:6.2f}x  gain {row.wall_gain:.2f}x  recompiles {row.recompiles}"))
    print(f"wrote {md_path} and {json_path}")
    return 0
