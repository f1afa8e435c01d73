"""Metrics of the v2 rows pooled over seeds, with bootstrap intervals, the spread across
seeds, paired verdicts between rows and the regime check.

Per seed, :func:`ralu_lab.testbed.v2.evaluate.method_metrics` gives every metric of a
row's images (its per-seed values make the spread across seeds); the per-image values
(PSNR, SSIM, blocking, which attributes were read right, classifier features, radial spectra)
are kept so that the images of all seeds can be pooled and resampled.  Means over images get
a percentile bootstrap interval (:func:`ralu_lab.testbed.v2.metrics.mean_interval`), set
metrics (FD, spectral distance) one over resampled images (``set_interval``); two rows are
compared image by image (same noise and labels) with ``paired_bootstrap`` /
``paired_set_bootstrap``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ralu_lab.testbed.v2 import data, metrics
from ralu_lab.testbed.v2.classifier import predict
from ralu_lab.testbed.v2.evaluate import method_metrics

#: The judged metrics: key, label, higher is better, per image ("image") or of a set ("set").
METRICS: tuple[tuple[str, str, bool, str], ...] = (
    ("fd", "FD", False, "set"),
    ("spectral_distance", "spectral distance", False, "set"),
    ("fine_accuracy", "fine accuracy", True, "image"),
    ("accuracy", "accuracy (all 6 asked)", True, "image"),
    ("psnr", "PSNR (dB)", True, "image"),
    ("ssim", "SSIM", True, "image"),
    ("blocking", "blocking", False, "image"),
)
#: Reported per row, not judged: accuracy of each attribute.
ATTRIBUTE_METRICS = tuple(f"accuracy_{name}" for name in data.PROMPT_ATTRIBUTES)
#: The regime check's metrics (issue: FD, fine accuracy, spectral distance).
REGIME_METRICS = ("fd", "fine_accuracy", "spectral_distance")
#: Each ``--schedule`` row meets every other row of its budget on these metrics: a schedule is
#: "at least as good as every row" when no row beats it on any of them with 95 % confidence.
SCHEDULE_METRICS = ("fd", "fine_accuracy", "accuracy", "spectral_distance")
SCHEDULE_QUESTION = "--schedule row vs every other row"
#: A RALU row with a step cache meets the plain pipeline with fewer steps (uncached) of its budget on SCHEDULE_METRICS.
CACHED_VS_PLAIN = "cached RALU row vs base model with fewer steps"
DIRECTION = {key: higher for key, _, higher, _ in METRICS}


class Reference:
    """The real scenes every row is measured against: classifier features and spectra.

    FD of a feature set is the value of ``metrics.feature_frechet_distance`` (a test holds
    them equal), computed with the reference's mean, covariance and covariance square root
    kept: the bootstraps evaluate it a few hundred times per row, and recomputing the
    reference's statistics and a general matrix square root each time (0.6 s at 256
    dimensions) would make them the run's largest cost."""

    def __init__(self, classifier, images: torch.Tensor):
        self.classifier = classifier
        self.fd = metrics.FrechetDistance(classifier, images)
        with torch.no_grad():
            self.features = torch.cat([classifier.features(chunk) for chunk in images.split(256)]).double()
        self.spectra = metrics.radial_power_spectrum(images)
        self._mean = self.features.mean(0)
        cov = torch.cov(self.features.T)
        values, vectors = torch.linalg.eigh(cov)
        self._root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
        self._trace = cov.trace()

    def fd_of(self, features: torch.Tensor) -> float:
        """``|mu - mu_r|^2 + tr(S) + tr(S_r) - 2 tr((S_r^1/2 S S_r^1/2)^1/2)``: the Frechet
        distance of Gaussians fitted to ``features`` and to the reference's features."""
        features = features.double()
        cov = torch.cov(features.T)
        inner = torch.linalg.eigvalsh(self._root @ cov @ self._root).clamp_min(0).sqrt().sum()
        return float((features.mean(0) - self._mean).pow(2).sum() + cov.trace() + self._trace - 2.0 * inner)

    def spectral_of(self, spectra: torch.Tensor) -> float:
        return metrics.spectral_distance(spectra, self.spectra)


@dataclass
class Measured:
    """One row's per-image values over all seeds (image order: seed after seed) and its per-seed metrics."""

    per_image: dict[str, torch.Tensor]
    per_seed: dict[str, list[float]]

    def extend(self, other: Measured) -> Measured:
        if not self.per_image:
            return other
        return Measured({k: torch.cat([v, other.per_image[k]]) for k, v in self.per_image.items()},
                        {k: v + other.per_seed[k] for k, v in self.per_seed.items()})


@torch.no_grad()
def measure(images, labels, reference: Reference, baseline) -> Measured:
    """One seed's images of a row: per-image values and the seed's metrics (``method_metrics``)."""
    row = method_metrics(images, labels, reference.classifier, reference.fd, reference.spectra, baseline)
    right = (predict(reference.classifier, images).cpu() == labels)[:, list(data.PROMPT_COLUMNS)].double()  # what the prompt asked for
    per_image = {
        "features": reference.classifier.features(images).double(),
        "spectra": row["per_image"]["spectra"],
        "fine_accuracy": row["per_image"]["fine_right"],
        "accuracy": right.prod(dim=1),
        "psnr": metrics.psnr(images, baseline).double(),
        "ssim": metrics.ssim(images, baseline).double(),
        "blocking": metrics.blocking(images).double(),
        **{f"accuracy_{name}": right[:, i] for i, name in enumerate(data.PROMPT_ATTRIBUTES)},
    }
    per_seed = {
        "fd": [row["fd"]], "spectral_distance": [row["spectral_distance"]], "fine_accuracy": [row["accuracy"]["fine"]],
        "accuracy": [row["accuracy"]["all"]], "psnr": [row["psnr"]], "ssim": [row["ssim"]], "blocking": [row["blocking"]],
        **{f"accuracy_{name}": [row["accuracy"][name]] for name in data.PROMPT_ATTRIBUTES},
    }
    return Measured(per_image, per_seed)


def measure_seeds(sample, seeds, images: int, reference: Reference) -> Measured:
    """A row's images over ``seeds``, measured and pooled: ``sample(labels, seed)`` gives one
    seed's images for the harness's ``balanced_labels(images, seed)``.  No baseline: PSNR/SSIM
    are taken against the images themselves and mean nothing."""
    measured = Measured({}, {})
    for seed in seeds:
        labels = data.balanced_labels(images, seed)
        found = sample(labels, seed)
        measured = measured.extend(measure(found, labels, reference, found))
    return measured


def seed_std(values: list[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


class Statistics:
    """Intervals and paired comparisons at the configured resampling."""

    def __init__(self, reference: Reference, resamples: int, set_resamples: int):
        self.reference, self.resamples, self.set_resamples = reference, resamples, set_resamples

    def set_metric(self, key: str) -> tuple[str, Callable]:
        return {"fd": ("features", self.reference.fd_of), "spectral_distance": ("spectra", self.reference.spectral_of)}[key]

    def estimate(self, key: str, m: Measured) -> dict:
        """Pooled value, its 95 % bootstrap interval, the per-seed values and their spread."""
        if key in ("fd", "spectral_distance"):
            items, fn = self.set_metric(key)
            interval = metrics.set_interval(m.per_image[items], fn, n_resamples=self.set_resamples)
        else:
            interval = metrics.mean_interval(m.per_image[key], n_resamples=self.resamples)
        return {"value": interval.value, "low": interval.low, "high": interval.high, "seed_std": seed_std(m.per_seed[key]), "per_seed": list(m.per_seed[key])}

    def compare(self, key: str, a: Measured, b: Measured, names: tuple[str, str]) -> metrics.Comparison:
        """Paired bootstrap over the same images of two rows: metric(a) - metric(b) and the verdict."""
        higher = DIRECTION[key]
        if key in ("fd", "spectral_distance"):
            items, fn = self.set_metric(key)
            return metrics.paired_set_bootstrap(a.per_image[items], b.per_image[items], fn, higher, n_resamples=self.set_resamples, names=names)
        return metrics.paired_bootstrap(a.per_image[key], b.per_image[key], higher, n_resamples=self.resamples, names=names)


def beyond_spread(a: list[float], b: list[float]) -> tuple[float | None, bool]:
    """The spread across seeds (the larger of the two rows' standard deviations) and whether
    the two rows' per-seed means differ by more than it (False with one seed: no spread)."""
    spreads = [s for s in (seed_std(a), seed_std(b)) if s is not None]
    if not spreads:
        return None, False
    spread = max(spreads)
    return spread, abs(float(np.mean(a)) - float(np.mean(b))) > spread
