"""Where a RALU call spends its time: named wall-clock sections, off unless asked for.

The runtime wraps its own work (everything a plain diffusers pipeline does not do) in
``with section(NAME):`` blocks.  Nothing is measured unless a :class:`Profiler` is active::

    from ralu.runtime.profiling import Profiler

    with Profiler() as profiler:
        pipe(prompt, schedule="flux-dev-7x")
    print(profiler.seconds)      # {"edge_decode": 0.41, "noise": 0.002, ...}

When no profiler is active, ``section`` returns one shared no-op context manager (a global
read and a function call); results never depend on whether a profiler is active.

Sections are exclusive: when one section opens inside another, the outer one's clock pauses,
so the seconds of all sections add up to at most the wall time of the profiled block and
nothing is counted twice.  On CUDA, pass ``synchronize=torch.cuda.synchronize`` (what
:meth:`Profiler.for_device` does): the device is then synchronised at every section edge so
that the GPU work queued inside a section is charged to it.  That costs time, so profile
separately from timing runs on a GPU.  Without ``synchronize`` nothing is synchronised.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

#: Sections of the runtime's own work (the RALU overhead over a plain pipeline).
OVERHEAD_SECTIONS = ("edge_decode", "edge_select", "noise", "gather_scatter", "positions")
#: The transformer evaluations (not overhead: the baseline runs them too).
MODEL_SECTION = "transformer"
SECTIONS = OVERHEAD_SECTIONS + (MODEL_SECTION,)

_NULL = nullcontext()
_ACTIVE: Profiler | None = None


class _Section:
    __slots__ = ("profiler", "name")

    def __init__(self, profiler: Profiler, name: str):
        self.profiler, self.name = profiler, name

    def __enter__(self):
        self.profiler._open(self.name)
        return self

    def __exit__(self, *exc):
        self.profiler._close(self.name)
        return False


def section(name: str):
    """Context manager charging the wall time of its block to ``name`` while a profiler is
    active; a shared no-op otherwise."""
    profiler = _ACTIVE
    if profiler is None:
        return _NULL
    return _Section(profiler, name)


def active() -> Profiler | None:
    """The active profiler, if any."""
    return _ACTIVE


class Profiler:
    """Accumulates exclusive wall time per section name while active (a context manager;
    not re-entrant, one active profiler per process)."""

    def __init__(self, synchronize: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self.synchronize = synchronize
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[str] = []
        self._since = 0.0

    @classmethod
    def for_device(cls, device) -> Profiler:
        """A profiler that synchronises ``device`` at section edges when it is a CUDA device."""
        import torch

        device = torch.device(device)
        if device.type == "cuda":
            return cls(synchronize=lambda: torch.cuda.synchronize(device))
        return cls()

    def __enter__(self) -> Profiler:
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a profiler is already active")
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> bool:
        global _ACTIVE
        _ACTIVE = None
        self._stack.clear()
        return False

    def _now(self) -> float:
        if self.synchronize is not None:
            self.synchronize()
        return self.clock()

    def _charge(self, now: float) -> None:
        if self._stack:
            name = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + (now - self._since)
        self._since = now

    def _open(self, name: str) -> None:
        self._charge(self._now())
        self._stack.append(name)
        self.calls[name] = self.calls.get(name, 0) + 1

    def _close(self, name: str) -> None:
        self._charge(self._now())
        if not self._stack or self._stack[-1] != name:
            raise RuntimeError(f"section {name!r} closed out of order (open: {self._stack})")
        self._stack.pop()

    def total(self, names=OVERHEAD_SECTIONS) -> float:
        """Seconds charged to ``names`` (default: the overhead sections)."""
        return sum(self.seconds.get(name, 0.0) for name in names)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
