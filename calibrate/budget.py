"""Budget-filling layouts: a number of stages and the weight of each stage's share of the
steps; the steps are as many as the FLOPs budget affords in those proportions.  Both
searches draw layouts so (the layout search, :mod:`.layout_search`, and the quality search,
:mod:`.quality_search`): every draw meets its target and spends it, and none wastes a trial on
a layout cheaper than it needs to be.  Only the standard library: the main job stays light.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

#: Weight of each earlier stage relative to the last (log-uniform): a layout's steps are
#: split in these proportions, as many as the budget affords (:func:`budget_steps`).
STAGE_WEIGHT = (0.05, 4.0)

#: ``speedup_of(steps, up_ratio)``: a layout's speed-up in the target's convention.
SpeedupOf = Callable[[Sequence[int], float], float]


def apportion(total: int, weights: Sequence[float]) -> tuple[int, ...]:
    """``total`` steps over ``len(weights)`` stages: one each, the rest in proportion to
    ``weights`` (largest remainders, ties to the earlier stage)."""
    spare = total - len(weights)
    if spare < 0:
        raise ValueError(f"{total} steps cannot give {len(weights)} stages one step each")
    raw = [spare * w / sum(weights) for w in weights]
    steps = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(weights)), key=lambda k: steps[k] - raw[k])
    for k in by_remainder[: spare - sum(steps)]:
        steps[k] += 1
    return tuple(1 + n for n in steps)


def budget_steps(speedup_of: SpeedupOf, target: float, weights: Sequence[float], up_ratio: float, limit: int) -> tuple[int, ...] | None:
    """The layout with the most steps (at most ``limit``), split by ``weights``, that still
    meets ``target``; None when not even one step per stage does."""
    best = None
    for total in range(len(weights), limit + 1):
        steps = apportion(total, weights)
        speed = speedup_of(steps, up_ratio)
        if speed >= target:
            best = steps
        elif speed < target / 2:  # the cost only grows from here
            break
    return best
