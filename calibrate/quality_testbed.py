"""The quality search on the offline testbed at the budgets of ``ralu-bench quality``.

    python -m ralu.calibrate.quality_testbed --budgets 4 7 --images 16 --trials 16 --out-dir DIR

For each budget (the published preset's cost on the testbed transformer, total FLOPs, as the
harness matches its rows) it runs :func:`ralu.calibrate.quality_search.search_testbed` on
prompts and seeds of ``--image-seed`` (disjoint from the harness's seeds 0, 1, 2) and writes
``DIR/quality-{budget}x.json`` (the best schedule: the plain one when it wins) and
``DIR/quality-{budget}x-trials.json``.  Judge them on held-out seeds with
``python -m ralu.calibrate.objectives_report --schedules-only --schedule DIR/quality-4x.json ...``
or ``ralu-bench quality --schedule ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ralu.runtime.schedule import save_schedule

from .bench.quality.config import BASE_STEPS, PAPER_PRESETS
from .bench.quality.cost import TestbedCost
from .bench.quality.methods import ralu_forwards
from .bench.quality.schedules import paper_schedule
from .quality_search import search_testbed
from .testbed.conditioning import TEXT_TOKENS
from .testbed.data import IMAGE_SIZE
from .testbed.model import load_pipeline


def budget_speedup(cost: TestbedCost, budget: int) -> float:
    """The harness's budget: the published preset's total-FLOPs speed-up on the testbed transformer."""
    full = (IMAGE_SIZE // 2) ** 2
    return cost.of([full] * BASE_STEPS).total / cost.of(ralu_forwards(paper_schedule(budget, IMAGE_SIZE), full)).total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ralu.calibrate.quality_testbed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 7], choices=sorted(PAPER_PRESETS))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--image-seed", type=int, default=100)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--metric", default="testbed-fd")
    parser.add_argument("--reference-seed-offset", type=int, default=500_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline()
    cost = TestbedCost(pipe.transformer.config, TEXT_TOKENS)
    for budget in args.budgets:
        started = time.time()
        target = round(budget_speedup(cost, budget), 3)
        result = search_testbed(
            target, images=args.images, image_seed=args.image_seed, pipe=pipe, metric=args.metric, trials=args.trials, batch_size=args.batch_size,
            cache_dir=args.out_dir / "references", reference_seed_offset=args.reference_seed_offset,
            storage=str(args.out_dir / f"study-{budget}x.log"), study_name=f"quality-{budget}x", log=print,
        )
        print(f"{budget}x (speed-up >= {target}x on the testbed):\n{result.describe()}\n  {time.time() - started:.0f} s", flush=True)
        save_schedule(result.best, args.out_dir / f"quality-{budget}x.json")
        (args.out_dir / f"quality-{budget}x-trials.json").write_text(json.dumps(result.history, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
