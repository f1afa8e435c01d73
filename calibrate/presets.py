"""What the RALU paper publishes: its stage presets and its reference figures.

Source: docs/method.md §5 and §6.  The presets were calibrated by the paper at
``PAPER_H0 = 3`` (the published script's base shift for every model); FLOPs figures count
linear and conv layers only (the paper's convention) at 1024x1024 against FLUX.1-dev with 50
steps and SD3-medium with 28 steps plus classifier-free guidance.

The shipped schedules (:mod:`ralu.calibrate.shipped`), the FLOPs report and the tests read
these numbers from here; nothing else declares them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The base shift the published presets were calibrated with (docs/method.md §4).
PAPER_H0 = 3.0

#: Resolution all published figures are at.
PAPER_SIZE = 1024

#: The paper's baseline TFLOPs per image (linear convention, text encoders and decode included).
PAPER_BASELINE_TFLOPS: dict[str, float] = {"flux-dev": 2991.0, "sd3-medium": 351.66}

#: The GPU the paper's wall-clock figures were measured on.
PAPER_GPU = "A100"

#: docs/method.md §6: the 512-px VAE decode of the edge detection, linear TFLOPs.
REFERENCE_EDGE_DECODE_TFLOPS = 2.48


@dataclass(frozen=True)
class PublishedPreset:
    """One published RALU preset: a three-stage layout, its calibration at ``PAPER_H0``, and
    what the paper reports for it.

    The noise strength is published as Z = 1/sqrt(c) for FLUX and as c for SD3; exactly one
    of ``published_z`` and ``published_c`` is set, and :attr:`z` / :attr:`c` give both forms.
    """

    #: Name of the shipped schedule with this layout ("flux-dev-7x").
    name: str
    model: str
    #: The speed-up the preset is named after.
    target: float
    steps: tuple[int, int, int]
    ends: tuple[float, float, float]
    up_ratio: float
    shifts: tuple[float, float, float]
    published_z: float | None = None
    published_c: float | None = None
    #: The paper's JS distance at ``PAPER_H0`` (published for FLUX only).
    js_distance: float | None = None
    #: The paper's FLOPs speed-up over the baseline (linear convention), if stated.
    speedup: float | None = None
    #: The paper's TFLOPs per image (linear convention), if stated.
    tflops: float | None = None
    #: The paper's wall-clock speed-up on ``PAPER_GPU``, if stated.
    wall_clock_speedup: float | None = None

    def __post_init__(self) -> None:
        if (self.published_z is None) == (self.published_c is None):
            raise ValueError(f"preset {self.name}: give exactly one of published_z and published_c")

    @property
    def c(self) -> float:
        """Noise strength c = 1 / Z^2."""
        return self.published_c if self.published_c is not None else 1 / self.published_z**2

    @property
    def z(self) -> float:
        """Z = 1 / sqrt(c)."""
        return self.published_z if self.published_z is not None else 1 / math.sqrt(self.published_c)

    @property
    def label(self) -> str:
        """How the paper's tables name it: "RALU 7x"."""
        return f"RALU {self.target:g}x"


PRESETS: tuple[PublishedPreset, ...] = (
    PublishedPreset("flux-dev-4x", "flux-dev", 4.0, (5, 6, 7), (0.3, 0.45, 1.0), 0.3, (5.019, 2.589, 2.226), published_z=6.317, js_distance=0.017461),
    PublishedPreset("flux-dev-5x", "flux-dev", 5.0, (4, 5, 6), (0.3, 0.45, 1.0), 0.2, (5.115, 2.642, 2.254), published_z=7.522, js_distance=0.0163, speedup=5.53, tflops=540.47),
    PublishedPreset("flux-dev-7x", "flux-dev", 7.0, (2, 3, 5), (0.2, 0.3, 1.0), 0.1, (8.141, 2.856, 2.193), published_z=6.261, js_distance=0.026638, speedup=7.02, tflops=426.01, wall_clock_speedup=6.7),
    PublishedPreset("sd3-medium-2x", "sd3-medium", 2.0, (5, 6, 9), (0.2, 0.3, 1.0), 0.3, (6.21, 2.23, 1.97), published_c=0.0586, speedup=1.94),
    PublishedPreset("sd3-medium-3x", "sd3-medium", 3.0, (3, 3, 6), (0.25, 0.3, 1.0), 0.2, (6.40, 2.60, 2.23), published_c=0.0255, speedup=3.02, tflops=116.61),
)


def preset(name: str) -> PublishedPreset:
    """A preset by its schedule name; unknown names get an error listing the choices."""
    for candidate in PRESETS:
        if candidate.name == name:
            return candidate
    raise ValueError(f"no published preset {name!r}. Fix: use one of {[p.name for p in PRESETS]}")


def presets_with_speedup(model: str) -> tuple[PublishedPreset, ...]:
    """The model's presets whose FLOPs speed-up the paper states, fastest first."""
    found = [p for p in PRESETS if p.model == model and p.speedup is not None]
    return tuple(sorted(found, key=lambda p: -p.target))
