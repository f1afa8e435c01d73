"""The models ralu calibrates for: names, baselines and the base schedule's shift.

Architecture configs for counting FLOPs live in :mod:`ralu.calibrate.flops`; this module
holds the product-level facts a schedule depends on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ralu.runtime.schedule import MODEL_FAMILIES, RESOLUTION_MULTIPLE


@dataclass(frozen=True)
class ModelSpec:
    """What calibration needs to know about one model."""

    name: str
    #: Steps of the baseline sampler (FLUX.1-dev 50, SD3 28: the paper's baselines).
    base_steps: int
    #: Whether the baseline runs classifier-free guidance (doubles every forward).
    cfg: bool
    #: Text tokens in the joint sequence (FLUX: T5 512; SD3: CLIP 77 + T5 256).
    text_tokens: int
    #: Static shift of the scheduler, or None when the shift is dynamic (FLUX).
    static_shift: float | None

    @property
    def family(self) -> str:
        return MODEL_FAMILIES[self.name]

    def image_tokens(self, height: int, width: int) -> int:
        """Image tokens of one full-resolution forward: latent /8, then 2x2 patches."""
        check_resolution(height, width)
        return (height // 16) * (width // 16)

    def base_shift(self, height: int, width: int) -> float:
        """h0: the shift of the base model's own schedule at this resolution.

        FLUX.1-dev shifts dynamically: ``mu`` is linear in the image token count (0.5 at
        256 tokens, 1.15 at 4096) and the exponential time shift with ``mu`` equals the
        static shift ``exp(mu)``: 3.158 at 1024x1024.
        """
        if self.static_shift is not None:
            return self.static_shift
        tokens = self.image_tokens(height, width)
        slope = (1.15 - 0.5) / (4096 - 256)
        mu = 0.5 + slope * (tokens - 256)
        return math.exp(mu)


MODELS: dict[str, ModelSpec] = {
    "flux-dev": ModelSpec("flux-dev", base_steps=50, cfg=False, text_tokens=512, static_shift=None),
    "sd3-medium": ModelSpec("sd3-medium", base_steps=28, cfg=True, text_tokens=333, static_shift=3.0),
    "sd3.5-medium": ModelSpec("sd3.5-medium", base_steps=28, cfg=True, text_tokens=333, static_shift=3.0),
    "sd3.5-large": ModelSpec("sd3.5-large", base_steps=28, cfg=True, text_tokens=333, static_shift=3.0),
}

#: Short names accepted on the command line.
ALIASES: dict[str, str] = {"flux": "flux-dev", "sd3": "sd3-medium"}


def get_model(name: str) -> ModelSpec:
    """Look a model up by name or alias; unknown names get an error listing the choices."""
    key = ALIASES.get(name, name)
    if key not in MODELS:
        choices = sorted(set(MODELS) | set(ALIASES))
        raise ValueError(f"unknown model {name!r}. Fix: use one of {choices}")
    return MODELS[key]


def check_resolution(height: int, width: int) -> None:
    for label, value in (("height", height), ("width", width)):
        if value <= 0 or value % RESOLUTION_MULTIPLE:
            raise ValueError(f"{label}={value} must be a positive multiple of {RESOLUTION_MULTIPLE}: the latent (1/8) is halved for stage 1 and cut into 2x2 patches. Fix: pick e.g. {max(RESOLUTION_MULTIPLE, round(value / RESOLUTION_MULTIPLE) * RESOLUTION_MULTIPLE)}")


def stage_image_tokens(full_tokens: int, up_ratio: float, n_stages: int) -> list[int]:
    """Image tokens per stage: ``M/4, M/4 + 3k, M`` for three stages (k = floor(r M/4)).

    With two stages there is no mixed stage (``M/4, M``); with one, full resolution only.
    """
    low = full_tokens // 4
    if n_stages == 1:
        return [full_tokens]
    if n_stages == 2:
        return [low, full_tokens]
    if n_stages == 3:
        upsampled = math.floor(up_ratio * low)
        return [low, low + 3 * upsampled, full_tokens]
    raise ValueError(f"{n_stages} stages: the runtime knows 1, 2 or 3 (low, mixed, full resolution)")
