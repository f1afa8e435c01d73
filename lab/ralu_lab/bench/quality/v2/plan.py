"""What a v2 run does: its configuration, and every row per architecture and budget.

Budgets are the published presets of each architecture (:data:`ralu.calibrate.presets.PRESETS`:
FLUX 4x and 7x, SD3 2x and 3x); baseline steps are the testbed's
(:data:`ralu_lab.testbed.v2.model.BASE_STEPS`); schedules are calibrated at the
testbed's base shift (:func:`ralu_lab.testbed.v2.model.base_shift`) and moved to 64 px.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ralu.calibrate.presets import PRESETS, PublishedPreset
from ralu.runtime.sd3 import POSITION_MODES
from ralu_lab.bench.quality.config import DEFAULT_Z_VALUES, METHOD_LABELS, QUICK_Z_VALUES, schedule_row_name, shared_overrides
from ralu_lab.bench.quality.cost import TestbedCost
from ralu_lab.bench.quality.methods import Method, bottleneck_method, closest, naive_method, ralu_forwards, ralu_method
from ralu_lab.bench.quality.schedules import ours_schedule, paper_schedule, searched_schedule
from ralu_lab.testbed.v2 import data
from ralu_lab.testbed.v2 import model as tb

#: The report's name (``quality.md``, ``quality.json``, figures under ``quality/``).
REPORT_NAME = "quality"
#: Default work folder under ``--out-dir``: generated batches, kept so a run resumes.
WORK_DIR_NAME = ".quality-v2-work"
#: The published presets' model per testbed architecture.
ARCH_MODELS = {"flux": "flux-dev", "sd3": "sd3-medium"}
ARCH_NAMES = {"flux": "FLUX", "sd3": "SD3"}
#: Generator seed of the real reference scenes (disjoint from the sample seeds).
REAL_SEED = 1_000_000_033
#: Seeds of the MagCache ratio measurement: other labels and noise than any sample seed.
MAG_SEED_OFFSET = 500_000
#: Cache kinds per architecture (ralu.runtime.cache: FirstBlockCache does not run on SD3) and
#: which rows they apply to.  MagCache needs ratios of the sampler's own step grid, measured
#: per RALU stage (ralu.calibrate.magcache); the plain pipeline's would need a separate table.
CACHE_KINDS = {"flux": ("first_block", "taylorseer", "magcache"), "sd3": ("taylorseer", "magcache")}
CACHED_METHODS = {"first_block": ("ralu-ours", "base-steps"), "taylorseer": ("ralu-ours", "base-steps"), "magcache": ("ralu-ours", "base-steps")}
#: SD3's plain pipeline opens no cache context, which diffusers' cache hooks need: SD3 caches run on RALU rows only.
PLAIN_PIPELINE_CACHES = {"flux": True, "sd3": False}
RALU_KEYS = ("ralu-paper", "ralu-ours", "ralu-searched")
#: The default sample seeds: 16 seeds of 32 images.  Images that share a seed are not
#: independent for every row (``paper_compat``'s one noise draw per seed), so intervals resample
#: seeds (docs/testbed-v2.md §5), and many small seeds give narrower honest intervals than two
#: large ones.  Seeds 0 and 1 (the earlier reports) and 100 (the quality search) were used to
#: choose schedules and objectives; these were not.
DEFAULT_SEEDS = tuple(range(10, 26))
DEFAULT_IMAGES = 32
#: Held-out seeds (``--heldout-seeds``): the ``--schedule`` rows meet the plain pipeline with fewer
#: steps, Bottleneck Sampling and the published preset on seeds that choose nothing, reported
#: last.  Eight seeds, not two: the intervals resample seeds, and two clusters give no honest interval.
HELDOUT_SEEDS = tuple(range(900, 908))
#: The rows a ``--schedule`` row meets on the held-out seeds, at its budget, per architecture.
HELDOUT_ROWS = {"flux": ("base-steps", "bottleneck", "ralu-paper"), "sd3": ("base-steps", "ralu-paper-crop")}
PEER_KEYS = ("base-steps", "bottleneck", "naive-upsample")


def arch_presets(arch: str) -> dict[int, PublishedPreset]:
    """The published presets of ``arch`` by budget."""
    return {int(p.target): p for p in PRESETS if p.model == ARCH_MODELS[tb.check_arch(arch)]}


def preset_schedule(arch: str, budget: int):
    """The published preset of ``arch`` at ``budget`` at the testbed's size (the ``ralu-paper`` row's schedule)."""
    return paper_schedule(budget, data.IMAGE_SIZE, preset=arch_presets(arch)[budget], base_steps=tb.BASE_STEPS[tb.check_arch(arch)])


def generator_speedup(arch: str, cost: TestbedCost, forwards: list[int]) -> float:
    """Transformer-FLOPs speed-up of ``forwards`` (image tokens per forward) over the base
    model's steps on ``arch``'s generator: what prices a budget's rows and a file's row."""
    return cost.of([tb.FULL_TOKENS] * tb.BASE_STEPS[arch]).total / cost.of(forwards).total


@dataclass
class V2Config:
    quick: bool = False
    arches: tuple[str, ...] = tb.ARCHITECTURES
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    images: int = DEFAULT_IMAGES
    #: every published preset: FLUX 4x, 5x and 7x, SD3 2x and 3x
    budgets: dict[str, tuple[int, ...]] = field(default_factory=lambda: {a: tuple(sorted(arch_presets(a))) for a in tb.ARCHITECTURES})
    #: planned rows to keep (None: all); the baseline and ``--schedule`` rows always run
    rows: tuple[str, ...] | None = None
    #: seeds of the held-out section (empty: none)
    heldout_seeds: tuple[int, ...] = HELDOUT_SEEDS
    schedules: tuple[str, ...] = ()
    z_values: tuple[float, ...] = DEFAULT_Z_VALUES
    sweep_seeds: tuple[int, ...] = (0,)
    trials: int = 80
    real_images: int = 1000
    grid_images: int = 8
    batch_size: int = 64
    threads: int | None = 2
    weights_dir: str | None = None
    work_dir: str = ""
    caches: bool = True
    #: bootstrap resamples: per-image means, set metrics (FD, spectral distance)
    resamples: int = 2000
    set_resamples: int = 200


def make_config(args) -> V2Config:
    """The run's configuration from the command line (ValueError: one line naming the fix)."""
    if args.quick:
        # two seeds: intervals over two clusters, replication halves of one seed each (the image fallback)
        config = V2Config(quick=True, seeds=(0, 1), images=4, heldout_seeds=(900, 901), z_values=QUICK_Z_VALUES, trials=40, real_images=48, grid_images=3,
                          batch_size=4, threads=None, resamples=60, set_resamples=12)
    else:
        config = V2Config()
    arches = tuple(dict.fromkeys(args.arch)) if args.arch else config.arches
    budgets = {a: config.budgets[a] for a in arches}
    if args.budgets:
        for b in args.budgets:
            if not any(b in arch_presets(a) for a in arches):
                raise ValueError(f"--budgets {b}: v2 budgets are named after the published presets ({', '.join(f'{ARCH_NAMES[a]} {sorted(arch_presets(a))}' for a in arches)})")
        budgets = {a: tuple(b for b in sorted(set(args.budgets)) if b in arch_presets(a)) for a in arches}
        arches = tuple(a for a in arches if budgets[a])
        budgets = {a: budgets[a] for a in arches}
    overrides = {**shared_overrides(args), "weights_dir": str(args.weights_dir) if args.weights_dir else None,
                 "rows": tuple(dict.fromkeys(args.rows)) if getattr(args, "rows", None) else None,
                 "caches": False if getattr(args, "no_caches", False) else None,
                 "heldout_seeds": None if getattr(args, "heldout_seeds", None) is None else tuple(dict.fromkeys(args.heldout_seeds))}
    config = replace(config, arches=arches, budgets=budgets, **{k: v for k, v in overrides.items() if v is not None})
    if config.images < 2 or config.real_images < 2:
        raise ValueError("--images and --real-images must be at least 2 (Frechet distances and bootstraps need two images)")
    shared = sorted(set(config.seeds) & set(config.heldout_seeds))
    if shared:
        raise ValueError(f"--heldout-seeds {' '.join(map(str, shared))} are also sample seeds. Fix: hold out seeds the table does not use")
    for path in config.schedules:
        schedule_arch(path)
    if config.rows is not None:
        known = planned_row_names(config)
        unknown = [r for r in config.rows if r not in known]
        if unknown:
            raise ValueError(f"--rows {' '.join(unknown)}: no such planned row. Fix: choose from {' '.join(sorted(known))}")
    # the sweep's seeds: the first (its images are as many as a row's per seed) unless asked
    sweep_seeds = config.seeds[: max(1, args.sweep_seeds or 1)]
    work = args.work_dir if args.work_dir is not None else Path(args.out_dir) / WORK_DIR_NAME
    return replace(config, sweep_seeds=sweep_seeds, work_dir=str(work), batch_size=min(config.batch_size, config.images))


def planned_row_names(config: V2Config) -> set[str]:
    """The row names ``--rows`` may keep for the configured architectures (baseline and ``--schedule`` rows always run)."""
    names = set()
    for arch in config.arches:
        names |= {"base-steps", *(PEER_KEYS if arch == "flux" else ())}
        names |= {k if arch == "flux" else f"{k}-{p}" for k in RALU_KEYS for p in (POSITION_MODES if arch == "sd3" else ("",))}
        if config.caches:
            names |= {f"{m if arch == 'flux' or m == 'base-steps' else m + '-crop'}+{kind}" for kind in CACHE_KINDS[arch] for m in CACHED_METHODS[kind]}
    return names


def schedule_arch(path: str) -> str:
    """The architecture a ``--schedule`` drives (its model family), checked by moving it to 64 px."""
    try:
        schedule = tb.testbed_schedule(path)
    except ValueError as error:
        raise ValueError(f"--schedule {path}: {error}") from None
    return schedule.family


@dataclass
class ArchMethod(Method):
    """A row of the v2 table: a :class:`~ralu_lab.bench.quality.methods.Method` plus its architecture, SD3's low-res positions and a step cache."""

    arch: str = "flux"
    positions: str | None = None
    cache: str | None = None
    #: the uncached row a cache row is compared with
    uncached: str | None = None


def _as_arch(method: Method, arch: str, **extra) -> ArchMethod:
    return ArchMethod(**{**method.__dict__, "arch": arch, **extra})


def plan_arch(config: V2Config, arch: str, cost: TestbedCost, log=print) -> tuple[list[ArchMethod], dict]:
    """Every row of ``arch``: the baseline, then per budget the plain pipeline with fewer steps,
    FLUX's staged peers, the RALU rows (SD3: crop and stretch), their cache rows; then
    ``--schedule`` rows of this architecture.  Also the schedules by budget (for the sweep).
    ``--rows`` is applied by :func:`chosen_rows` (the held-out section needs rows it may leave out)."""
    size = data.IMAGE_SIZE
    full, half = tb.FULL_TOKENS, tb.FULL_TOKENS // 4
    h0, base = tb.base_shift(arch), tb.BASE_STEPS[arch]
    pipeline_name = "FluxPipeline" if arch == "flux" else "StableDiffusion3Pipeline (classifier-free guidance)"
    label = {**METHOD_LABELS, "baseline": f"baseline ({base} steps)"}
    methods = [ArchMethod("baseline", 1, label["baseline"], "pipeline", steps=base, forwards=[full] * base, arch=arch,
                          details={"steps": [base], "describe": f"plain {pipeline_name}, {base} steps, shift h0 = {h0:.4f}"})]
    schedules: dict[int, dict] = {}
    optimizer = "paper" if config.quick else "global"
    presets = arch_presets(arch)
    for budget in config.budgets[arch]:
        preset = presets[budget]
        t0 = time.time()
        paper = preset_schedule(arch, budget)
        ours = ours_schedule(budget, size, h0, optimizer=optimizer, preset=preset)
        searched = searched_schedule(budget, size, h0, config.trials, preset=preset, move=lambda s: tb.testbed_schedule(s, arch))
        schedules[budget] = {"paper": paper, "ours": ours, "searched": searched}
        log(f"  {arch} {budget}x schedules calibrated in {time.time() - t0:.1f} s (ours Z = {ours.z:.2f}, searched steps {[s.steps for s in searched.stages]})")
        target = cost.of(ralu_forwards(paper, full)).total
        n = closest(list(range(1, 2 * base + 1)), lambda k: cost.of([full] * k), target)
        methods.append(ArchMethod("base-steps", budget, label["base-steps"], "pipeline", steps=n, forwards=[full] * n, arch=arch,
                                  details={"steps": [n], "describe": f"plain {pipeline_name}, {n} steps, shift h0 = {h0:.4f}"}))
        if arch == "flux":
            peers = [bottleneck_method(budget, target, cost, h0, full, half, full_px=size),
                     naive_method(budget, target, cost, h0, full, half, switch_t=preset.ends[-2], full_px=size)]
            methods += [_as_arch(p, arch) for p in peers]
        rows = [
            ("ralu-paper", paper, arch == "flux", {"source": f"published {preset.name} preset" + (", paper_compat=True" if arch == "flux" else ", exact noise")}),
            ("ralu-ours", ours, False, {"source": f"calibrate(preset layout, h0 = {h0:.4f}, {optimizer})"}),
            ("ralu-searched", searched, False, {"source": f"calibrate(speedup, h0 = {h0:.4f}, total FLOPs, {config.trials} trials) at 1024 px, moved to {size} px"}),
        ]
        for key, schedule, compat, extra in rows:
            for positions in (POSITION_MODES if arch == "sd3" else (None,)):
                m = ralu_method(key, budget, schedule, full, compat, extra=extra)
                name = key if positions is None else f"{key}-{positions}"
                m.details["describe"] += "" if positions is None else f", low_res_positions={positions!r}"
                text = m.label if compat else m.label.replace(" (paper_compat)", "")  # SD3's published row runs with exact noise
                methods.append(_as_arch(m, arch, key=name, label=text + ("" if positions is None else f", {positions}"), positions=positions))
        if config.caches:
            methods += cache_rows(arch, methods, budget)
    # A --schedule row meets the peers nearest its cost.  A budget's rows cost what its
    # published preset costs on this generator (FLUX 4x: 4.70x), not the nominal number, so a
    # file priced like the 4x preset is judged among the 4x rows.
    budget_speed = {b: generator_speedup(arch, cost, ralu_forwards(schedules[b]["paper"], full)) for b in config.budgets[arch]}
    for path in config.schedules:
        schedule = tb.testbed_schedule(path)
        if schedule.family != arch:
            continue
        speed = generator_speedup(arch, cost, ralu_forwards(schedule, full))
        budget = min(budget_speed, key=lambda b: abs(math.log(speed / budget_speed[b])))
        name = schedule_row_name(path)
        m = ralu_method(f"schedule:{name}", budget, schedule, full, False, label=f"schedule {name}", extra={"file": str(path)})
        methods.append(_as_arch(m, arch, positions="crop" if arch == "sd3" else None))
    return methods, schedules


def chosen_rows(config: V2Config, methods: list[ArchMethod]) -> list[ArchMethod]:
    """The planned rows ``--rows`` keeps (all without it): always the baseline and the ``--schedule`` rows."""
    if config.rows is None:
        return list(methods)
    return [m for m in methods if m.key == "baseline" or m.key.startswith("schedule:") or m.key in config.rows]


def heldout_rows(methods: list[ArchMethod]) -> list[tuple[ArchMethod, list[ArchMethod]]]:
    """Each ``--schedule`` row of ``methods`` (every planned row of one architecture) with the
    rows it meets on the held-out seeds: :data:`HELDOUT_ROWS` at its budget, uncached."""
    out = []
    for row in (m for m in methods if m.key.startswith("schedule:")):
        others = [m for key in HELDOUT_ROWS[row.arch] for m in methods if m.key == key and m.budget == row.budget and m.cache is None]
        out.append((row, others))
    return out


def cache_rows(arch: str, methods: list[ArchMethod], budget: int) -> list[ArchMethod]:
    """``<method> + <cache>`` rows at ``budget`` for the caches ``arch`` supports."""
    out = []
    for kind in CACHE_KINDS[arch]:
        for key in CACHED_METHODS[kind]:
            if key == "base-steps" and not PLAIN_PIPELINE_CACHES[arch]:
                continue
            name = key if arch == "flux" or key == "base-steps" else f"{key}-crop"
            source = next(m for m in methods if m.key == name and m.budget == budget)
            row = ArchMethod(**{**source.__dict__, "details": dict(source.details)})
            row.key, row.cache, row.uncached = f"{name}+{kind}", kind, name
            row.label = f"{source.label} + {kind}"
            row.details["describe"] = f"{source.details['describe']}; {kind} cache ({cache_describe(kind)})"
            out.append(row)
    return out


def cache_describe(kind: str) -> str:
    from ralu_lab.bench.quality.v2.sampler import CACHE_SETTINGS

    return CACHE_SETTINGS[kind][1]


def is_ralu(key: str) -> bool:
    return key.startswith(RALU_KEYS) or key.startswith("schedule:")
