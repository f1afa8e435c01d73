"""The quality search on the offline testbed at the budgets of ``ralu-bench quality``.

    python -m ralu.calibrate.quality_testbed --budgets 4 7 --images 16 --trials 16 --out-dir DIR
    python -m ralu.calibrate.quality_testbed --testbed v2 --arch flux --budgets 4 7 --out-dir DIR
    python -m ralu.calibrate.quality_testbed --testbed v2 --arch sd3 --budgets 2 3 --out-dir DIR

For each budget (the published preset's cost on the testbed transformer, total FLOPs, as the
harness matches its rows) it runs :func:`ralu.calibrate.quality_search.search_testbed` on
prompts and seeds of ``--image-seed`` (disjoint from the harness's seeds 0, 1, 2; testbed v2:
:func:`ralu.calibrate.quality_search.search_testbed_v2`, FD in its classifier's features) and writes
``DIR/quality-{budget}x.json`` (the best schedule: the plain one when it wins) and
``DIR/quality-{budget}x-trials.json``.  Judge them on held-out seeds with
``python -m ralu.calibrate.objectives_report --schedules-only --schedule DIR/quality-4x.json ...``
or ``ralu-bench quality --schedule ...``.
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

from .bench.quality.config import BASE_STEPS, PAPER_PRESETS
from .bench.quality.cost import TestbedCost
from .bench.quality.methods import ralu_forwards
from .bench.quality.schedules import paper_schedule
from .quality_search import search_testbed, search_testbed_v2
from .testbed.conditioning import TEXT_TOKENS
from .testbed.data import IMAGE_SIZE
from .testbed.model import load_pipeline


def budget_speedup(cost: TestbedCost, budget: int) -> float:
    """The harness's budget: the published preset's total-FLOPs speed-up on the testbed transformer."""
    full = (IMAGE_SIZE // 2) ** 2
    return cost.of([full] * BASE_STEPS).total / cost.of(ralu_forwards(paper_schedule(budget, IMAGE_SIZE), full)).total


def budget_speedup_v2(arch: str, transformer_config, budget: int) -> float:
    """Testbed v2's budget: the published preset's transformer-FLOPs speed-up on ``arch``'s generator
    (how ``ralu-bench quality --testbed v2`` sets its rows' cost)."""
    from .bench.quality.v2.cost import transformer_cost
    from .bench.quality.v2.plan import preset_schedule
    from .testbed.v2 import model as tb

    cost = transformer_cost(arch, transformer_config)
    return cost.of([tb.FULL_TOKENS] * tb.BASE_STEPS[arch]).total / cost.of(ralu_forwards(preset_schedule(arch, budget), tb.FULL_TOKENS)).total


def known_candidates_v2(arch: str, budget: int) -> list[tuple[str, object]]:
    """The schedules a v2 search starts from besides its own seeds: the published preset,
    our calibration of its layout (the harness's ``ralu-ours`` row) and the shipped
    ``-searched`` file of the budget (what ``ralu-calibrate`` answers by default), all at 64 px."""
    from ralu.runtime.models import get_model

    from .bench.quality.schedules import ours_schedule
    from .bench.quality.v2.plan import arch_presets, preset_schedule
    from .testbed.v2 import data
    from .testbed.v2 import model as tb

    preset = arch_presets(arch)[budget]
    model = get_model("flux-dev" if arch == "flux" else "sd3-medium").name
    return [
        (f"published {budget}x preset", preset_schedule(arch, budget)),
        (f"our calibration of the {budget}x preset layout", ours_schedule(budget, data.IMAGE_SIZE, tb.base_shift(arch), preset=preset)),
        (f"shipped {model}-{budget}x-searched", tb.testbed_schedule(f"{model}-{budget}x-searched", arch)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ralu.calibrate.quality_testbed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", choices=("v1", "v2"), default="v1")
    parser.add_argument("--arch", choices=("flux", "sd3"), default="flux", help="testbed v2's generator (v1 has FLUX only)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="FLUX 4 and 7 (default), SD3 2 and 3 (default with --arch sd3)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--image-seed", type=int, default=100)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--metric", default=None, help="default testbed-fd (v1), testbed-v2-fd (v2)")
    parser.add_argument("--reference-seed-offset", type=int, default=500_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-known", action="store_true", help="v2: do not start from the published preset, our calibration and the shipped -searched file")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    v2 = args.testbed == "v2"
    if not v2 and args.arch != "flux":
        parser.error("testbed v1 has a FLUX generator only. Fix: add --testbed v2 for --arch sd3")
    published = {"flux": sorted(PAPER_PRESETS), "sd3": [2, 3]}[args.arch]
    budgets = args.budgets or ([4, 7] if args.arch == "flux" else [2, 3])
    if any(b not in published for b in budgets):
        parser.error(f"--budgets {budgets}: the {args.arch} budgets are the published presets' speed-ups {published}. Fix: pick from those")
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if v2:
        from .testbed.v2 import model as tb

        pipe = tb.load_pipeline(args.arch)
    else:
        pipe = load_pipeline()
        cost = TestbedCost(pipe.transformer.config, TEXT_TOKENS)
    stem = "quality" if not v2 else f"quality-v2-{args.arch}"
    for budget in budgets:
        started = time.time()
        exact = budget_speedup_v2(args.arch, pipe.transformer.config, budget) if v2 else budget_speedup(cost, budget)
        target = math.floor(exact * 1000) / 1000  # rounded down: the preset that defines the budget must meet it
        common = dict(images=args.images, image_seed=args.image_seed, pipe=pipe, trials=args.trials, batch_size=args.batch_size,
                      cache_dir=args.out_dir / "references", reference_seed_offset=args.reference_seed_offset,
                      storage=str(args.out_dir / (f"study-{stem}-{budget}x.log" if v2 else f"study-{budget}x.log")), study_name=f"{stem}-{budget}x", log=print)
        if args.metric is not None:
            common["metric"] = args.metric
        if v2 and not args.no_known:
            common["extra_candidates"] = known_candidates_v2(args.arch, budget)
        result = search_testbed_v2(args.arch, target, **common) if v2 else search_testbed(target, **{"metric": "testbed-fd", **common})
        print(f"{budget}x (speed-up >= {target}x on the testbed):\n{result.describe()}\n  {time.time() - started:.0f} s", flush=True)
        save_schedule(result.best, args.out_dir / f"{stem}-{budget}x.json")
        (args.out_dir / f"{stem}-{budget}x-trials.json").write_text(json.dumps(result.history, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
