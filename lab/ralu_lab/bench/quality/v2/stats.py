"""Metrics of the v2 rows pooled over seeds, with bootstrap intervals over seeds, the spread
across seeds, paired verdicts between rows and the regime check.

Per seed, :func:`ralu_lab.testbed.v2.evaluate.method_metrics` gives every metric of a
row's images (its per-seed values make the spread across seeds); the per-image values
(PSNR, SSIM, blocking, which attributes were read right, classifier features, radial spectra)
are kept, with each image's seed, so that the images of all seeds can be pooled and resampled.
Images of one seed are not independent (``paper_compat``'s one noise draw per seed is shared by
all of them), so every interval and verdict is a pairs cluster bootstrap over the seeds
(:func:`ralu_lab.testbed.v2.metrics.cluster_mean_interval`, ``cluster_set_interval``,
``paired_cluster_bootstrap``, ``paired_cluster_set_bootstrap``; docs/testbed-v2.md §2d): seeds
drawn with replacement, each with all its images, the same seeds for both rows of a
comparison.  With one seed they fall back to resampling images.  :meth:`Statistics.compare_halves`
repeats a comparison on each half of the seeds (:func:`split_halves`) for the replication check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
#: The held-out section: each ``--schedule`` row's estimates there (PSNR and SSIM need a baseline,
#: which is not sampled there), and the metrics it meets the other rows on.
HELDOUT_ROW_METRICS = ("fd", "spectral_distance", "fine_accuracy", "accuracy", "blocking")
HELDOUT_VERDICT_METRICS = ("fd", "fine_accuracy")
HELDOUT_QUESTION = "--schedule row vs row on held-out seeds"


class Reference:
    """The real scenes every row is measured against: classifier features and spectra.

    FD of a feature set is the value of ``metrics.feature_frechet_distance`` (a test holds
    them equal), computed by :class:`~ralu_lab.testbed.v2.metrics.ReferenceFrechetDistance`
    with the reference's mean, covariance and covariance square root kept: the bootstraps
    evaluate it a few hundred times per row, and recomputing the reference's statistics and a
    general matrix square root each time (0.6 s at 256 dimensions) would make them the run's
    largest cost."""

    def __init__(self, classifier, images: torch.Tensor):
        self.classifier = classifier
        self.fd = metrics.FrechetDistance(classifier, images)
        with torch.no_grad():
            self.features = torch.cat([classifier.features(chunk) for chunk in images.split(256)]).double()
        self.spectra = metrics.radial_power_spectrum(images)
        self.frechet = metrics.ReferenceFrechetDistance(self.features)
        self.spectral = metrics.ReferenceSpectralDistance(self.spectra)

    def fd_of(self, features: torch.Tensor) -> float:
        """``|mu - mu_r|^2 + tr(S) + tr(S_r) - 2 tr((S_r^1/2 S S_r^1/2)^1/2)``: the Frechet
        distance of Gaussians fitted to ``features`` and to the reference's features."""
        return self.frechet(features)

    def spectral_of(self, spectra: torch.Tensor) -> float:
        return self.spectral(spectra)


@dataclass
class Measured:
    """One row's per-image values over all seeds (image order: seed after seed), each image's
    seed (the cluster the bootstraps resample) and its per-seed metrics (one entry per seed,
    in the order the seeds came)."""

    per_image: dict[str, torch.Tensor]
    per_seed: dict[str, list[float]]
    image_seeds: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def seeds(self) -> list[int]:
        """The seeds in the order they came (the order of ``per_seed``'s entries)."""
        return list(dict.fromkeys(self.image_seeds.tolist()))

    def extend(self, other: Measured) -> Measured:
        if not self.per_image:
            return other
        return Measured({k: torch.cat([v, other.per_image[k]]) for k, v in self.per_image.items()},
                        {k: v + other.per_seed[k] for k, v in self.per_seed.items()}, torch.cat([self.image_seeds, other.image_seeds]))

    def subset(self, seeds) -> Measured:
        """The images and per-seed values of ``seeds`` only (ValueError for a seed not measured)."""
        missing = set(seeds) - set(self.seeds)
        if missing:
            raise ValueError(f"seeds {sorted(missing)} were not measured (measured: {self.seeds})")
        keep = torch.isin(self.image_seeds, torch.as_tensor(list(seeds), dtype=torch.long))
        positions = [i for i, s in enumerate(self.seeds) if s in set(seeds)]
        return Measured({k: v[keep] for k, v in self.per_image.items()}, {k: [v[i] for i in positions] for k, v in self.per_seed.items()}, self.image_seeds[keep])


@torch.no_grad()
def measure(images, labels, reference: Reference, baseline, seed: int) -> Measured:
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
    return Measured(per_image, per_seed, torch.full((images.shape[0],), int(seed), dtype=torch.long))


def measure_seeds(sample, seeds, images: int, reference: Reference) -> Measured:
    """A row's images over ``seeds``, measured and pooled: ``sample(labels, seed)`` gives one
    seed's images for the harness's ``balanced_labels(images, seed)``.  No baseline: PSNR/SSIM
    are taken against the images themselves and mean nothing."""
    measured = Measured({}, {})
    for seed in seeds:
        labels = data.balanced_labels(images, seed)
        found = sample(labels, seed)
        measured = measured.extend(measure(found, labels, reference, found, seed))
    return measured


def seed_std(values: list[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def split_halves(seeds) -> tuple[list[int], list[int]]:
    """The replication check's two halves of the seeds: sorted, then alternating (positions
    0, 2, 4, ... and 1, 3, 5, ...), so that neither half is the early or the late seeds."""
    ordered = sorted(seeds)
    return ordered[0::2], ordered[1::2]


class Statistics:
    """Intervals and paired comparisons at the configured resampling: pairs cluster bootstraps
    over the seeds (with one seed, over images)."""

    def __init__(self, reference: Reference, resamples: int, set_resamples: int):
        self.reference, self.resamples, self.set_resamples = reference, resamples, set_resamples

    def set_metric(self, key: str) -> tuple[str, metrics.SummedSetMetric]:
        return {"fd": ("features", self.reference.frechet), "spectral_distance": ("spectra", self.reference.spectral)}[key]

    def estimate(self, key: str, m: Measured) -> dict:
        """Pooled value, its 95 % interval (seeds resampled), the per-seed values and their spread."""
        if key in ("fd", "spectral_distance"):
            items, fn = self.set_metric(key)
            interval = metrics.cluster_set_interval(m.per_image[items], m.image_seeds, fn, n_resamples=self.set_resamples)
        else:
            interval = metrics.cluster_mean_interval(m.per_image[key], m.image_seeds, n_resamples=self.resamples)
        return {"value": interval.value, "low": interval.low, "high": interval.high, "seed_std": seed_std(m.per_seed[key]), "per_seed": list(m.per_seed[key])}

    def compare(self, key: str, a: Measured, b: Measured, names: tuple[str, str]) -> metrics.Comparison:
        """Paired cluster bootstrap over the same seeds' images of two rows: metric(a) - metric(b) and the verdict."""
        if not torch.equal(a.image_seeds, b.image_seeds):
            raise ValueError(f"{names[0]} and {names[1]} must hold the same seeds' images to be paired (seeds {a.seeds} and {b.seeds})")
        higher = DIRECTION[key]
        if key in ("fd", "spectral_distance"):
            items, fn = self.set_metric(key)
            return metrics.paired_cluster_set_bootstrap(a.per_image[items], b.per_image[items], a.image_seeds, fn, higher, n_resamples=self.set_resamples, names=names)
        return metrics.paired_cluster_bootstrap(a.per_image[key], b.per_image[key], a.image_seeds, higher, n_resamples=self.resamples, names=names)

    def compare_halves(self, key: str, a: Measured, b: Measured, names: tuple[str, str]) -> list[tuple[list[int], metrics.Comparison]]:
        """:meth:`compare` on each half of the seeds (:func:`split_halves`), with the half's
        seeds; empty with fewer than two seeds."""
        if len(a.seeds) < 2:
            return []
        return [(half, self.compare(key, a.subset(half), b.subset(half), names)) for half in split_halves(a.seeds)]


def beyond_spread(a: list[float], b: list[float]) -> tuple[float | None, bool]:
    """The spread across seeds (the larger of the two rows' standard deviations) and whether
    the two rows' per-seed means differ by more than it (False with one seed: no spread)."""
    spreads = [s for s in (seed_std(a), seed_std(b)) if s is not None]
    if not spreads:
        return None, False
    spread = max(spreads)
    return spread, abs(float(np.mean(a)) - float(np.mean(b))) > spread
