"""The quality search on testbed v2 at the budgets of ``ralu-bench quality`` (lab code).

    python -m ralu_lab.bench.quality_testbed --arch flux --budgets 4 7 --out-dir DIR
    python -m ralu_lab.bench.quality_testbed --arch sd3 --budgets 2 3 --out-dir DIR

For each budget (the published preset's transformer-FLOPs speed-up on the generator, as the
harness matches its rows) it runs
:func:`ralu_lab.bench.quality.v2.search_target.search_testbed_v2` (FD in the testbed
classifier's features, times ``1 + --spectral-weight x`` the spectral distance to the
references) on prompts and seeds of ``--image-seed`` (disjoint from the harness's seeds) and
writes ``DIR/quality-v2-{arch}-{budget}x.json`` (the best schedule: the plain one when it
wins), ``DIR/quality-v2-{arch}-{budget}x-result.json`` (the best, best plain and best RALU
schedules with their scores and both parts of each, and the settings) and
``DIR/quality-v2-{arch}-{budget}x-trials.json`` (every trial, with both parts).  SD3 runs
with ``--low-res-positions`` (default ``crop``, the runtime's own; a schedule file does not
carry it).  Judge them on held-out
seeds with ``ralu-bench quality --schedule ...``.  (Testbed v1's search is retired;
``--testbed v2`` is still accepted.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ralu.runtime.schedule import save_schedule

from .quality.config import PAPER_PRESETS
from .quality.methods import ralu_forwards
from .quality.v2.search_target import search_testbed_v2


def budget_speedup_v2(arch: str, transformer_config, budget: int) -> float:
    """Testbed v2's budget: the published preset's transformer-FLOPs speed-up on ``arch``'s generator
    (how ``ralu-bench quality --testbed v2`` sets its rows' cost)."""
    from ralu_lab.testbed.v2 import model as tb

    from .quality.v2.cost import transformer_cost
    from .quality.v2.plan import generator_speedup, preset_schedule

    return generator_speedup(arch, transformer_cost(arch, transformer_config), ralu_forwards(preset_schedule(arch, budget), tb.FULL_TOKENS))


def known_candidates_v2(arch: str, budget: int) -> list[tuple[str, object]]:
    """The schedules a v2 search starts from besides its own seeds: the published preset,
    our calibration of its layout (the harness's ``ralu-ours`` row) and the shipped
    ``-searched`` file of the budget (what ``ralu-calibrate`` answers by default), all at 64 px."""
    from ralu.runtime.models import get_model
    from ralu_lab.testbed.v2 import data
    from ralu_lab.testbed.v2 import model as tb

    from .quality.schedules import ours_schedule
    from .quality.v2.plan import arch_presets, preset_schedule

    preset = arch_presets(arch)[budget]
    model = get_model("flux-dev" if arch == "flux" else "sd3-medium").name
    return [
        (f"published {budget}x preset", preset_schedule(arch, budget)),
        (f"our calibration of the {budget}x preset layout", ours_schedule(budget, data.IMAGE_SIZE, tb.base_shift(arch), preset=preset)),
        (f"shipped {model}-{budget}x-searched", tb.testbed_schedule(f"{model}-{budget}x-searched", arch)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ralu_lab.bench.quality_testbed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", choices=("v2",), default="v2", help="testbed v2 (v1 is retired)")
    parser.add_argument("--arch", choices=("flux", "sd3"), default="flux", help="testbed v2's generator")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="FLUX 4 and 7 (default), SD3 2 and 3 (default with --arch sd3)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--image-seed", type=int, default=100)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--metric", default=None, help="default testbed-v2-fd")
    parser.add_argument("--reference-seed-offset", type=int, default=500_000)
    parser.add_argument("--spectral-weight", type=float, default=None,
                        help="score = FD x (1 + W x spectral distance) (default: the search's, ralu.calibrate.quality_search.SPECTRAL_WEIGHT; 0: FD alone)")
    parser.add_argument("--low-res-positions", choices=("crop", "stretch"), default=None,
                        help="SD3: positions of the low-resolution stages (default crop, the runtime's default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-known", action="store_true", help="v2: do not start from the published preset, our calibration and the shipped -searched file")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    published = {"flux": sorted(PAPER_PRESETS), "sd3": [2, 3]}[args.arch]
    budgets = args.budgets or ([4, 7] if args.arch == "flux" else [2, 3])
    if any(b not in published for b in budgets):
        parser.error(f"--budgets {budgets}: the {args.arch} budgets are the published presets' speed-ups {published}. Fix: pick from those")
    if args.low_res_positions is not None and args.arch != "sd3":
        parser.error("--low-res-positions is an SD3 option (FLUX's rotary positions have no crop or stretch). Fix: drop it, or --arch sd3")
    if args.spectral_weight is not None:
        from ralu.calibrate.quality_search import check_spectral_weight

        try:
            check_spectral_weight(args.spectral_weight, "--spectral-weight ")
        except ValueError as error:
            parser.error(str(error))
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from ralu_lab.testbed.v2 import model as tb

    pipe = tb.load_pipeline(args.arch)
    stem = f"quality-v2-{args.arch}"
    for budget in budgets:
        started = time.time()
        exact = budget_speedup_v2(args.arch, pipe.transformer.config, budget)
        target = math.floor(exact * 1000) / 1000  # rounded down: the preset that defines the budget must meet it
        common = dict(images=args.images, image_seed=args.image_seed, pipe=pipe, trials=args.trials, batch_size=args.batch_size,
                      cache_dir=args.out_dir / "references", reference_seed_offset=args.reference_seed_offset,
                      storage=str(args.out_dir / f"study-{stem}-{budget}x.log"), study_name=f"{stem}-{budget}x", log=print)
        if args.metric is not None:
            common["metric"] = args.metric
        if args.spectral_weight is not None:
            common["spectral_weight"] = args.spectral_weight
        if args.arch == "sd3":
            common["low_res_positions"] = args.low_res_positions or "crop"
        if not args.no_known:
            common["extra_candidates"] = known_candidates_v2(args.arch, budget)
        result = search_testbed_v2(args.arch, target, **common)
        print(f"{budget}x (speed-up >= {target}x on the testbed):\n{result.describe()}\n  {time.time() - started:.0f} s", flush=True)
        save_schedule(result.best, args.out_dir / f"{stem}-{budget}x.json")
        settings = {"arch": args.arch, "budget": budget, "target_speedup": target, "images": args.images, "image_seed": args.image_seed,
                    "trials": args.trials, "batch_size": args.batch_size, "metric": args.metric or "testbed-v2-fd",
                    "reference_seed_offset": args.reference_seed_offset, "low_res_positions": common.get("low_res_positions")}
        (args.out_dir / f"{stem}-{budget}x-result.json").write_text(json.dumps({"settings": settings, **result.summary()}, indent=1) + "\n")
        (args.out_dir / f"{stem}-{budget}x-trials.json").write_text(json.dumps(result.history, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
