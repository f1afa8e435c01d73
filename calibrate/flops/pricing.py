"""The cheap half of the FLOPs cost model: prices images from the shipped table.

The table (``calibrate/flops_table.json``, built by :mod:`.counting`) holds, per model, exact
quadratic polynomials: transformer forward cost in the image-token count, VAE decode cost in
the latent area, and constant text-encoder costs.  Evaluating them is all the Optuna search
does when it prices thousands of schedules, so importing and calling this module never
imports torch (unless the table lacks a model, which is then counted once, with a warning).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ralu.runtime.models import ModelSpec, get_model, stage_image_tokens

logger = logging.getLogger(__name__)

TABLE_NAME = "flops_table.json"
TABLE_FORMAT = 1
#: The command that recounts every model and rewrites the table.
RECOUNT_COMMAND = "python -m ralu.calibrate.flops --write"
TERA = 1e12


# ----------------------------------------------------------------------------------------
# The value type.
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flops:
    """A FLOPs count (or a ratio of counts) in both conventions.

    ``total`` counts linear, conv and attention matmuls; ``linear`` counts linear and conv
    layers only (the paper's convention).  Supports ``+``, ``*``/``/`` by a scalar, and
    ``Flops / Flops`` (element-wise ratio, used for speed-ups); ``sum()`` works.
    """

    total: float
    linear: float

    @property
    def attention(self) -> float:
        """Attention matmuls alone: what the linear convention leaves out."""
        return self.total - self.linear

    def __add__(self, other: Flops) -> Flops:
        if not isinstance(other, Flops):
            return NotImplemented
        return Flops(self.total + other.total, self.linear + other.linear)

    def __radd__(self, other: Any) -> Flops:
        # sum() starts from the integer 0.
        if isinstance(other, (int, float)) and other == 0:
            return self
        return NotImplemented

    def __mul__(self, factor: float) -> Flops:
        if isinstance(factor, Flops) or not isinstance(factor, (int, float)):
            return NotImplemented
        return Flops(self.total * factor, self.linear * factor)

    __rmul__ = __mul__

    def __truediv__(self, other: Flops | float) -> Flops:
        if isinstance(other, Flops):
            return Flops(self.total / other.total, self.linear / other.linear)
        if isinstance(other, (int, float)):
            return Flops(self.total / other, self.linear / other)
        return NotImplemented

    def in_tera(self) -> Flops:
        """The same count in TFLOPs."""
        return self / TERA


ZERO = Flops(0.0, 0.0)


def evaluate_quadratic(coefficients: Sequence[float], x: float) -> float:
    """``c0 + c1 x + c2 x^2`` for stored coefficients ``(c0, c1, c2)``."""
    c0, c1, c2 = coefficients
    return c0 + c1 * x + c2 * x * x


# ----------------------------------------------------------------------------------------
# The shipped table.
# ----------------------------------------------------------------------------------------


def table_path() -> Path:
    """Where the shipped table lives (inside the installed package)."""
    return Path(str(resources.files("ralu.calibrate").joinpath(TABLE_NAME)))


@functools.lru_cache(maxsize=1)
def load_table() -> dict[str, Any]:
    """The shipped table, read once; an empty one (with a warning) when it is missing."""
    path = table_path()
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        logger.warning("FLOPs table %s is missing: counting on demand. Fix: %s", path, RECOUNT_COMMAND)
        return {"format": TABLE_FORMAT, "models": {}}
    if table.get("format") != TABLE_FORMAT:
        logger.warning("FLOPs table %s has format %s, expected %s: counting on demand. Fix: %s", path, table.get("format"), TABLE_FORMAT, RECOUNT_COMMAND)
        return {"format": TABLE_FORMAT, "models": {}}
    return table


@functools.cache
def model_entry(model: str) -> dict[str, Any]:
    """The table entry of a model; counted on demand (and logged) when missing or stale."""
    spec = get_model(model)
    entry = load_table()["models"].get(spec.name)
    if entry is not None and entry["transformer"]["text_tokens"] == spec.text_tokens:
        return entry
    reason = "missing" if entry is None else "stale (other text length)"
    logger.warning("FLOPs table entry for %s is %s: counting it now (seconds). Fix: %s", spec.name, reason, RECOUNT_COMMAND)
    # Imported here: counting is the expensive half (torch), needed only for a missing entry.
    from .counting import count_model_entry

    return count_model_entry(spec.name)


def clear_caches() -> None:
    """Forget the loaded table (after rewriting it)."""
    load_table.cache_clear()
    model_entry.cache_clear()


def _evaluate(component: dict[str, Any], x: float) -> Flops:
    return Flops(evaluate_quadratic(component["total"], x), evaluate_quadratic(component["linear"], x))


def _cfg_factor(spec: ModelSpec) -> int:
    return 2 if spec.cfg else 1


# ----------------------------------------------------------------------------------------
# Public cost model.
# ----------------------------------------------------------------------------------------


def transformer_forward_flops(model: str, image_tokens: int) -> Flops:
    """One batch-1 transformer forward with the model's text tokens, WITHOUT CFG doubling
    (the per-forward numbers of docs/method.md §6 table)."""
    if image_tokens < 1:
        raise ValueError(f"image_tokens={image_tokens} must be positive")
    return _evaluate(model_entry(get_model(model).name)["transformer"], image_tokens)


def transformer_flops(model: str, image_tokens: int) -> Flops:
    """One denoising step for ONE image at ``image_tokens`` image tokens (plus the model's
    text tokens), doubled when the model runs classifier-free guidance (SD3 family)."""
    return transformer_forward_flops(model, image_tokens) * _cfg_factor(get_model(model))


def vae_decode_flops(model: str, height: int, width: int) -> Flops:
    """Decoding the latent of a height x width pixel image (latent height/8 x width/8)."""
    spec = get_model(model)
    scale = spec.vae_scale_factor
    for label, value in (("height", height), ("width", width)):
        if value <= 0 or value % scale:
            raise ValueError(f"{label}={value} must be a positive multiple of {scale} (the VAE downsampling factor)")
    area = (height // scale) * (width // scale)
    return _evaluate(model_entry(spec.name)["vae_decode"], area)


def text_encoder_flops(model: str) -> dict[str, Flops]:
    """Each text encoder's cost for ONE prompt (no CFG doubling), by encoder label."""
    encoders = model_entry(get_model(model).name)["text_encoders"]
    return {label: Flops(e["total"], e["linear"]) for label, e in encoders.items()}


def text_encode_flops(model: str) -> Flops:
    """All text encoders for one prompt, doubled when the model runs CFG (the negative
    prompt is encoded too)."""
    spec = get_model(model)
    return sum(text_encoder_flops(spec.name).values(), ZERO) * _cfg_factor(spec)


def baseline_breakdown(model: str, height: int, width: int, steps: int | None = None) -> dict[str, Flops]:
    """Per-component cost of one baseline image: text encoders, ``steps`` full-resolution
    transformer steps (default: the model's baseline steps), one full-resolution decode."""
    spec = get_model(model)
    steps = spec.base_steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    return {
        "text_encoders": text_encode_flops(spec.name),
        "transformer": transformer_flops(spec.name, spec.image_tokens(height, width)) * steps,
        "vae_decode": vae_decode_flops(spec.name, height, width),
    }


def _check_layout(steps: Sequence[int], up_ratio: float) -> None:
    if not 1 <= len(steps) <= 3:
        raise ValueError(f"steps={list(steps)}: RALU runs 1, 2 or 3 stages")
    if any(s < 1 for s in steps):
        raise ValueError(f"steps={list(steps)}: every stage needs at least one step")
    if not 0.0 <= up_ratio <= 1.0:
        raise ValueError(f"up_ratio={up_ratio} must lie in [0, 1]")


def ralu_breakdown(model: str, height: int, width: int, steps: Sequence[int], up_ratio: float) -> dict[str, Flops]:
    """Per-component cost of one RALU image.

    Text encoders; ``steps[k]`` transformer steps at stage k's token count; with a mixed
    stage (three stages) the stage-1 latent is decoded at half size (height/2 x width/2) for
    edge detection; one full-resolution decode at the end.
    """
    spec = get_model(model)
    _check_layout(steps, up_ratio)
    tokens = stage_image_tokens(spec.image_tokens(height, width), up_ratio, len(steps))
    parts = {"text_encoders": text_encode_flops(spec.name)}
    for index, (stage_steps, stage_tokens) in enumerate(zip(steps, tokens), start=1):
        parts[f"transformer_stage_{index}"] = transformer_flops(spec.name, stage_tokens) * stage_steps
    if len(steps) == 3:
        parts["vae_edge_decode"] = vae_decode_flops(spec.name, height // 2, width // 2)
    parts["vae_decode"] = vae_decode_flops(spec.name, height, width)
    return parts


def baseline_flops(model: str, height: int, width: int, steps: int | None = None) -> Flops:
    """One baseline image: text + steps x transformer(M) + full-resolution VAE decode."""
    return sum(baseline_breakdown(model, height, width, steps).values(), ZERO)


def ralu_flops(model: str, height: int, width: int, steps: Sequence[int], up_ratio: float) -> Flops:
    """One RALU image: text + sum_k steps[k] x transformer(tokens_k) + the half-size edge
    decode (three stages only) + full-resolution VAE decode."""
    return sum(ralu_breakdown(model, height, width, steps, up_ratio).values(), ZERO)


def flops_speedup(model: str, height: int, width: int, steps: Sequence[int], up_ratio: float, base_steps: int | None = None) -> Flops:
    """Baseline FLOPs / RALU FLOPs, in each convention."""
    return baseline_flops(model, height, width, base_steps) / ralu_flops(model, height, width, steps, up_ratio)


def max_speedup(model: str, height: int, width: int, up_ratio: float, n_stages: int = 3, base_steps: int | None = None) -> Flops:
    """The speed-up ceiling of a layout: every stage a single step."""
    return flops_speedup(model, height, width, [1] * n_stages, up_ratio, base_steps)
