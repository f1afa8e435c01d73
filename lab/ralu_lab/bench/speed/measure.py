"""Timing, overhead sections and peak memory of the pipelines, and the machine they ran on."""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import diffusers
import torch

from ralu.runtime import sd3_tokens
from ralu.runtime.profiling import MODEL_SECTION, OVERHEAD_SECTIONS, Profiler
from ralu_lab.bench.common import median
from ralu_lab.bench.speed.config import BenchConfig
from ralu_lab.bench.speed.models import (
    FamilyRun,
    call_baseline,
    call_ralu,
    one_step_per_stage,
    torch_dtype,
    vae_latent,
)
from ralu_lab.bench.speed.schema import Throughput


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device) -> tuple[float, float, Any]:
    """Wall seconds and process CPU seconds of ``fn()`` (the device synchronised before and
    after), and its result.  With one CPU thread, CPU time is what the wall time would be on an
    otherwise idle machine: time spent waiting for a core another process holds is not in it."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, result


class MemoryMeter:
    """Peak memory of a call above what was held before it (method: :mod:`ralu_lab.bench.speed`)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.method = None
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated above memory_allocated before the call"
            return
        try:
            libc = ctypes.CDLL("libc.so.6")
            # M_MMAP_THRESHOLD = -3: every allocation >= 64 KiB is its own mmap, returned on free.
            if libc.mallopt(-3, 64 * 1024) != 1:
                return
            self._libc = libc
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.method = "peak resident set (VmHWM, reset via /proc/self/clear_refs) above the resident set before the call; glibc mmap threshold 64 KiB"
        except (OSError, AttributeError):
            self.method = None

    @property
    def available(self) -> bool:
        return self.method is not None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {key}")

    def measure(self, fn: Callable[[], Any]) -> tuple[int | None, int | None]:
        """``(working, total)`` peak bytes of ``fn()``: above the memory held before it, and in
        all (CUDA: allocated memory, weights included; CPU: the whole process's resident set,
        libraries included).  ``(None, None)`` when unavailable."""
        if not self.available:
            fn()
            return None, None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return int(peak - before), int(peak)
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = self._status("VmRSS")
        fn()
        peak = self._status("VmHWM")
        return int(peak - before), int(peak)


def progress(message: str) -> None:
    print(f"[ralu-bench speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def forward_throughput(config: BenchConfig, run: FamilyRun, forward_flops, token_counts: list[int]) -> list[Throughput]:
    """Median wall time of single transformer evaluations at each token count (text included,
    CFG batch, Kontext's reference tokens), as the runtime makes them: a forward at any count
    (the family adapter's inputs, on the most square grid of the count); SD3's forward where
    the tokens form a native grid, else its token path (the mixed stage's).  This is the
    machine's throughput curve, which decides how far wall-clock speed-ups can follow FLOPs ones."""

    family = run.config
    device, dtype = torch.device(config.device), torch_dtype(config.dtype)
    transformer = run.base.transformer
    batch = family.transformer_batch
    generator = torch.Generator("cpu").manual_seed(config.seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    # SD3's latent: the model's channels, cut by the transformer into patch x patch tokens.
    channels, patch = family.spec.latent_channels, family.transformer.get("patch_size")
    rows = []
    for tokens in token_counts:
        native = _grid(tokens, transformer.pos_embed.pos_embed_max_size) if family.adapter.native_grid_only else _grid(tokens, tokens)
        if native is not None:
            inputs = family.adapter.inputs(family, *native, rand, device)
            path = "forward"

            def evaluate():
                return transformer(**inputs, return_dict=False)
        else:
            side = math.isqrt(tokens - 1) + 1
            positions = sd3_tokens.grid_positions(transformer, side, side, device=device)[:tokens]
            embeds = sd3_tokens.position_embedding(transformer, positions)
            patches = rand(batch, tokens, channels, patch, patch)
            common = dict(
                encoder_hidden_states=rand(batch, family.text_tokens, family.text_dim), pooled_projections=rand(batch, family.pooled_dim),
                timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
            )
            path = "token path"

            def evaluate():
                return sd3_tokens.token_forward(transformer, patches, positions, common["encoder_hidden_states"], common["pooled_projections"], common["timestep"], position_embeds=embeds)

        seconds, cpu_seconds = [], []
        with torch.no_grad():
            for index in range(config.repeats + 1):  # the first is a warm-up
                elapsed, cpu, _ = timed(evaluate, device)
                if index:
                    seconds.append(elapsed)
                    cpu_seconds.append(cpu)
        flops = forward_flops(tokens)
        basis = median(cpu_seconds if on_cpu_time(config) else seconds)
        rows.append(Throughput(
            image_tokens=tokens, path=path, seconds=median(seconds), cpu_seconds=median(cpu_seconds),
            tflops_total=flops.total / 1e12, gflops_per_second=flops.total / basis / 1e9,
        ))
    return rows


def edge_decode_seconds(config: BenchConfig, run: FamilyRun) -> dict:
    """Median wall and CPU time of the half-size VAE decode alone (first call a warm-up)."""
    device, dtype = torch.device(config.device), torch_dtype(config.dtype)
    side = run.config.half_latent_side(config.size)
    latent = torch.randn(1, run.config.spec.latent_channels, side, side, generator=torch.Generator("cpu").manual_seed(config.seed)).to(device=device, dtype=dtype)
    latent = vae_latent(run.config, latent)
    seconds, cpu_seconds = [], []
    with torch.no_grad():
        for index in range(config.repeats + 1):
            elapsed, cpu, _ = timed(lambda: run.ralu.vae.decode(latent, return_dict=False), device)
            if index:
                seconds.append(elapsed)
                cpu_seconds.append(cpu)
    return {"seconds": median(seconds), "cpu_seconds": median(cpu_seconds)}


def on_cpu_time(config: BenchConfig) -> bool:
    """Whether speed-ups are also computed from process CPU time (CPU runs: robust to other
    processes sharing the cores; on a GPU the work is not on the CPU)."""
    return config.device == "cpu"


def _grid(tokens: int, max_side: int) -> tuple[int, int] | None:
    """The most square rows x cols = tokens with both sides <= max_side, or None."""
    for rows in range(math.isqrt(tokens), 0, -1):
        if tokens % rows == 0 and tokens // rows <= max_side:
            return rows, tokens // rows
    return None


def stage_token_counts(run: FamilyRun) -> list[int]:
    """Every token count a stage of a measured schedule runs at, and the full resolution."""
    counts = set()
    for _, schedule, _ in run.schedules:
        counts.update(stage.tokens for stage in run.ralu.plan(schedule).stages)
    return sorted(counts)


def measure_family(config: BenchConfig, run: FamilyRun) -> dict:
    """Timing (and overhead sections) of one family: warm-up, then interleaved repeats."""

    device = torch.device(config.device)
    profile_inline = device.type != "cuda"  # on CUDA sections synchronise: profile separately
    base_steps = sorted({schedule.base_steps for _, schedule, _ in run.schedules})
    progress(f"{run.config.family}: warm-up")
    for _ in base_steps:
        call_baseline(config, run, 1)
    for _, schedule, _ in run.schedules:
        call_ralu(config, run, one_step_per_stage(schedule))

    baseline = {steps: {"seconds": [], "cpu_seconds": []} for steps in base_steps}
    results = {name: {"seconds": [], "cpu_seconds": [], "profiles": []} for name, _, _ in run.schedules}
    for repeat in range(config.repeats):
        for steps in base_steps:
            elapsed, cpu, _ = timed(lambda: call_baseline(config, run, steps), device)
            baseline[steps]["seconds"].append(elapsed)
            baseline[steps]["cpu_seconds"].append(cpu)
            progress(f"{run.config.family}: repeat {repeat + 1}/{config.repeats} baseline {steps} steps {elapsed:.2f} s (CPU {cpu:.2f} s)")
        for name, schedule, _ in run.schedules:
            if profile_inline:
                with Profiler() as profiler:
                    elapsed, cpu, _ = timed(lambda: call_ralu(config, run, schedule), device)
                results[name]["profiles"].append({"total": elapsed, "sections": dict(profiler.seconds)})
            else:
                elapsed, cpu, _ = timed(lambda: call_ralu(config, run, schedule), device)
            results[name]["seconds"].append(elapsed)
            results[name]["cpu_seconds"].append(cpu)
            progress(f"{run.config.family}: repeat {repeat + 1}/{config.repeats} {name} {elapsed:.2f} s (CPU {cpu:.2f} s)")
    if not profile_inline:
        for name, schedule, _ in run.schedules:
            with Profiler.for_device(device) as profiler:
                elapsed, _, _ = timed(lambda: call_ralu(config, run, schedule), device)
            results[name]["profiles"].append({"total": elapsed, "sections": dict(profiler.seconds)})
    return {"baseline": baseline, "ralu": results}


def measure_memory(config: BenchConfig, run: FamilyRun, meter: MemoryMeter) -> dict:
    """Peak working memory of a baseline step, a half-size edge decode, and each schedule
    (one step per stage)."""
    device, dtype = torch.device(config.device), torch_dtype(config.dtype)
    side = run.config.half_latent_side(config.size)
    latent = torch.randn(1, run.config.spec.latent_channels, side, side, generator=torch.Generator("cpu").manual_seed(0)).to(device=device, dtype=dtype)
    latent = vae_latent(run.config, latent)
    working, total = {}, {}
    working["baseline"], total["baseline"] = meter.measure(lambda: call_baseline(config, run, 1))
    with torch.no_grad():
        working["edge_decode"], total["edge_decode"] = meter.measure(lambda: run.ralu.vae.decode(latent, return_dict=False))
    working["ralu"], total["ralu"] = {}, {}
    for name, schedule, _ in run.schedules:
        working["ralu"][name], total["ralu"][name] = meter.measure(lambda: call_ralu(config, run, one_step_per_stage(schedule)))
    return {**working, "total": total}


def overhead_summary(profiles: list[dict]) -> dict:
    """Itemised overhead over all profiled runs: mean seconds per image and fractions of the
    summed RALU time (so items add up exactly to the total)."""
    runs = len(profiles)
    total = sum(p["total"] for p in profiles)
    items = {}
    for name in OVERHEAD_SECTIONS:
        seconds = sum(p["sections"].get(name, 0.0) for p in profiles)
        items[name] = {"seconds": seconds / runs, "fraction": seconds / total}
    overhead = sum(item["seconds"] for item in items.values())
    transformer = sum(p["sections"].get(MODEL_SECTION, 0.0) for p in profiles) / runs
    return {
        "runs": runs,
        "total_seconds": total / runs,
        "overhead_seconds": overhead,
        "overhead_fraction": overhead * runs / total,
        "items": items,
        "transformer_seconds": transformer,
        "other_seconds": total / runs - overhead - transformer,
    }


def machine_info(config: BenchConfig) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.device(config.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(config.device))
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
