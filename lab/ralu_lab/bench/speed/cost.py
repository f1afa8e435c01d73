"""FLOPs of the configuration that runs, and of the real architectures beside it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ralu.calibrate.flops.counting import count_flops, fit_quadratic
from ralu.calibrate.flops.pricing import (
    ZERO,
    Flops,
    evaluate_quadratic,
    transformer_forward_flops,
)
from ralu.calibrate.presets import presets_with_speedup
from ralu_lab.bench.speed.config import (
    BenchConfig,
    FamilyConfig,
    full_width_families,
)
from ralu_lab.bench.speed.models import build_transformer, build_vae, vae_latent

#: Square token grids the transformer polynomial is fitted at, and a non-square check grid.
_FIT_GRIDS = ((8, 8), (16, 16), (24, 24))
_CHECK_GRID = (12, 20)


def _meta_inputs(family: FamilyConfig, rows: int, cols: int) -> dict:
    """One evaluation's inputs on the meta device (the family adapter's, CFG batch included)."""
    return family.adapter.inputs(family, rows, cols, lambda *shape: torch.empty(*shape, device="meta"), "meta")


def forward_flops_model(family: FamilyConfig) -> Callable[[int], Any]:
    """``tokens -> Flops`` of one transformer evaluation of the benchmarked model at ``tokens``
    generated image tokens (CFG batch and Kontext's reference tokens included), exact: counted on the meta device at three sizes, a quadratic through them,
    checked at a fourth (the same method as :mod:`ralu.calibrate.flops`)."""
    model = build_transformer(family, "meta")
    xs = [rows * cols for rows, cols in _FIT_GRIDS]
    counts = [count_flops(model, **_meta_inputs(family, rows, cols)) for rows, cols in _FIT_GRIDS]
    check = count_flops(model, **_meta_inputs(family, *_CHECK_GRID))
    coefficients = {}
    for convention in ("total", "linear"):
        fitted = [float(c) for c in fit_quadratic(xs, [getattr(c, convention) for c in counts])]
        predicted = evaluate_quadratic(fitted, _CHECK_GRID[0] * _CHECK_GRID[1])
        if abs(predicted - getattr(check, convention)) > 1e-9 * getattr(check, convention):
            raise RuntimeError(f"{family.family} forward FLOPs ({convention}) are not quadratic in the token count")
        coefficients[convention] = fitted
    return lambda tokens: Flops(evaluate_quadratic(coefficients["total"], tokens), evaluate_quadratic(coefficients["linear"], tokens))


def edge_decode_flops(config: BenchConfig, family: str):
    """One half-size decode (the edge detection's) with the benchmarked VAE."""

    vae = build_vae(config, family, "meta")
    spec = config.family(family)
    side = spec.half_latent_side(config.size)
    return count_flops(vae.decode, vae_latent(spec, torch.empty(1, spec.spec.latent_channels, side, side, device="meta")))


def paper_speedup(schedule) -> float | None:
    steps = tuple(stage.steps for stage in schedule.stages)
    for layout in presets_with_speedup(schedule.model):
        if layout.steps == steps and math.isclose(layout.up_ratio, schedule.up_ratio):
            return layout.speedup
    return None


def real_transformer_bytes(family: FamilyConfig) -> int:
    """Bytes of the real model's transformer weights in bfloat16 (counted on the meta device)."""
    real = next(f for f in full_width_families() if f.family == family.family)
    return 2 * sum(parameter.numel() for parameter in build_transformer(real, "meta").parameters())


def real_attention_share(model: str, tokens: int) -> float:
    flops = transformer_forward_flops(model, tokens)
    return flops.attention / flops.total


def ralu_config_flops(forward, stage_tokens: list[int], steps: list[int], edge):
    """FLOPs of a RALU call as configured: every stage's forwards at its token count, plus the
    edge decode (``edge``; ``ZERO`` for schedules without one)."""
    return sum((forward(n) * s for n, s in zip(stage_tokens, steps)), start=ZERO) + edge


def equal_cost_steps(forward, full_tokens: int, ralu_flops, most: int) -> int:
    """Steps (1 .. ``most``) of the plain pipeline whose FLOPs are closest, by ratio, to
    ``ralu_flops`` (total convention): the plain row of the same budget."""
    per_step = forward(full_tokens).total
    return min(range(1, most + 1), key=lambda k: abs(math.log(k * per_step / ralu_flops.total)))
