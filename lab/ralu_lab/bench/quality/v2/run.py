"""``ralu-bench quality --testbed v2``: sample and measure every row, compare, write the report."""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ralu_lab.bench.common import fail, write_report
from ralu_lab.bench.quality.methods import ralu_method
from ralu_lab.bench.quality.schedules import ours_schedule
from ralu_lab.bench.quality.v2.cost import transformer_cost
from ralu_lab.bench.quality.v2.figures import SampleGrid, write_grid, write_plots
from ralu_lab.bench.quality.v2.plan import ARCH_NAMES, REAL_SEED, ArchMethod, V2Config, arch_presets, chosen_rows, heldout_rows, is_ralu, make_config, plan_arch
from ralu_lab.bench.quality.v2.replication import replication
from ralu_lab.bench.quality.v2.report import REPORT_NAME, figure_paths, render_markdown
from ralu_lab.bench.quality.v2.sampler import V2Sampler, WorkStore, file_hashes
from ralu_lab.bench.quality.v2.schema import ArchTestbed, CacheEffect, Estimate, Half, HeldoutSeeds, HeldoutSeedsRow, Intervals, Regime, RegimeMetric, Row, Sweep, SweepPoint, V2Report, Verdict
from ralu_lab.bench.quality.v2.stats import (
    CACHED_VS_PLAIN,
    HELDOUT_QUESTION,
    HELDOUT_ROW_METRICS,
    HELDOUT_VERDICT_METRICS,
    METRICS,
    REGIME_METRICS,
    SCHEDULE_METRICS,
    SCHEDULE_QUESTION,
    Measured,
    Reference,
    Statistics,
    beyond_spread,
    measure,
    measure_seeds,
    split_halves,
)
from ralu_lab.testbed.v2 import data, metrics
from ralu_lab.testbed.v2 import model as tb
from ralu_lab.testbed.v2.classifier import load_classifier
from ralu_lab.testbed.v2.conditioning import TEXT_TOKENS
from ralu_lab.testbed.v2.location import AUTOENCODER, CLASSIFIER, FLUX, SD3, describe, part_dir

PROG = "ralu-bench quality"


def weight_folders(config: V2Config) -> dict[str, Path]:
    base = Path(config.weights_dir) if config.weights_dir else None
    return {part: part_dir(part, None if base is None else base / part) for part in _parts(config)}


def weight_names(config: V2Config) -> dict[str, str]:
    """How the report names each weight folder (:func:`ralu_lab.testbed.v2.location.describe`)."""
    base = Path(config.weights_dir) if config.weights_dir else None
    return {part: describe(part, None if base is None else base / part) for part in _parts(config)}


def _parts(config: V2Config) -> list[str]:
    return [AUTOENCODER, CLASSIFIER] + [FLUX if a == "flux" else SD3 for a in config.arches]


def load_parts(config: V2Config):
    """The classifier and one pipeline per architecture (FileNotFoundError: one line with the fix)."""
    folders = weight_folders(config)
    classifier = load_classifier(folders[CLASSIFIER])
    pipes = {a: tb.load_pipeline(a, path=folders[FLUX if a == "flux" else SD3], autoencoder=folders[AUTOENCODER]) for a in config.arches}
    return folders, classifier, pipes


class ArchRun:
    """One architecture: its rows' images, costs and measurements."""

    def __init__(self, config: V2Config, arch: str, pipe, reference: Reference, stats: Statistics, weights: dict[str, str], log):
        self.config, self.arch, self.pipe, self.reference, self.stats, self.log = config, arch, pipe, reference, stats, log
        self.cost = transformer_cost(arch, pipe.transformer.config)
        # the images depend on the autoencoder and this generator only
        own = {part: weights[part] for part in (AUTOENCODER, FLUX if arch == "flux" else SD3)}
        self.sampler = V2Sampler(arch, pipe, config.batch_size, WorkStore(config.work_dir), own, self.cost)
        # every planned row (the held-out section's come from here), and those --rows keeps
        self.planned, self.schedules = plan_arch(config, arch, self.cost, log)
        self.methods = chosen_rows(config, self.planned)
        self.baselines: dict[int, torch.Tensor] = {}
        self.grid: dict[str, torch.Tensor] = {}

    def labels(self, seed: int):
        return data.balanced_labels(self.config.images, seed)

    def sample(self, method: ArchMethod, seeds) -> tuple[Measured, object, float, bool]:
        measured, costs, seconds, reused = Measured({}, {}), [], 0.0, True
        for seed in seeds:
            labels = self.labels(seed)
            t0 = time.time()
            images, cost, from_store = self.sampler.run(method, labels, seed)
            seconds += time.time() - t0
            reused &= from_store
            if method.key == "baseline":
                self.baselines[seed] = images
            measured = measured.extend(measure(images, labels, self.reference, self.baselines[seed], seed))
            costs.append(cost)
            if seed == self.config.seeds[0]:
                self.grid[f"{method.key}@{method.budget}"] = images[: self.config.grid_images]
        return measured, costs[0], seconds, reused

    def rows(self) -> tuple[list[Row], dict[str, Measured]]:
        rows, measured = [], {}
        base_cost = None
        for i, method in enumerate(self.methods):
            m, cost, seconds, reused = self.sample(method, self.config.seeds)
            if base_cost is None:
                base_cost = cost
            measured[row_id(method.key, method.budget)] = m
            estimates = {key: Estimate(**self.stats.estimate(key, m)) for key in list(m.per_seed)}
            rows.append(Row(
                arch=self.arch, method=method.key, label=method.label, budget=method.budget, cache=method.cache, uncached=method.uncached,
                flops_speedup_total=None if cost.total is None else base_cost.total / cost.total,
                flops_speedup_linear=base_cost.linear / cost.linear,
                gflops_total=None if cost.total is None else cost.total / 1e9, gflops_linear=cost.linear / 1e9,
                decoder_gflops=cost.decoder_total / 1e9, forwards=cost.forwards, decodes=cost.decodes,
                metrics=estimates, seeds=list(self.config.seeds), images_per_seed=self.config.images, seconds=round(seconds, 1), reused=reused,
                details=method.details,
            ))
            r = rows[-1]
            speed = f"{r.flops_speedup_total:5.2f}x" if r.flops_speedup_total else f"({r.flops_speedup_linear:.2f}x lin)"
            self.log(f"  [{i + 1}/{len(self.methods)}] {self.arch} {method.key:<28} {method.budget:>3}x  {speed}  {seconds:6.1f} s{' (work folder)' if reused else ''}  "
                     f"FD {r.metrics['fd'].value:8.2f}  fine {r.metrics['fine_accuracy'].value:.3f}  spectral {r.metrics['spectral_distance'].value:.3f}")
        return rows, measured

    def sweep(self, measured_baseline) -> Sweep | None:
        config = self.config
        if not config.z_values:
            return None
        budget = config.budgets[self.arch][0]
        preset_schedule = self.schedules[budget]["ours"]
        points = []
        for z in config.z_values:
            schedule = ours_schedule(budget, data.IMAGE_SIZE, tb.base_shift(self.arch), optimizer="paper" if config.quick else "global", z_bounds=(z, z),
                                     preset=arch_presets(self.arch)[budget])
            base = ralu_method("ralu-ours", budget, schedule, tb.FULL_TOKENS, False)
            method = ArchMethod(**{**base.__dict__, "arch": self.arch, "positions": "crop" if self.arch == "sd3" else None})
            m, _, seconds, _ = self.sample(method, config.sweep_seeds)
            points.append(SweepPoint(z=z, c=schedule.c, js_distance=schedule.divergence.js_distance, shifts=[s.shift for s in schedule.stages],
                                     metrics={key: Estimate(**self.stats.estimate(key, m)) for key, _, _, _ in METRICS}))
            self.log(f"  sweep {self.arch} Z = {z:6.2f}  FD {points[-1].metrics['fd'].value:8.2f}  ({seconds:.1f} s)")
        return Sweep(arch=self.arch, budget=budget, seeds=list(config.sweep_seeds), images_per_seed=config.images, global_z=preset_schedule.z, points=points)

    def heldout(self) -> tuple[list[HeldoutSeedsRow], list[Verdict]]:
        """The ``--schedule`` rows and the rows they meet (:func:`~ralu_lab.bench.quality.v2.plan.heldout_rows`)
        on the held-out seeds: estimates and paired verdicts on :data:`HELDOUT_VERDICT_METRICS`.
        The images go through the work folder like any other; no baseline is sampled, so
        PSNR/SSIM (measured against the images themselves) are left out."""
        seeds, pairs = self.config.heldout_seeds, heldout_rows(self.planned)
        if not seeds or not pairs:
            return [], []
        rows, measured = {}, {}
        for method in (m for row, others in pairs for m in (*others, row)):
            name = row_id(method.key, method.budget)
            if name in measured:
                continue
            t0 = time.time()
            measured[name] = measure_seeds(lambda labels, seed, method=method: self.sampler.run(method, labels, seed)[0], seeds, self.config.images, self.reference)
            rows[name] = HeldoutSeedsRow(arch=self.arch, method=method.key, label=method.label, budget=method.budget,
                                         metrics={key: Estimate(**self.stats.estimate(key, measured[name])) for key in HELDOUT_ROW_METRICS})
            self.log(f"  held-out {self.arch} {method.key:<28} {method.budget:>3}x  {time.time() - t0:6.1f} s  FD {rows[name].metrics['fd'].value:8.2f}  "
                     f"fine {rows[name].metrics['fine_accuracy'].value:.3f}")
        found = [verdict(self.stats, self.arch, row.budget, key, HELDOUT_QUESTION, rows[row_id(row.key, row.budget)], rows[row_id(other.key, other.budget)],
                         measured, halves=False)
                 for row, others in pairs for other in others for key in HELDOUT_VERDICT_METRICS]
        return list(rows.values()), found


def row_id(method: str, budget) -> str:
    return f"{method}@{budget}"


def best(rows: list[Row], key: str, higher: bool) -> Row:
    return sorted(rows, key=lambda r: r.metrics[key].value, reverse=higher)[0]


def verdict(stats: Statistics, arch: str, budget, key: str, question: str, a: Row, b: Row, measured: dict, halves: bool = True) -> Verdict:
    """``a`` against ``b`` on ``key`` over all seeds and, with ``halves``, on each half of the seeds (the replication check)."""
    ma, mb, names = measured[row_id(a.method, a.budget)], measured[row_id(b.method, b.budget)], (a.method, b.method)
    c = stats.compare(key, ma, mb, names)
    found = [Half(seeds=seeds, difference=h.difference, low=h.low, high=h.high, verdict=h.verdict) for seeds, h in stats.compare_halves(key, ma, mb, names)] if halves else []
    return Verdict(arch=arch, budget=budget, metric=key, question=question, a=a.method, b=b.method, a_value=a.metrics[key].value, b_value=b.metrics[key].value,
                   difference=c.difference, low=c.low, high=c.high, verdict=c.verdict, halves=found)


def staged(row: Row) -> bool:
    """A RALU row of two or more stages; a one-stage ``--schedule`` row is the plain sampler
    (what the quality search writes when it wins), not RALU."""
    return is_ralu(row.method) and len(row.details.get("steps", [])) > 1


def verdicts(stats: Statistics, arch: str, rows: list[Row], measured: dict) -> list[Verdict]:
    """Per budget and metric: the best RALU row against the best non-RALU row and against the
    plain pipeline with fewer steps; every ``--schedule`` row against every other row of its
    budget (:data:`SCHEDULE_METRICS`)."""
    out = []
    for budget in sorted({r.budget for r in rows if r.method != "baseline"}):
        group = [r for r in rows if r.budget == budget and r.cache is None]
        ralu = [r for r in group if staged(r)]
        peers = [r for r in group if not staged(r)]
        steps = next((r for r in peers if r.method == "base-steps"), None)
        for key, _, higher, _ in METRICS if ralu and steps is not None else ():
            a = best(ralu, key, higher)
            out.append(verdict(stats, arch, budget, key, "best RALU row vs best non-RALU row", a, best(peers, key, higher), measured))
            out.append(verdict(stats, arch, budget, key, "best RALU row vs base model with fewer steps", a, steps, measured))
        for row in (r for r in group if r.method.startswith("schedule:")):
            for other in (r for r in group if r is not row):
                out += [verdict(stats, arch, budget, key, SCHEDULE_QUESTION, row, other, measured) for key in SCHEDULE_METRICS]
    return out


def regime(stats: Statistics, arch: str, rows: list[Row], measured: dict) -> tuple[Regime, list[Verdict]]:
    """The baseline against the plain pipeline with fewer steps at the largest budget, and its verdicts (for the replication check)."""
    budget = max(r.budget for r in rows if r.method == "base-steps")
    baseline = next(r for r in rows if r.method == "baseline")
    fewer = next(r for r in rows if r.method == "base-steps" and r.budget == budget)
    out, made = [], []
    for key in REGIME_METRICS:
        v = verdict(stats, arch, budget, key, "regime", fewer, baseline, measured)
        made.append(v)
        spread, beyond = beyond_spread(fewer.metrics[key].per_seed, baseline.metrics[key].per_seed)
        worse = v.verdict == "baseline better"
        out.append(RegimeMetric(metric=key, baseline=baseline.metrics[key].value, fewer_steps=fewer.metrics[key].value, difference=v.difference, low=v.low, high=v.high,
                                verdict=v.verdict, seed_spread=spread, beyond_spread=beyond, worse=worse and beyond, halves=v.halves))
    return Regime(arch=arch, budget=budget, baseline_steps=baseline.details["steps"][0], fewer_steps=fewer.details["steps"][0], metrics=out,
                  passed=any(m.worse for m in out)), made


def cache_effects(stats: Statistics, arch: str, rows: list[Row], measured: dict) -> list[CacheEffect]:
    out = []
    for row in rows:
        if row.cache is None:
            continue
        plain = next(r for r in rows if r.method == row.uncached and r.budget == row.budget)
        found = [verdict(stats, arch, row.budget, key, f"{row.cache} cache vs uncached", row, plain, measured) for key, _, _, _ in METRICS]
        fewer = next((r for r in rows if r.method == "base-steps" and r.budget == row.budget and r.cache is None), None)
        against = [] if fewer is None or row.uncached == "base-steps" else [
            verdict(stats, arch, row.budget, key, CACHED_VS_PLAIN, row, fewer, measured) for key in SCHEDULE_METRICS]
        out.append(CacheEffect(arch=arch, budget=row.budget, method=plain.method, cache=row.cache, speedup_uncached=plain.flops_speedup_linear,
                               speedup_cached=row.flops_speedup_linear, gain=row.flops_speedup_linear / plain.flops_speedup_linear, verdicts=found,
                               plain_speedup=None if fewer is None else fewer.flops_speedup_linear, against_plain=against))
    return out


def arch_testbed(run: ArchRun, rows: list[Row]) -> ArchTestbed:
    arch, decoder = run.arch, run.sampler.decoder_cost
    base = rows[0]
    tokens = sorted({tb.FULL_TOKENS, tb.FULL_TOKENS // 4, *run.cost._cache})
    return ArchTestbed(
        arch=arch, pipeline=type(run.pipe).__name__, base_steps=tb.BASE_STEPS[arch], h0=tb.base_shift(arch), guidance_scale=tb.GUIDANCE_SCALE[arch],
        guidance_branches=round(base.forwards / tb.BASE_STEPS[arch]), full_tokens=tb.FULL_TOKENS, half_tokens=tb.FULL_TOKENS // 4, text_tokens=TEXT_TOKENS,
        forward_gflops={str(n): {"total": run.cost.forward(n).total / 1e9, "linear": run.cost.forward(n).linear / 1e9} for n in tokens},
        decode_gflops={f"{s * tb.VAE_SCALE_FACTOR} px": {"total": decoder.decode(s).total / 1e9, "linear": decoder.decode(s).linear / 1e9} for s in (tb.LATENT_SIZE, tb.LATENT_SIZE // 2)},
        baseline_gflops_total=base.gflops_total, baseline_gflops_linear=base.gflops_linear, budgets=list(run.config.budgets[arch]), staged_peers=arch == "flux",
    )


def planned_flops(run: ArchRun):
    """A row's planned transformer FLOPs per image (both guidance branches)."""
    branches = tb.GUIDANCE_BRANCHES[run.arch]
    return lambda method: branches * run.cost.of(method.forwards).total


def estimate_minutes(runs: list[ArchRun], config: V2Config, probe_images: int = 4) -> float:
    """Minutes of sampling for the whole run: per architecture, the seconds per planned FLOP
    of a short plain call and of a short RALU call (RALU's token gathering and SD3's token path
    cost more per FLOP), times every row's planned FLOPs (cache rows counted uncached: an upper
    bound), the held-out section's rows included.  Images already in the work folder and the statistics are not counted."""
    total = 0.0
    for run in runs:
        labels = data.balanced_labels(probe_images, 0)
        flops = planned_flops(run)
        rate = {}
        probe = next((m for m in run.methods if m.kind == "ralu"), None)
        plain = ArchMethod("probe", 1, "probe", "pipeline", steps=2, forwards=[tb.FULL_TOKENS] * 2, arch=run.arch)
        for kind, method in (("pipeline", plain), ("ralu", probe)) if probe else (("pipeline", plain),):
            t0 = time.time()
            run.sampler._generate(method, labels, 0)
            rate[kind] = (time.time() - t0) / (probe_images * flops(method))
        per_image = sum(rate.get("ralu" if m.kind == "ralu" else "pipeline", rate["pipeline"]) * flops(m) for m in run.methods) * len(config.seeds)
        # the held-out section: each --schedule row and the rows it meets, once each
        heldout = {row_id(m.key, m.budget): m for row, others in heldout_rows(run.planned) for m in (row, *others)}
        per_image += sum(rate.get("ralu" if m.kind == "ralu" else "pipeline", rate["pipeline"]) * flops(m) for m in heldout.values()) * len(config.heldout_seeds)
        sweep_rows = [m for m in run.methods if m.key.startswith("ralu-ours") and m.cache is None and m.budget == config.budgets[run.arch][0]][:1]
        per_image += len(config.z_values) * len(config.sweep_seeds) * sum(rate.get("ralu", rate["pipeline"]) * flops(m) for m in sweep_rows)
        total += per_image * config.images / 60.0
    return total


def real_reference(classifier, n: int) -> Reference:
    """The real scenes every row is measured against: ``n`` of them, balanced labels, seed ``REAL_SEED``."""
    real, _ = data.make_batch(REAL_SEED, n, labels=data.balanced_labels(n, REAL_SEED))
    return Reference(classifier, real)


def run_benchmark(config: V2Config, command: str, log=print) -> tuple[V2Report, dict[str, SampleGrid]]:
    started = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    folders, classifier, pipes = load_parts(config)
    weights = file_hashes(folders)
    reference = real_reference(classifier, config.real_images)
    stats = Statistics(reference, config.resamples, config.set_resamples)
    log(f"{PROG} --testbed v2: {', '.join(ARCH_NAMES[a] for a in config.arches)}, {len(config.seeds)} seed(s) x {config.images} images, budgets {config.budgets}")
    runs = [ArchRun(config, a, pipes[a], reference, stats, weights, log) for a in config.arches]
    log(f"estimated run time: about {estimate_minutes(runs, config):.0f} min on {torch.get_num_threads()} thread(s) (images already in {config.work_dir} are reused)")
    rows, all_verdicts, regimes, caches, sweeps, grids, testbeds, real_rows = [], [], {}, [], [], {}, {}, {}
    regime_verdicts, heldout_found, heldout_verdicts = [], [], []
    for run in runs:
        arch_rows, measured = run.rows()
        rows += arch_rows
        all_verdicts += verdicts(stats, run.arch, arch_rows, measured)
        regimes[run.arch], made = regime(stats, run.arch, arch_rows, measured)
        regime_verdicts += made
        caches += cache_effects(stats, run.arch, arch_rows, measured)
        sweep = run.sweep(measured)
        if sweep:
            sweeps.append(sweep)
        testbeds[run.arch] = arch_testbed(run, arch_rows)
        real_m = Measured({}, {})
        for seed in config.seeds:
            labels = run.labels(seed)
            scenes, _ = data.make_batch(REAL_SEED + 1 + seed, 0, labels=labels)
            real_m = real_m.extend(measure(scenes, labels, reference, run.baselines[seed], seed))
            if seed == config.seeds[0]:
                real_grid = scenes[: config.grid_images]
        if not real_rows:
            real_rows = {key: Estimate(**stats.estimate(key, real_m)) for key in ("fd", "spectral_distance", "fine_accuracy", "accuracy", "blocking")}
        order = [("real", 1, "real scenes, same labels")] + [(m.key, m.budget, m.label) for m in run.methods]
        grids[run.arch] = SampleGrid(order=order, images=[real_grid] + [run.grid[f"{m.key}@{m.budget}"] for m in run.methods])
        log(f"  {run.arch} regime check at {regimes[run.arch].budget}x: {'passed' if regimes[run.arch].passed else 'NOT passed'}")
        found, made = run.heldout()
        heldout_found += found
        heldout_verdicts += made
    seeds = len(config.seeds)
    intervals = Intervals(unit="seeds" if seeds > 1 else "images", seeds=seeds, widening=metrics.few_clusters_scale(seeds, 0.95) if seeds > 1 else None,
                          resamples=config.resamples, set_resamples=config.set_resamples)
    halves = split_halves(config.seeds)
    # every verdict the report makes: the questions, the regime check, the caches
    made = all_verdicts + regime_verdicts + [v for c in caches for v in (*c.verdicts, *c.against_plain)]
    replicated = replication(made, halves, "seeds" if min(map(len, halves)) > 1 else "images (a half of one seed)") if seeds > 1 else None
    heldout = HeldoutSeeds(seeds=list(config.heldout_seeds), images_per_seed=config.images, unit="seeds" if len(config.heldout_seeds) > 1 else "images",
                           rows=heldout_found, verdicts=heldout_verdicts) if heldout_found else None
    report = V2Report(
        command=command, created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(), wall_seconds=round(time.time() - started, 1),
        config=json.loads(json.dumps({**asdict(config), "threads_used": torch.get_num_threads()})),  # as the JSON reads back (lists, not tuples)
        weights={"folders": weight_names(config), "sha256": weights},
        testbed=testbeds, reference=real_rows, rows=rows, verdicts=all_verdicts, regime=regimes, caches=caches, sweeps=sweeps,
        intervals=intervals, replication=replicated, heldout=heldout,
    )
    return report, grids


def write_reports(report: V2Report, grids: dict[str, SampleGrid], out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    figures = figure_paths(report)
    for arch, grid in grids.items():
        write_grid(grid, out_dir / figures.grids[arch])
    write_plots(report, out_dir, figures)
    return write_report(out_dir, REPORT_NAME, render_markdown(report, figures), report.model_dump(mode="json"))


def run_v2_from_args(args) -> int:
    try:
        config = make_config(args)
    except ValueError as error:
        return fail(PROG, error)
    command = getattr(args, "command_line", PROG)
    try:
        report, grids = run_benchmark(config, command)
    except FileNotFoundError as error:
        return fail(PROG, str(error).splitlines()[0])
    md, js = write_reports(report, grids, args.out_dir)
    print(f"wrote {md} and {js}")
    return 0
