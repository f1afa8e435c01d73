"""Noise injection at a resolution change (docs/method.md §3), family-independent.

At the transition from stage k (ending at progress time e) to stage k+1 (starting at s) the
canvas (which already *is* the nearest-upsampled latent ``Up(x_e)``, see
:mod:`ralu.runtime.tokens`) becomes ``a * Up(x_e) + b * z`` with ``a, b`` from
:func:`ralu.runtime.schedule.transition`, and ``z`` chosen per latent pixel so that the
result is exactly on the rectified-flow path at s (mean ``s * Up(x0)``, per-element
variance ``(1 - s)^2`` and no correlation inside upsampled blocks):

* pixels upsampled at this transition: every half-size pixel's value now sits in a 2x2
  block (4 places, covariance J); ``z`` has covariance ``I - c J`` on each block, drawn in
  O(n) as ``eps + ((sqrt(1 - 4c) - 1) / 4) * sum(eps over the block)``;
* pixels that stay low-res: ``sqrt(1 - c) * (sum of eps over the block) / 2`` (one
  N(0, 1 - c) value per half-size pixel, kept blockwise constant on the canvas);
* pixels already at full resolution: ``sqrt(1 - c) * eps``.

``eps`` is one full-resolution N(0, I) draw per image per transition, so the number of
random numbers drawn never depends on which tokens were selected: image i with generator
g_i gives the same noise alone or in a batch.  Nothing here builds a covariance matrix.
"""

from __future__ import annotations

import math

import torch

from .compat import PaperCompat
from .schedule import TransitionCoefficients
from .tokens import block_sum, expand_mask, upsample_nearest


def _check_c(c: float) -> None:
    if not 0.0 < c <= 0.25:
        raise ValueError(f"c={c} is outside (0, 1/4]: I - cJ is not a covariance there")


def group_sum(x: torch.Tensor, repeat_tokens: bool = False) -> torch.Tensor:
    """For every pixel, the sum of ``x`` over the group of 4 pixels that one half-size value
    was copied to, broadcast back to ``x``'s shape ``(B, C, H, W)``.

    Nearest upsampling: the 2x2 pixel block.  Token repetition (``repeat_tokens``): the four
    pixels with the same offset inside the four children of one low-res token.
    """
    b, c, h, w = x.shape
    if repeat_tokens:
        grouped = x.reshape(b, c, h // 4, 2, 2, w // 4, 2, 2)
        return grouped.sum(dim=(3, 6), keepdim=True).expand_as(grouped).reshape(b, c, h, w)
    return upsample_nearest(block_sum(x))


def correlated_noise(eps: torch.Tensor, c: float, repeat_tokens: bool = False) -> torch.Tensor:
    """``z = eps + ((sqrt(1 - 4c) - 1) / 4) * group_sum(eps)``: covariance exactly ``I - c J``
    on every group of 4 (``J`` the all-ones matrix), independent across groups."""
    _check_c(c)
    return eps + ((math.sqrt(1.0 - 4.0 * c) - 1.0) / 4.0) * group_sum(eps, repeat_tokens)


def repeat_upsample(canvas: torch.Tensor) -> torch.Tensor:
    """Token repetition instead of nearest upsampling: every low-res token's 2x2 half-size
    pixels tiled over its 4x4 cell ([a b a b; c d c d; ...]).  Reads the half-size latent
    from a canvas in nearest form."""
    half = canvas[:, :, ::2, ::2]
    b, c, h, w = half.shape
    tiled = half.reshape(b, c, h // 2, 1, 2, w // 2, 1, 2).expand(b, c, h // 2, 2, 2, w // 2, 2, 2)
    return tiled.reshape(b, c, 2 * h, 2 * w)


_GLOBAL_DRAWS: dict[tuple, torch.Tensor] = {}


def global_correlated_noise(shape: tuple[int, int, int], c: float, repeat_tokens: bool, device, dtype) -> torch.Tensor:
    """Published-script behaviour: one correlated draw ``(C, H, W)`` from the *global* torch
    RNG, made on first use in this process and reused for every image and call."""
    key = (tuple(shape), float(c), bool(repeat_tokens))
    if key not in _GLOBAL_DRAWS:
        _GLOBAL_DRAWS[key] = correlated_noise(torch.randn(1, *shape), c, repeat_tokens)[0]
    return _GLOBAL_DRAWS[key].to(device=device, dtype=dtype)


def clear_global_noise() -> None:
    """Forget the reused global draws (the next ``global_noise`` transition draws anew)."""
    _GLOBAL_DRAWS.clear()


def renoise(
    canvas: torch.Tensor,
    was_full: torch.Tensor,
    now_full: torch.Tensor,
    coefficients: TransitionCoefficients,
    eps: torch.Tensor,
    c: float,
    compat: PaperCompat = PaperCompat(),
) -> torch.Tensor:
    """Upsample and re-noise a canvas at a transition.

    ``canvas``: ``(B, C, H, W)`` float, ``Up(x_e)`` in nearest form; ``was_full``/``now_full``:
    ``(B, H/4, W/4)`` bool token masks before and after (``now_full`` must include
    ``was_full``); ``eps``: ``(B, C, H, W)`` N(0, I), one draw per image.  Returns the new
    canvas ``a * Up(x_e) + b * z`` (low-res parts stay blockwise constant).
    """
    _check_c(c)
    if bool((was_full & ~now_full).any()):
        raise ValueError("a token cannot go back from full to low resolution")
    newly = expand_mask(now_full & ~was_full, 4)[:, None]
    stays_full = expand_mask(was_full, 4)[:, None]
    signal = canvas
    if compat.repeat_tokens:
        signal = torch.where(newly, repeat_upsample(canvas), canvas)
    if compat.global_noise:
        z_new = global_correlated_noise(tuple(canvas.shape[1:]), c, compat.repeat_tokens, canvas.device, canvas.dtype)
        z_new = z_new.expand_as(canvas)
    else:
        z_new = correlated_noise(eps, c, compat.repeat_tokens)
    keep = 1.0 if compat.unit_noise else math.sqrt(1.0 - c)
    z_low = upsample_nearest(block_sum(eps) / 2.0)
    z = torch.where(newly, z_new, keep * torch.where(stays_full, eps, z_low))
    return coefficients.signal_scale * signal + coefficients.noise_scale * z
