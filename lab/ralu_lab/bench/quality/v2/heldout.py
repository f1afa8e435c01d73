"""Schedule files against chosen rows of ``ralu-bench quality`` on held-out seeds.

    python -m ralu_lab.bench.quality.v2.heldout --budget 4 --schedule A.json --schedule B.json \\
        --rows base-steps bottleneck ralu-paper --out reports/experiments/quality-search-v2/budget-filling/heldout-4x

What a search's pick needs before it is trusted, at a fraction of the full table's cost: the
same labels, per-image noise, real reference, metrics and paired bootstrap as the harness
(:mod:`ralu_lab.bench.quality.v2.run`), the rows planned exactly as it plans them, and
the images kept in its work folder (a later full run reuses them).  Only the asked rows are
sampled: no 50-step baseline, so no PSNR/SSIM.  Every schedule meets every other row on
:data:`~ralu_lab.bench.quality.v2.stats.SCHEDULE_METRICS`.  Intervals and verdicts resample
seeds, as the harness's do (one seed: images); the default seeds are the harness's held-out
seeds (:data:`~ralu_lab.bench.quality.v2.plan.HELDOUT_SEEDS`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from ralu_lab.bench.common import fail, write_report
from ralu_lab.bench.quality.config import check_row_names
from ralu_lab.bench.quality.v2.cost import transformer_cost
from ralu_lab.bench.quality.v2.plan import CACHE_KINDS, DEFAULT_IMAGES, HELDOUT_SEEDS, PEER_KEYS, RALU_KEYS, WORK_DIR_NAME, V2Config, arch_presets, plan_arch, schedule_arch
from ralu_lab.bench.quality.v2.report import DIGITS, beaters, interval, verdict_cell
from ralu_lab.bench.quality.v2.run import load_parts, real_reference
from ralu_lab.bench.quality.v2.sampler import V2Sampler, WorkStore, file_hashes
from ralu_lab.bench.quality.v2.schema import Estimate, Verdict
from ralu_lab.bench.quality.v2.stats import METRICS, SCHEDULE_METRICS, SCHEDULE_QUESTION, Reference, Statistics, measure_seeds
from ralu_lab.testbed.v2.location import AUTOENCODER, FLUX

PROG = "python -m ralu_lab.bench.quality.v2.heldout"
ROW_KEYS = PEER_KEYS + RALU_KEYS
LABELS = {key: label for key, label, _, _ in METRICS}


class HeldoutRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    label: str
    describe: str
    #: None for a cache row: the token log cannot say what a cache skipped (only executed linear FLOPs are measured)
    gflops_total: float | None
    gflops_linear: float
    metrics: dict[str, Estimate]


class HeldoutReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str
    created: str
    budget: int
    seeds: list[int]
    images_per_seed: int
    threads: int
    rows: list[HeldoutRow]
    verdicts: list[Verdict]
    #: what the intervals resample: "seeds" or "images" (one seed); None in reports made before they resampled seeds (images)
    intervals: str | None = None


@dataclass
class Prepared:
    """What a held-out comparison samples with: the harness's configuration, real reference,
    statistics and sampler, and the chosen rows planned as the harness plans them."""

    config: V2Config
    reference: Reference
    stats: Statistics
    sampler: V2Sampler
    chosen: list

    def measure(self, method, noise_offset: int = 0):
        """``method``'s images over the seeds (labels of each seed, noise of seed + ``noise_offset``),
        measured and pooled (no baseline: PSNR/SSIM are not reported), and its per-image cost."""
        costs = []

        def sample(labels, seed):
            images, cost, _ = self.sampler.run(method, labels, seed + noise_offset)
            costs.append(cost)  # per image, the same for every seed
            return images

        return measure_seeds(sample, self.config.seeds, self.config.images, self.reference), costs[0]


def row_fields(method, cost) -> dict:
    """A measured row's name, label, definition and per-image GFLOPs, as :class:`HeldoutRow`
    (and the rows extending it) declare them; a cache row has no total (``cost.total`` None)."""
    return dict(method=method.key, label=method.label, describe=method.details.get("describe", ""),
                gflops_total=None if cost.total is None else cost.total / 1e9, gflops_linear=cost.linear / 1e9)


def prepare(args, baseline: bool = False) -> Prepared:
    """The harness's parts for ``args`` (budget, schedule, rows, seeds, images, caches, ...): the
    rows of ``args.rows`` at ``args.budget`` (with ``args.caches``, also their step-cache rows),
    every schedule file, and the 50-step baseline first when ``baseline``."""
    torch.set_num_threads(args.threads)
    config = V2Config(arches=("flux",), seeds=tuple(args.seeds), images=args.images, budgets={"flux": (args.budget,)}, schedules=tuple(args.schedule),
                      caches=args.caches, z_values=(), weights_dir=args.weights_dir, work_dir=str(args.work_dir), batch_size=min(args.batch_size, args.images),
                      real_images=args.real_images, trials=args.trials)
    folders, classifier, pipes = load_parts(config)
    weights = file_hashes(folders)
    reference = real_reference(classifier, config.real_images)
    stats = Statistics(reference, config.resamples, config.set_resamples)
    pipe = pipes["flux"]
    cost = transformer_cost("flux", pipe.transformer.config)
    sampler = V2Sampler("flux", pipe, config.batch_size, WorkStore(config.work_dir), {p: weights[p] for p in (AUTOENCODER, FLUX)}, cost)
    methods, _ = plan_arch(config, "flux", cost, log=lambda message: None)
    # a cache row comes with its uncached row (the harness plans them only when config.caches)
    wanted = set(args.rows) | {m.key for m in methods if m.uncached in args.rows}
    chosen = [m for m in methods if (baseline and m.key == "baseline") or (m.budget == args.budget and (m.key in wanted or m.key.startswith("schedule:")))]
    return Prepared(config, reference, stats, sampler, chosen)


def run(args, log=print) -> HeldoutReport:
    prepared = prepare(args)
    stats, chosen = prepared.stats, prepared.chosen
    rows, measured = [], {}
    for i, method in enumerate(chosen):
        t0 = time.process_time()
        m, run_cost = prepared.measure(method)
        measured[method.key] = m
        rows.append(HeldoutRow(**row_fields(method, run_cost), metrics={k: Estimate(**stats.estimate(k, m)) for k in SCHEDULE_METRICS}))
        log(f"[{i + 1}/{len(chosen)}] {method.key:<40} FD {rows[-1].metrics['fd'].value:8.1f}  fine {rows[-1].metrics['fine_accuracy'].value:.3f}  "
            f"({time.process_time() - t0:.0f} s CPU)")
    by_key = {r.method: r for r in rows}
    found = []
    for a in (r for r in rows if r.method.startswith("schedule:")):
        for b in (r for r in rows if r is not a):
            for key in SCHEDULE_METRICS:
                c = stats.compare(key, measured[a.method], measured[b.method], (a.method, b.method))
                found.append(Verdict(arch="flux", budget=args.budget, metric=key, question=SCHEDULE_QUESTION, a=a.method, b=b.method,
                                     a_value=by_key[a.method].metrics[key].value, b_value=by_key[b.method].metrics[key].value,
                                     difference=c.difference, low=c.low, high=c.high, verdict=c.verdict))
    return HeldoutReport(command=f"{PROG} {shlex.join(args.argv)}".strip(), created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                         budget=args.budget, seeds=list(prepared.config.seeds), images_per_seed=prepared.config.images, threads=torch.get_num_threads(), rows=rows, verdicts=found,
                         intervals=intervals_unit(prepared.config.seeds))


def intervals_unit(seeds) -> str:
    """What the intervals of a run on ``seeds`` resample (the harness's statistics: seeds, or images with one seed)."""
    return "seeds" if len(set(seeds)) > 1 else "images"


def interval_legend(report: HeldoutReport, spread: bool = False) -> str:
    """The legend of the tables' ``value [interval]`` (``spread``: with the spread over seeds);
    reports made before the intervals resampled seeds say "over images"."""
    inside = {None: "95 % bootstrap interval over images", "seeds": "95 % interval, a pairs cluster bootstrap over the seeds",
              "images": "95 % bootstrap interval over the images of one seed"}[report.intervals]
    return f"`value [{inside}]{' ±spread over seeds' if spread else ''}`"


def gflops_cell(row: HeldoutRow) -> str:
    """A row's total GFLOPs per image; a cache row's executed linear GFLOPs, marked (its total is unknown)."""
    return f"{row.gflops_total:.2f}" if row.gflops_total is not None else f"{row.gflops_linear:.2f} linear"


def render_markdown(report: HeldoutReport) -> str:
    lines = [
        f"# Schedules on held-out seeds (testbed v2, FLUX {report.budget}x)",
        "",
        f"Regenerate: `{report.command}`.",
        "",
        f"Seeds {report.seeds}, {report.images_per_seed} images each: the labels, per-image noise, real reference, metrics and paired bootstrap "
        "of [`ralu-bench quality`](../../../quality.md), its rows planned as it plans them; only these rows are sampled (no 50-step baseline).  "
        f"{interval_legend(report)}; verdicts at 95 %.",
        "",
        "| row | GFLOPs per image (total) | definition | " + " | ".join(LABELS[k] for k in SCHEDULE_METRICS) + " |",
        "|---|---|---|" + "---|" * len(SCHEDULE_METRICS),
    ]
    for r in report.rows:
        lines.append(f"| {r.method} | {gflops_cell(r)} | {r.describe} | " + " | ".join(interval(r.metrics[k], DIGITS[k]) for k in SCHEDULE_METRICS) + " |")
    for name in dict.fromkeys(v.a for v in report.verdicts):
        mine = [v for v in report.verdicts if v.a == name]
        beaten = sorted({v.b for v in mine if v.verdict == f"{v.b} better"})
        said = f"**beaten by {beaters(beaten, report.rows, name)}**" if beaten else "**no row beats it on any of these metrics at 95 %**"
        lines += ["", f"`{name}`: {said}.", "",
                  "| other row | " + " | ".join(f"{LABELS[k]}: schedule - other" for k in SCHEDULE_METRICS) + " |",
                  "|---|" + "---|" * len(SCHEDULE_METRICS)]
        cells = {(v.b, v.metric): verdict_cell(v) for v in mine}
        for other in dict.fromkeys(v.b for v in mine):
            lines.append(f"| {other} | " + " | ".join(cells[(other, k)] for k in SCHEDULE_METRICS) + " |")
    return "\n".join(lines) + "\n"


def build_parser(prog: str, description: str, default_rows: Sequence[str]) -> argparse.ArgumentParser:
    """The options of a held-out comparison (this module's and the spectrum report's)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--budget", type=int, choices=sorted(arch_presets("flux")), required=True)
    parser.add_argument("--schedule", action="append", default=[], metavar="FILE", help="a FLUX schedule file (or shipped name); repeatable")
    parser.add_argument("--rows", nargs="*", default=list(default_rows), choices=ROW_KEYS, help=f"harness rows to meet (default {' '.join(default_rows)})")
    parser.add_argument("--caches", action="store_true",
                        help="also each chosen row's step-cache rows, planned as the harness plans them (FLUX: ralu-ours and base-steps with "
                             f"{', '.join(CACHE_KINDS['flux'])})")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(HELDOUT_SEEDS),
                        help=f"held-out seeds (default {HELDOUT_SEEDS[0]} ... {HELDOUT_SEEDS[-1]}, the harness's --heldout-seeds)")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help=f"images per seed (default {DEFAULT_IMAGES})")
    parser.add_argument("--real-images", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=80, help="layout-search trials of the ralu-searched row (default 80, the harness's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights-dir", help="folder holding autoencoder/ classifier/ flux/ (default: testbed v2's weights lookup)")
    parser.add_argument("--work-dir", type=Path, default=Path("reports") / WORK_DIR_NAME, help="the harness's work folder (default reports/.quality-v2-work)")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    return parser


def check_args(args) -> None:
    """One-line ``ValueError`` for options that cannot make a comparison."""
    if args.images < 2 or args.real_images < 2:
        raise ValueError("--images and --real-images must be at least 2 (a Frechet distance needs a covariance)")
    check_row_names(args.schedule)
    for path in args.schedule:
        if schedule_arch(path) != "flux":
            raise ValueError(f"--schedule {path} drives SD3. Fix: give FLUX schedules (this comparison runs the FLUX generator)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(PROG, "schedule files against chosen rows of ralu-bench quality (testbed v2, FLUX) on held-out seeds", ("base-steps", "bottleneck", "ralu-paper"))
    args = parser.parse_args(argv)
    args.argv = argv
    if not args.schedule:
        parser.error("give at least one --schedule FILE: the held-out check compares schedule files with the harness's rows")
    try:
        check_args(args)
        report = run(args)
    except (FileNotFoundError, ValueError) as error:
        return fail(PROG, error)
    md, _ = write_report(args.out.parent, args.out.name, render_markdown(report), report.model_dump(mode="json"))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
