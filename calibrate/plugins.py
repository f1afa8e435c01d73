"""Plug-in points of the calibrator: what code outside ``ralu`` (the lab, a user's package)
adds to it through Python entry points, read with :func:`importlib.metadata.entry_points`.

``ralu`` itself imports no such code; a package registers it in its ``pyproject.toml``::

    [project.entry-points."ralu.quality_targets"]
    testbed = "ralu_lab.bench.quality.v2.search_target:testbed_target"

Two groups (docs/plugins.md):

* :data:`QUALITY_TARGETS` (``ralu-calibrate --objective quality --pipeline NAME`` and
  ``--magcache``): ``NAME`` -> a callable ``target(model=, metric=, device=)`` returning a
  :class:`QualityTarget` (the pipeline and the keyword arguments of
  :func:`ralu.calibrate.quality_search.search`: size, h0, base steps, prompt encoder,
  metric, cost ``speedup_of``, reference-cache key).
* :data:`SCHEDULE_JUDGEMENTS` (``python -m ralu.calibrate.shipped``): a callable
  ``judge(reports_dir, preset_names) -> str``, a Markdown section of reports/schedules.md
  saying how a quality harness judged the shipped schedules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

QUALITY_TARGETS = "ralu.quality_targets"
SCHEDULE_JUDGEMENTS = "ralu.schedule_judgements"


@dataclass
class QualityTarget:
    """What a quality target gives the quality search: ``pipe`` (a diffusers or RALU
    pipeline) and ``options``, the keyword arguments of
    :func:`ralu.calibrate.quality_search.search` it fixes (``model``, ``height``,
    ``width``, ``h0``, ``base_steps``, ``encode``, ``speedup_of``, ``pipeline_id``,
    ``metric``, ...); ``adapt_schedule`` maps a shipped schedule onto the target's own
    size (``--magcache``; identity by default)."""

    pipe: Any
    options: dict = field(default_factory=dict)
    adapt_schedule: Callable[[Any], Any] = lambda schedule: schedule


def registered(group: str) -> dict:
    """The entry points of ``group`` by name (none when nothing registers any)."""
    return {point.name: point for point in entry_points(group=group)}


def quality_target_names() -> list[str]:
    return sorted(registered(QUALITY_TARGETS))


def quality_target(name: str) -> Callable[..., QualityTarget]:
    """The builder registered as ``name`` in :data:`QUALITY_TARGETS`; a one-line ValueError
    naming the registered targets when there is none of that name."""
    points = registered(QUALITY_TARGETS)
    if name not in points:
        known = ", ".join(sorted(points)) or "none"
        raise ValueError(f"--pipeline {name!r} is neither a folder nor a registered quality target (registered: {known}). "
                         f"Fix: pass a local diffusers pipeline folder, or install the package that registers {name!r} "
                         f"in the entry-point group {QUALITY_TARGETS}")
    try:
        return points[name].load()
    except Exception as error:  # an installed plug-in that fails to import: say which, in one line
        raise ValueError(f"the quality target {name!r} ({points[name].value}) failed to load: {str(error).splitlines()[0] if str(error) else type(error).__name__}. "
                         f"Fix: reinstall the package that registers it") from None


def schedule_judgements() -> list[Callable[..., str]]:
    """Every registered :data:`SCHEDULE_JUDGEMENTS` callable, by name."""
    points = registered(SCHEDULE_JUDGEMENTS)
    return [points[name].load() for name in sorted(points)]
