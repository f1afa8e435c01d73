"""docs/method.md §4: the densities, the target, and the Jensen-Shannon measures."""

import math

import numpy as np
import pytest

from ralu.calibrate.densities import (
    equal_mass_bin_masses,
    js_distance,
    js_divergence,
    realised_density,
    shifted_cdf,
    shifted_density,
    target_cdf,
    target_density,
    visited_timesteps,
)
from ralu.calibrate.presets import preset
from ralu.calibrate.search import NTDMObjective, StageLayout
from ralu.runtime.schedule import stage_sigmas, stage_starts

LAYOUTS = [(p.steps, p.ends, p.c) for p in (preset("flux-dev-4x"), preset("flux-dev-7x"))] + [((4, 9), (0.4, 1.0), 0.2)]


def arrays(steps, ends, c, shifts):
    starts = np.array([stage_starts(list(ends), c)])
    return np.array(steps), starts, np.array([ends]), np.array([shifts])


def integrate(t, f):
    return float(np.sum((f[..., 1:] + f[..., :-1]) / 2 * np.diff(t)))


def test_shifted_density_is_derivative_of_cdf_and_matches_sigma_grid():
    t = np.linspace(0, 1, 2001)
    for h in (0.5, 1.0, 3.158, 9.0):
        numeric = np.gradient(shifted_cdf(t, h), t)
        np.testing.assert_allclose(numeric[1:-1], shifted_density(t, h)[1:-1], rtol=2e-4)
        assert shifted_cdf(1.0, h) == pytest.approx(1.0)
    # Uniform un-shifted sigmas mapped by the shift are F_h-quantiles in progress time.
    sigmas = stage_sigmas(10, 0.0, 1.0, 3.0)
    np.testing.assert_allclose(shifted_cdf(1 - sigmas, 3.0), np.linspace(0, 1, 11), atol=1e-12)


@pytest.mark.parametrize("steps, ends, c", LAYOUTS)
def test_target_and_realised_integrate_to_one(steps, ends, c):
    steps, starts, ends, shifts = arrays(steps, ends, c, [4.0, 2.5, 2.0][: len(steps)])
    t = np.linspace(0, 1, 400001)
    assert integrate(t, target_density(t, 3.0, ends, starts)[0]) == pytest.approx(1.0, abs=2e-4)
    assert integrate(t, realised_density(t, steps, starts, ends, shifts)[0]) == pytest.approx(1.0, abs=2e-4)
    assert target_cdf(np.array([0.0, 1.0]), 3.0, ends, starts)[0] == pytest.approx([0.0, 1.0])


def test_target_cdf_is_integral_of_density():
    steps, starts, ends, shifts = arrays((2, 3, 5), (0.2, 0.3, 1.0), 0.05, [8, 3, 2])
    t = np.linspace(0, 1, 200001)
    density = target_density(t, 3.158, ends, starts)[0]
    cumulative = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(t))])
    np.testing.assert_allclose(cumulative[::1000], target_cdf(t, 3.158, ends, starts)[0][::1000], atol=2e-4)


def test_overlaps_raise_target_inside_them():
    c = 0.05
    steps, starts, ends, shifts = arrays((2, 3, 5), (0.2, 0.3, 1.0), c, [8, 3, 2])
    t = np.array([0.5 * (starts[0, 1] + 0.2), 0.9])
    base = shifted_density(t, 3.0)
    overlap = (0.2 - starts[0, 1]) + (0.3 - starts[0, 2])
    target = target_density(t, 3.0, ends, starts)[0]
    assert target[1] == pytest.approx(base[1] / (1 + overlap))  # outside every overlap
    assert target[0] > base[0] / (1 + overlap)


def test_zero_divergence_when_realised_equals_target():
    # One full-range stage with the base shift realises exactly the base distribution.
    problem = NTDMObjective(StageLayout((28,), (1.0,)), h0=3.0)
    assert problem([3.0, 50.0]) == pytest.approx(0.0, abs=1e-7)
    assert problem([2.0, 50.0]) > 0.01
    discrete = NTDMObjective(StageLayout((28,), (1.0,)), h0=3.0, objective="discrete")
    assert discrete([3.0, 50.0]) == pytest.approx(0.0, abs=1e-7)
    assert discrete([6.0, 50.0]) > 0.1


def test_js_distance_and_divergence_are_named_right():
    rng = np.random.default_rng(0)
    p, q = rng.random(50), rng.random(50)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    divergence = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert js_divergence(p, q) == pytest.approx(divergence, rel=1e-10)
    assert js_distance(p, q) == pytest.approx(math.sqrt(divergence), rel=1e-10)
    assert js_distance(p, p) == pytest.approx(0.0, abs=1e-7)
    assert js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(math.log(2), rel=1e-6)


def test_visited_timesteps_are_the_runtime_grid():
    steps, starts, ends, shifts = arrays((2, 3, 5), (0.2, 0.3, 1.0), 0.03, [8.1, 2.9, 2.2])
    visited = visited_timesteps(steps, starts, ends, shifts)[0]
    expected = np.concatenate([1 - stage_sigmas(n, s, e, h)[:-1] for n, s, e, h in zip(steps, starts[0], ends[0], shifts[0])])
    np.testing.assert_allclose(visited, expected, atol=1e-14)


def test_equal_mass_bins_count_target_quantiles():
    steps, starts, ends, shifts = arrays((2, 3, 5), (0.2, 0.3, 1.0), 0.03, [8.1, 2.9, 2.2])
    fine = np.linspace(0, 1, 100001)
    quantile_of = target_cdf(fine, 3.158, ends, starts)[0]
    # Points placed in the middle of bins 0, 0, 3 and 9 of 10 equal-mass bins.
    points = np.interp([0.02, 0.07, 0.35, 0.95], quantile_of, fine)[None, :]
    masses = equal_mass_bin_masses(points, 3.158, ends, starts, 10)[0]
    np.testing.assert_allclose(masses, [0.5, 0, 0, 0.25, 0, 0, 0, 0, 0, 0.25])
