"""Switches that reproduce the published research script's choices (docs/method.md §3c).

Each switch can be turned on alone, so that every difference from the correct method can
be measured separately; ``paper_compat=True`` turns on all of them.  (The script's
``h0 = 3.0`` is a calibration matter and lives in the schedule, not here.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class PaperCompat:
    #: Upsample by repeating the packed token 4 times (pixel tiling [a b a b; c d c d])
    #: instead of latent-space nearest upsampling.
    repeat_tokens: bool = False
    #: N(0, I) noise on tokens not upsampled at a transition instead of N(0, (1 - c) I).
    unit_noise: bool = False
    #: Edge detection on the decoded image as the script does it: luma of the raw decoded
    #: values, clipped to [0, 1] and truncated to 8 bits, instead of mapping each channel from
    #: [-1, 1] to [0, 1], rounding, then taking luma (see :func:`ralu.runtime.edges.to_uint8_gray`).
    clip_decode: bool = False
    #: One correlated-noise draw from the global RNG, made once per process and reused for
    #: every image and call, instead of a draw per image per call from the caller's generator.
    global_noise: bool = False
    #: Stage-1 noise is every second latent pixel (rows and columns 0, 2, 4, ...) of the
    #: full-size noise, the script's nearest downsampling, instead of the 2x2 block sum / 2.
    #: Both are N(0, I); this one makes the same seed give the script's image.
    subsample_noise: bool = False

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def parse(cls, value: bool | Iterable[str] | PaperCompat | None) -> PaperCompat:
        """``False``/``None``: correct method; ``True``: every switch; an iterable of switch
        names: just those; a :class:`PaperCompat`: itself."""
        if isinstance(value, PaperCompat):
            return value
        if value is None or value is False:
            return cls()
        if value is True:
            return cls(**{name: True for name in cls.names()})
        if isinstance(value, str):
            value = [value]
        value = list(value) if isinstance(value, Iterable) else value
        if not isinstance(value, list) or any(not isinstance(name, str) for name in value):
            raise ValueError(f"paper_compat={value!r:.60} is not True, False, None or a list of switch names. Fix: use one of those (switches: {list(cls.names())})")
        chosen = set(value)
        unknown = chosen - set(cls.names())
        if unknown:
            raise ValueError(f"paper_compat: unknown switch(es) {sorted(unknown)}. Fix: use True, False, or a subset of {list(cls.names())}")
        return cls(**{name: name in chosen for name in cls.names()})

    @property
    def any(self) -> bool:
        return any(getattr(self, name) for name in self.names())
