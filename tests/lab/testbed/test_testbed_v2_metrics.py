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


# Intervals that resample clusters (seeds)
# ----------------------------------------------------------------------------------------


def clustered_values(rng, clusters: int, per_cluster: int, cluster_sd: float, repetitions: int):
    """``(repetitions, clusters * per_cluster)`` values of mean 0: a normal offset shared by
    every item of a cluster (a seed's one noise draw) plus independent item noise."""
    import numpy as np

    offsets = rng.normal(0.0, cluster_sd, size=(repetitions, clusters, 1))
    return (offsets + rng.normal(0.0, 1.0, size=(repetitions, clusters, per_cluster))).reshape(repetitions, -1), np.repeat(np.arange(clusters), per_cluster)


def test_cluster_bootstrap_covers_the_mean_of_clustered_data_and_the_image_bootstrap_does_not():
    """16 clusters of 8 items with a shared offset per cluster (its sd 1.5 against the items'
    1): the cluster interval covers the true mean 0 about 95 % of the time, the image
    bootstrap's (which takes the 128 items as independent) far less (about 55 %)."""
    import numpy as np

    rng = np.random.default_rng(0)
    values, clusters = clustered_values(rng, 16, 8, 1.5, 300)
    covered = {"clusters": 0, "images": 0}
    for i, x in enumerate(values):
        by_cluster = metrics.cluster_mean_interval(x, clusters, n_resamples=300, seed=i)
        by_image = metrics.mean_interval(x, n_resamples=300, seed=i)
        covered["clusters"] += by_cluster.low <= 0.0 <= by_cluster.high
        covered["images"] += by_image.low <= 0.0 <= by_image.high
    assert 0.90 <= covered["clusters"] / len(values) <= 0.99
    assert covered["images"] / len(values) < 0.75


def test_few_clusters_widening_and_the_single_cluster_fallback():
    import numpy as np

    # sqrt(G / (G - 1)) * t_{G-1} / z: the exact t interval of a mean of G normal cluster means
    assert metrics.few_clusters_scale(16, 0.95) == pytest.approx(np.sqrt(16 / 15) * 2.1314 / 1.95996, rel=1e-4)
    assert metrics.few_clusters_scale(2, 0.95) > metrics.few_clusters_scale(8, 0.95) > metrics.few_clusters_scale(16, 0.95) > 1.0
    with pytest.raises(ValueError, match="at least 2 clusters"):
        metrics.few_clusters_scale(1, 0.95)
    # one cluster: the image bootstrap, value for value
    x = np.random.default_rng(1).normal(size=40)
    assert metrics.cluster_mean_interval(x, np.zeros(40, dtype=int)) == metrics.mean_interval(x)
    with pytest.raises(ValueError, match="one id per item"):
        metrics.cluster_mean_interval(x, np.zeros(39, dtype=int))


def test_paired_cluster_bootstrap_cancels_an_offset_both_rows_share():
    """Both rows carry the same large per-cluster offset (one noise draw per seed shared by
    both methods' images): the paired comparison is exactly that of the rows without it and
    finds a difference of 0.3 the rows' own intervals cannot."""
    import numpy as np

    rng = np.random.default_rng(2)
    clusters = np.repeat(np.arange(16), 8)
    offset = np.repeat(rng.normal(0.0, 5.0, 16), 8)
    a, b = rng.normal(0.0, 0.2, 128) + 0.3, rng.normal(0.0, 0.2, 128)
    shared = metrics.paired_cluster_bootstrap(a + offset, b + offset, clusters, higher_is_better=True, names=("A", "B"))
    alone = metrics.paired_cluster_bootstrap(a, b, clusters, higher_is_better=True, names=("A", "B"))
    assert (shared.difference, shared.low, shared.high) == pytest.approx((alone.difference, alone.low, alone.high), abs=1e-9)
    assert shared.verdict == "A better" and shared.low > 0.15
    own = metrics.cluster_mean_interval(a + offset, clusters)
    assert own.high - own.low > 10 * (shared.high - shared.low)


def test_summed_set_metrics_equal_the_plain_ones_and_their_cluster_resamples():
    import numpy as np

    g = torch.Generator().manual_seed(3)
    mix = torch.randn(24, 24, generator=g, dtype=torch.float64)
    reference = torch.randn(300, 24, generator=g, dtype=torch.float64) @ mix + 4.0
    x = torch.randn(90, 24, generator=g, dtype=torch.float64) @ mix * 1.3 + 4.5
    fd = metrics.ReferenceFrechetDistance(reference)
    assert fd(x) == pytest.approx(metrics.feature_frechet_distance(x, reference), rel=1e-9)
    spectra, reference_spectra = torch.rand(90, 32, generator=g, dtype=torch.float64), torch.rand(40, 32, generator=g, dtype=torch.float64)
    spectral = metrics.ReferenceSpectralDistance(reference_spectra)
    assert spectral(spectra) == pytest.approx(metrics.spectral_distance(spectra, reference_spectra), rel=1e-12)
    # added cluster summaries give what the resampled items themselves give
    groups, draws = metrics.cluster_groups(np.repeat(np.arange(9), 10), 90), metrics.cluster_draws(9, 20, 0)
    for items, metric in ((x, fd), (spectra, spectral)):
        fast = metrics._resampled_set_values(items, groups, draws, metric)
        slow = metrics._resampled_set_values(items, groups, draws, lambda subset, metric=metric: metric(subset))
        assert fast == pytest.approx(slow, rel=1e-7)


def test_cluster_set_interval_of_fd_is_not_widened_by_repeated_clusters():
    """FD rises with the share of repeated images, and a cluster resample repeats whole
    clusters: left in, that spreads the resampled FD of 16 iid clusters half again beyond the
    image bootstrap's (about 1.6x); with its trend removed the two are alike."""
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(48, 48, generator=g, dtype=torch.float64) / 7
    fd = metrics.ReferenceFrechetDistance(torch.randn(400, 48, generator=g, dtype=torch.float64) @ mix)
    x = torch.randn(160, 48, generator=g, dtype=torch.float64) @ mix * 1.2
    clusters = torch.arange(16).repeat_interleave(10)
    by_cluster = metrics.cluster_set_interval(x, clusters, fd, n_resamples=100)
    by_image = metrics.set_interval(x, fd, n_resamples=100)
    assert by_cluster.low <= by_cluster.value <= by_cluster.high
    assert (by_cluster.high - by_cluster.low) < 1.3 * (by_image.high - by_image.low)


def test_paired_cluster_set_bootstrap(scenes):
    a, b = scenes
    spectral = metrics.ReferenceSpectralDistance(metrics.radial_power_spectrum(b))
    spectra, blurred = metrics.radial_power_spectrum(a), metrics.radial_power_spectrum(blur(a))
    clusters = torch.arange(8).repeat_interleave(6)
    clear = metrics.paired_cluster_set_bootstrap(spectra, blurred, clusters, spectral, higher_is_better=False, n_resamples=100, names=("sharp", "blurred"))
    assert clear.verdict == "sharp better" and clear.high < 0
    same = metrics.paired_cluster_set_bootstrap(spectra, spectra.clone(), clusters, spectral, higher_is_better=False, n_resamples=100)
    assert same.verdict == metrics.NOT_SEPARABLE and same.difference == 0.0
    with pytest.raises(ValueError, match="same number"):
        metrics.paired_cluster_set_bootstrap(spectra, spectra[:5], clusters, spectral, higher_is_better=False)


def test_cluster_mean_interval_stays_within_the_values_range():
    # two seeds widen the interval about 9-fold: an accuracy's interval must still stay in [0, 1]
    import numpy as np

    right = np.array([1.0] * 7 + [0.0] + [1.0] * 8)
    interval = metrics.cluster_mean_interval(right, np.repeat([0, 1], 8), n_resamples=200)
    assert 0.0 <= interval.low <= interval.value <= interval.high <= 1.0
    assert interval.low < interval.value
