"""Timestep distributions of NT-DM (docs/method.md §4) and the Jensen-Shannon measures.

Everything is in progress time t in [0, 1] (0 = noise, 1 = data).  Functions broadcast:
stage parameters may carry leading batch axes (one row per candidate of a population
search), the grid is the last axis.

Two forms of the realised distribution P:

* ``continuous`` (the paper's): each stage contributes its truncated shifted density
  ``f_{h_k, s_k, e_k}`` with weight ``N_k``; compared with P_target on a grid of points.
* ``discrete``: the timesteps the runtime really evaluates (``N_k`` points per stage, from
  :func:`ralu.runtime.schedule.stage_sigmas`), one unit of mass each, compared with
  P_target on ``bins`` bins of equal P_target mass (default: one bin per evaluation).  It
  is zero exactly when every bin receives the same number of model evaluations; it is
  piecewise constant in the shifts, so only the global (population) search moves on it.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import jensenshannon

from ralu.runtime.schedule import shift_sigma, unshift_sigma

#: The published script clips both distributions here before renormalising.
DENSITY_FLOOR = 1e-10


def shifted_density(t: np.ndarray, shift: np.ndarray | float) -> np.ndarray:
    """``f_h(t) = h / (1 + (h - 1) t)^2``: density of progress time under a shift-h grid."""
    return shift / (1.0 + (shift - 1.0) * t) ** 2


def shifted_cdf(t: np.ndarray, shift: np.ndarray | float) -> np.ndarray:
    """``F_h(t) = h t / (1 + (h - 1) t)``."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def truncated_density(t: np.ndarray, shift, start, end) -> np.ndarray:
    """``f_{h,s,e}``: ``f_h`` restricted to ``[s, e]`` and renormalised; 0 elsewhere."""
    shift, start, end = (np.asarray(v, dtype=float)[..., None] for v in (shift, start, end))
    mass = shifted_cdf(end, shift) - shifted_cdf(start, shift)
    inside = (t >= start) & (t <= end)
    return np.where(inside, shifted_density(t, shift) / mass, 0.0)


def truncated_cdf(t: np.ndarray, shift, start, end) -> np.ndarray:
    """CDF of :func:`truncated_density`."""
    shift, start, end = (np.asarray(v, dtype=float)[..., None] for v in (shift, start, end))
    low = shifted_cdf(start, shift)
    mass = shifted_cdf(end, shift) - low
    return np.clip((shifted_cdf(np.clip(t, start, end), shift) - low) / mass, 0.0, 1.0)


def overlap_weights(ends: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``e_k - s_{k+1}``: progress time denoised twice at each transition. Shape (..., K-1)."""
    return ends[..., :-1] - starts[..., 1:]


def target_density(t: np.ndarray, h0: float, ends: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """P_target: the base schedule plus the overlaps, each at the base shift.

    ``[f_{h0}(t) + sum_k (e_k - s_{k+1}) f_{h0, s_{k+1}, e_k}(t)] / [1 + sum_k (e_k - s_{k+1})]``
    """
    weights = overlap_weights(ends, starts)
    density = shifted_density(t, h0) * np.ones(weights.shape[:-1] + (1,))
    # Total mass summed left to right, as the published optimiser does: its finite-difference
    # gradients see last-bit differences, and this keeps its search path (see search.py).
    mass = 1.0
    for k in range(weights.shape[-1]):
        density = density + weights[..., k, None] * truncated_density(t, h0, starts[..., k + 1], ends[..., k])
        mass = mass + weights[..., k]
    return density / np.asarray(mass)[..., None]


def target_cdf(t: np.ndarray, h0: float, ends: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """CDF of :func:`target_density`, exact."""
    weights = overlap_weights(ends, starts)
    cdf = shifted_cdf(t, h0) * np.ones(weights.shape[:-1] + (1,))
    for k in range(weights.shape[-1]):
        cdf = cdf + weights[..., k, None] * truncated_cdf(t, h0, starts[..., k + 1], ends[..., k])
    return cdf / (1.0 + weights.sum(axis=-1))[..., None]


def realised_density(t: np.ndarray, steps: np.ndarray, starts, ends, shifts) -> np.ndarray:
    """Continuous P(t) = sum_k N_k f_{h_k, s_k, e_k}(t) / sum_k N_k."""
    steps = np.asarray(steps, dtype=float)
    density = 0.0
    for k in range(steps.shape[-1]):
        density = density + steps[..., k, None] * truncated_density(t, shifts[..., k], starts[..., k], ends[..., k])
    return density / steps.sum(axis=-1)[..., None]


def visited_timesteps(steps: np.ndarray, starts, ends, shifts) -> np.ndarray:
    """Progress times at which the model is evaluated: ``N_k`` per stage, ``(..., sum N)``.

    The same grid as :func:`ralu.runtime.schedule.stage_sigmas` (vectorised): uniform in the
    un-shifted sigma between the stage bounds, shifted, last point (the stage end) dropped.
    """
    points = []
    for k, n in enumerate(np.asarray(steps, dtype=int)):
        h = shifts[..., k, None]
        u_start = unshift_sigma(1.0 - starts[..., k, None], h)
        u_end = unshift_sigma(1.0 - ends[..., k, None], h)
        fraction = np.arange(n) / n
        points.append(1.0 - shift_sigma(u_start + (u_end - u_start) * fraction, h))
    return np.concatenate(points, axis=-1)


def equal_mass_bin_masses(visited: np.ndarray, h0: float, ends: np.ndarray, starts: np.ndarray, bins: int) -> np.ndarray:
    """Fraction of visited timesteps in each of ``bins`` bins of equal P_target mass.

    A timestep t falls in bin ``floor(bins * F_target(t))``, with the exact target CDF, so
    a schedule whose evaluations sit at the target's quantiles scores exactly zero.
    """
    quantiles = target_cdf(visited, h0, ends, starts)
    index = np.clip(np.floor(quantiles * bins + 1e-9).astype(int), 0, bins - 1)
    flat = index.reshape(-1, index.shape[-1])
    counts = np.stack([np.bincount(row, minlength=bins) for row in flat])
    return (counts / visited.shape[-1]).reshape(index.shape[:-1] + (bins,))


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon DISTANCE (natural log) of two discretised densities or masses.

    As the published script: both clipped at 1e-10 and renormalised first.  This is what
    the paper calls "JSD"; square it for the divergence (:func:`js_divergence`).
    """
    p = np.clip(p, DENSITY_FLOOR, None)
    q = np.clip(q, DENSITY_FLOOR, None)
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    # Identical inputs can round the divergence to a tiny negative number; scipy then
    # returns NaN from the square root.  The inputs are clipped positive, so NaN means 0.
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(jensenshannon(p, q, axis=-1), nan=0.0)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon DIVERGENCE (natural log), in [0, ln 2]: ``js_distance**2``."""
    return js_distance(p, q) ** 2
