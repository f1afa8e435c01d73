"""Testbed v2's metrics on inputs whose answer is known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ralu_lab.testbed.v2 import data, metrics
from ralu_lab.testbed.v2.classifier import Classifier


@pytest.fixture(scope="module")
def scenes():
    a, _ = data.make_batch(31, 48)
    b, _ = data.make_batch(32, 48)
    return a, b


def blur(images):
    return F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def test_spectral_distance_is_zero_for_identical_sets_and_sees_lost_detail(scenes):
    a, b = scenes
    assert metrics.spectral_distance(a, a) == 0.0
    same_kind = metrics.spectral_distance(a, b)
    blurred = metrics.spectral_distance(blur(a), b)
    upsampled = metrics.spectral_distance(F.interpolate(data.downsample(a), scale_factor=2, mode="nearest"), b)
    assert 0.0 < same_kind < 0.25 < blurred and same_kind < upsampled


def test_radial_spectrum_peaks_at_the_period_of_stripes():
    labels = torch.tensor([[0, 0, 0, 0, 0, period, 0] for period in range(3)])
    images, _, geometry = data.make_batch(3, 0, labels=labels, return_geometry=True)
    spectrum = metrics.radial_power_spectrum(images)
    assert spectrum.shape == (3, 32)
    for i in range(3):
        ring = spectrum[i, 3:].argmax().item() + 4  # rings start at radius 1; skip the shape's low radii
        assert abs(ring - 64 / geometry.period[i].item()) <= 1.0


def test_frechet_distance_small_for_the_same_distribution(scenes):
    a, b = scenes
    torch.manual_seed(0)
    fd = metrics.FrechetDistance(Classifier().eval(), reference=b)
    same, other, blurred = fd(b), fd(a), fd(blur(a))
    assert same == pytest.approx(0.0, abs=1e-3)
    assert other < blurred
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    assert metrics.feature_frechet_distance(x, y) < 0.5
    assert metrics.feature_frechet_distance(x + 1.0, y) > 8.0  # |shift|^2 = 8


def test_frechet_distance_of_two_free_sets_equals_torchmetrics():
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(16, 16, generator=g, dtype=torch.float64)
    x = torch.randn(400, 16, generator=g, dtype=torch.float64) @ mix
    y = torch.randn(300, 16, generator=g, dtype=torch.float64) * 2.0 + 0.5
    for a, b in ((x, y), (y, x), (x, x[:200] * 1.5)):
        assert metrics.frechet_distance(a, b) == pytest.approx(metrics.feature_frechet_distance(a, b), rel=1e-6)
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_psnr_ssim_and_blocking_on_known_images(scenes):
    a, b = scenes
    assert torch.all(metrics.psnr(a, a) == metrics.PSNR_CAP) and torch.allclose(metrics.ssim(a, a), torch.ones(48))
    assert torch.all(metrics.psnr(a, b) < 30) and torch.all(metrics.ssim(a, b) < 0.9)
    noisy = (a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert torch.all(metrics.psnr(noisy, a) > metrics.psnr(b, a))
    block = metrics.BLOCK_PX
    nearest = F.interpolate(F.avg_pool2d(a, block), scale_factor=block, mode="nearest")
    assert metrics.blocking(nearest).mean() > 0.9
    assert metrics.blocking(a).abs().mean() < 0.2


def test_attribute_accuracy_per_attribute_fine_and_all():
    labels = data.balanced_labels(4)
    predicted = labels.clone()
    predicted[0, 5] = (predicted[0, 5] + 1) % 3  # one period wrong
    predicted[1, 0] = (predicted[1, 0] + 1) % 4  # one shape wrong
    result = metrics.attribute_accuracy(predicted, labels)
    assert result["period"] == 0.75 and result["shape"] == 0.75 and result["colour"] == 1.0
    assert result["fine"] == 0.75 and result["all"] == 0.5
    # marks are drawn but never prompted: scored only when asked for (the classifier's own record)
    predicted[2, 6] = (predicted[2, 6] + 1) % 3
    assert "marks" not in metrics.attribute_accuracy(predicted, labels) and metrics.attribute_accuracy(predicted, labels)["all"] == 0.5
    with_marks = metrics.attribute_accuracy(predicted, labels, data.ATTRIBUTES)
    assert with_marks["marks"] == 0.75 and with_marks["all"] == 0.25


def test_paired_bootstrap_separates_clear_differences_and_not_identical_methods():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, generator=g)
    better = base + 0.3 + 0.1 * torch.randn(200, generator=g)
    clear = metrics.paired_bootstrap(better, base, higher_is_better=True, names=("RALU", "fewer steps"))
    assert clear.verdict == "RALU better" and clear.low > 0.2
    lower_wins = metrics.paired_bootstrap(better, base, higher_is_better=False, names=("RALU", "fewer steps"))
    assert lower_wins.verdict == "fewer steps better"
    same = metrics.paired_bootstrap(base, base, higher_is_better=True)
    assert same.verdict == metrics.NOT_SEPARABLE and not same.separable and same.difference == 0.0
    noise_only = metrics.paired_bootstrap(base + 0.01 * torch.randn(200, generator=g), base, higher_is_better=True)
    assert noise_only.verdict == metrics.NOT_SEPARABLE
    interval = metrics.mean_interval(better)
    assert interval.low < interval.value < interval.high


def test_paired_set_bootstrap_for_set_metrics(scenes):
    a, b = scenes
    reference = metrics.radial_power_spectrum(b)
    spectra, blurred = metrics.radial_power_spectrum(a), metrics.radial_power_spectrum(blur(a))

    def distance(subset):
        return metrics.spectral_distance(subset, reference)

    clear = metrics.paired_set_bootstrap(spectra, blurred, distance, higher_is_better=False, n_resamples=100, names=("sharp", "blurred"))
    assert clear.verdict == "sharp better" and clear.high < 0
    same = metrics.paired_set_bootstrap(spectra, spectra.clone(), distance, higher_is_better=False, n_resamples=100)
    assert same.verdict == metrics.NOT_SEPARABLE
    with pytest.raises(ValueError, match="same number"):
        metrics.paired_set_bootstrap(spectra, spectra[:5], distance, higher_is_better=False)


def test_set_interval_of_an_upward_biased_metric_contains_its_value():
    """A resample repeats items, which inflates FD-like metrics: the plain percentile interval
    of |mean|^2 of zero-mean features lies above the value; the interval moved by the
    bootstrap's bias holds it, with the same width."""
    import numpy as np

    features = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def squared_mean(x):
        return float(x.mean(0).pow(2).sum())

    interval = metrics.set_interval(features, squared_mean, n_resamples=300)
    assert interval.low <= interval.value <= interval.high
    boot = [squared_mean(features[torch.as_tensor(np.random.default_rng(i).integers(0, 64, 64))]) for i in range(300)]
    assert np.quantile(boot, 0.025) > interval.value  # what the plain percentile interval would have said
    assert interval.high - interval.low == pytest.approx(np.quantile(boot, 0.975) - np.quantile(boot, 0.025), rel=0.3)
