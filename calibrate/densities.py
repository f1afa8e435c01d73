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

from .progress_model import load_progress_model

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


# ----------------------------------------------------------------------------------------
# The progress-aware objective (docs/method.md §4b).  Not a comparison of normalised
# densities: it counts steps, where they land, and what each re-noising keeps and erases.
# ----------------------------------------------------------------------------------------

#: g: RMS error of a low-resolution stage's estimate relative to the data's, as far as the
#: scores J is fitted to see it (docs/method.md §4b, "fitted terms"); the fit's file holds it.
RESOLUTION_GAP = load_progress_model().resolution_gap
#: rho: a step's error is uniform in ``u = F_{rho h0}(t)``; the fit's file holds it.
SHIFT_RATIO = load_progress_model().shift_ratio


def stage_grid(steps: int, start, end, shift) -> np.ndarray:
    """The ``steps + 1`` progress times one stage walks through, ``(..., steps + 1)``:
    :func:`visited_timesteps`'s grid with the stage end included."""
    shift = np.asarray(shift, dtype=float)[..., None]
    u_start = unshift_sigma(1.0 - np.asarray(start, dtype=float)[..., None], shift)
    u_end = unshift_sigma(1.0 - np.asarray(end, dtype=float)[..., None], shift)
    fraction = np.arange(steps + 1) / steps
    return 1.0 - shift_sigma(u_start + (u_end - u_start) * fraction, shift)


def discretisation_error(steps, starts, ends, shifts, h0: float, shift_ratio: float = SHIFT_RATIO) -> np.ndarray:
    """Per stage, the sum over its Euler steps of ``(Delta u)^2`` with ``u = F_{rho h0}(t)``,
    ``rho = shift_ratio``: ``(..., K)``.

    ``u`` is the coordinate in which a step's error is taken to be the same everywhere: the
    grid of shift ``rho h0`` is uniform in it (rho = 1: the base model's own grid), and an
    Euler step's local error grows with the square of its length.  N equal steps over all
    of [0, 1] give ``1/N`` (50 steps 0.02): more steps, less error.
    """
    errors = []
    for k, n in enumerate(np.asarray(steps, dtype=int)):
        u = shifted_cdf(stage_grid(int(n), starts[..., k], ends[..., k], shifts[..., k]), shift_ratio * h0)
        errors.append((np.diff(u, axis=-1) ** 2).sum(axis=-1))
    return np.stack(errors, axis=-1)


def resolution_change_fractions(n_stages: int, up_ratio: float) -> tuple[float, ...]:
    """Fraction of the image's tokens that reach full resolution at the start of each stage
    after the first: two stages (low, full) all of them; three (low, mixed, full) ``r``
    into the mixed stage and ``1 - r`` into the full one."""
    if n_stages == 1:
        return ()
    if n_stages == 2:
        return (1.0,)
    if n_stages == 3:
        return (float(up_ratio), 1.0 - float(up_ratio))
    raise ValueError(f"{n_stages} stages: the progress objective knows the runtime's 1, 2 and 3-stage layouts")


def progress_error(steps, starts, ends, shifts, z, h0: float, up_ratio: float = 0.3, gap: float = RESOLUTION_GAP, shift_ratio: float = SHIFT_RATIO) -> np.ndarray:
    """The progress-aware objective ``(...,)`` (docs/method.md §4b):

        J = sum_k Z^-(K - k) [ E_k + g sqrt(q_k) s_k / (1 - s_k) ]

    ``E_k`` the stage's :func:`discretisation_error` (in ``u = F_{rho h0}``); at the start ``s_k`` of a later stage
    the tokens arriving at full resolution (fraction ``q_k``) bring a low-resolution
    estimate whose error, relative to the noise there, is ``g s_k / (1 - s_k)``; and every
    re-noising divides the error-to-noise ratio of everything before it by ``Z = 1/sqrt(c)``.
    """
    z = np.asarray(z, dtype=float)
    n_stages = len(np.asarray(steps))
    error = discretisation_error(steps, starts, ends, shifts, h0, shift_ratio)
    fractions = resolution_change_fractions(n_stages, up_ratio)
    total = 0.0
    for k in range(n_stages):
        stage = error[..., k]
        if k > 0:
            s = starts[..., k]
            stage = stage + gap * np.sqrt(fractions[k - 1]) * s / (1.0 - s)
        total = total + stage * z ** (-(n_stages - 1 - k))
    return np.asarray(total, dtype=float)
