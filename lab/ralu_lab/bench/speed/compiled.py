"""The plain pipeline and RALU with a compiled transformer (``transformer.compile(backend=...)``).

Both pipelines share one transformer (``from_pipe``), so one compilation serves both.  Every
method gets an untimed warm-up call of the same shapes first (one step; RALU: one step per
stage), where dynamo compiles: one graph per token count, so a RALU call compiles a graph per
stage.  The timed calls then should compile nothing; the graphs they do compile are the row's
*recompiles* (dynamo's own ``unique_graphs`` counter before and after).  Speed-ups are against
the uncompiled plain pipeline at the same step count, and gains against the same method
uncompiled, both timed earlier in the same process.  When compilation fails on the device the
rows say why in one line.  The transformer is restored to eager mode afterwards.
"""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from ralu_lab.bench.common import median
from ralu_lab.bench.speed.config import BenchConfig
from ralu_lab.bench.speed.measure import on_cpu_time, progress, timed
from ralu_lab.bench.speed.models import FamilyRun, call_baseline, call_ralu, one_step_per_stage
from ralu_lab.bench.speed.schema import CompileRow


def graphs() -> int:
    """Graphs dynamo has compiled since its counters were cleared."""
    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    return int(sum(counters["graph_break"].values()))


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def measure_compile_rows(config: BenchConfig, run: FamilyRun, backend: str, measured: dict) -> list[CompileRow]:
    """Compiled rows of one family: the plain pipeline at each schedule's base steps, and every
    schedule.  ``measured``: :func:`.measure.measure_family`'s uncompiled timings."""
    family, transformer = run.config.family, run.base.transformer
    base_steps = sorted({schedule.base_steps for _, schedule, _ in run.schedules})
    methods = [("plain", None, [steps], (lambda s=steps: call_baseline(config, run, s)), (lambda: call_baseline(config, run, 1)))
               for steps in base_steps]
    methods += [("ralu", name, [stage.steps for stage in schedule.stages], (lambda s=schedule: call_ralu(config, run, s)),
                 (lambda s=schedule: call_ralu(config, run, one_step_per_stage(s))))
                for name, schedule, _ in run.schedules]
    rows = {index: CompileRow(family=family, method=method, schedule=name, steps=steps, backend=backend)
            for index, (method, name, steps, _, _) in enumerate(methods)}
    torch._dynamo.reset()
    counters.clear()
    times = {index: {"seconds": [], "cpu_seconds": [], "recompiles": 0} for index in rows}
    if backend == "inductor" and config.threads:
        import torch._inductor.config as inductor

        inductor.compile_threads = config.threads  # its C++ builds keep to the threads asked for
    try:
        transformer.compile(backend=backend)
        for index, (_, name, steps, _, warm) in enumerate(methods):
            progress(f"{family}: compiling ({backend}) for {name or 'plain'} {steps} (untimed warm-up)")
            before, breaks = graphs(), graph_breaks()
            try:
                elapsed, _, _ = timed(warm, config.device)
            except Exception as error:  # noqa: BLE001 - the row reports it: compile support differs by device and backend
                rows[index] = rows[index].model_copy(update={"error": one_line(error)})
                continue
            rows[index] = rows[index].model_copy(update={
                "warmup_seconds": elapsed, "graphs_compiled": graphs() - before, "graph_breaks": graph_breaks() - breaks,
            })
        for repeat in range(config.repeats):
            for index in [index for index in rows if rows[index].error is None]:
                before = graphs()
                try:
                    elapsed, cpu, _ = timed(methods[index][3], config.device)
                except Exception as error:  # noqa: BLE001 - as above
                    rows[index] = rows[index].model_copy(update={"error": one_line(error)})
                    continue
                times[index]["recompiles"] += graphs() - before
                times[index]["seconds"].append(elapsed)
                times[index]["cpu_seconds"].append(cpu)
                progress(f"{family}: compiled, repeat {repeat + 1}/{config.repeats}: {methods[index][1] or 'plain'} {elapsed:.2f} s (CPU {cpu:.2f} s)")
    except Exception as error:  # noqa: BLE001 - compile() itself refused: every row says why
        rows = {index: row.model_copy(update={"error": one_line(error)}) for index, row in rows.items()}
    finally:
        transformer._compiled_call_impl = None  # back to eager (what nn.Module.compile set)
        torch._dynamo.reset()
    cpu_basis = on_cpu_time(config)
    out = []
    for index, row in rows.items():
        if row.error is not None:
            out.append(row)
            continue
        method, name, steps = methods[index][:3]
        timing = times[index]
        wall, cpu = median(timing["seconds"]), median(timing["cpu_seconds"])
        base = measured["baseline"][steps[0] if method == "plain" else next(s.base_steps for n, s, _ in run.schedules if n == name)]
        same = base if method == "plain" else measured["ralu"][name]
        out.append(row.model_copy(update=dict(
            seconds_all=timing["seconds"], cpu_seconds_all=timing["cpu_seconds"], seconds=wall, cpu_seconds=cpu,
            wall_speedup=median(base["seconds"]) / wall, cpu_time_speedup=median(base["cpu_seconds"]) / cpu if cpu_basis else None,
            wall_gain=median(same["seconds"]) / wall, cpu_time_gain=median(same["cpu_seconds"]) / cpu if cpu_basis else None,
            recompiles=timing["recompiles"],
        )))
    return out
