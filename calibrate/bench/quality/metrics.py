"""Image metrics: PSNR, SSIM, the blocking index, Frechet distance; per seed and aggregated over seeds."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ralu.calibrate.bench.common import mean_std
from ralu.calibrate.bench.quality.config import EXTRA_METRICS, METRICS, PSNR_CAP
from ralu.calibrate.bench.quality.schema import MetricSummary
from ralu.calibrate.testbed.classifier import agreement, features, predict
from ralu.calibrate.testbed.evaluate import frechet_distance as fd


def _unit(images):
    """Images in [-1, 1] -> [0, 1], float64 for the metrics."""
    return ((images.double() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(images, reference, cap: float = PSNR_CAP):
    """Per-image PSNR (dB) ``(n,)`` of images ``(n, 3, H, W)`` in [-1, 1] against a reference,
    on [0, 1] RGB (peak 1), capped at ``cap`` (identical images give ``cap``)."""
    mse = (_unit(images) - _unit(reference)).pow(2).flatten(1).mean(dim=1)
    value = 10.0 * torch.log10(1.0 / mse.clamp_min(10.0 ** (-cap / 10.0)))
    return value.clamp(max=cap)


def gaussian_window(size: int = 11, sigma: float = 1.5):
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(images, reference, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03):
    """Per-image SSIM ``(n,)`` on [0, 1] RGB: gaussian window (``window`` x ``window``,
    ``sigma``), local statistics per channel at valid positions, mean over channels and
    positions (Wang et al. 2004, data range 1)."""
    x, y = _unit(images), _unit(reference)
    channels = x.shape[1]
    kernel = gaussian_window(window, sigma).to(x.device)[None, None].expand(channels, 1, window, window)

    def blur(z):
        return F.conv2d(z, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1)


def blocking_index(images, block: int = 2, eps: float = 1e-12):
    """Per-image blocking index ``(n,)`` in [-1, 1]: how much more the image changes across
    the boundaries of an aligned ``block`` x ``block`` grid than inside its cells.

    On the luma ``Y`` (in [0, 1]) take every horizontal and vertical neighbour difference
    ``d``; *boundary* differences are those between pixel ``block*j - 1`` and ``block*j``,
    *inner* ones all others.  With ``E_b``, ``E_i`` the mean ``d^2`` over each set, the
    index is ``(E_b - E_i) / (E_b + E_i)``.  Squared differences weight strong edges, so
    this is blocking *along edges*: about 0 for an image with no grid-aligned structure (a
    natural or well-sampled image), 1 for a nearest-upsampled one (no change inside the
    blocks), in between for e.g. bilinear upsampling.  A flat image gives 0.  It does not
    see the 4x4 tiling of the published script's token repetition.
    """
    x = _unit(images)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    boundary, inner = [], []
    for d in (luma[:, :, 1:] - luma[:, :, :-1], (luma[:, 1:, :] - luma[:, :-1, :]).transpose(1, 2)):
        on_boundary = (torch.arange(d.shape[-1]) % block) == block - 1
        boundary.append(d[..., on_boundary].pow(2).flatten(1))
        inner.append(d[..., ~on_boundary].pow(2).flatten(1))
    e_b = torch.cat(boundary, dim=1).mean(dim=1)
    e_i = torch.cat(inner, dim=1).mean(dim=1)
    return (e_b - e_i) / (e_b + e_i + eps)


def frechet_distance(a, b) -> float:
    """Frechet distance of Gaussians fitted to two feature sets (the testbed's function;
    with fewer samples than feature dimensions the covariances are singular, which the
    matrix square root handles, so its warning is silenced)."""

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*singular.*")
        return fd(a, b)


def evaluate_images(images, labels, baseline, classifier, real_features) -> dict:
    """Per-seed metrics of one image set (``baseline`` None: no fidelity metrics)."""
    feats = features(classifier, images)
    result = {
        "fd": frechet_distance(feats.numpy(), real_features),
        "accuracy": agreement(predict(classifier, images), labels)["all"],
        "edge_artifacts": float(blocking_index(images).mean()),
        "edge_artifacts_4x4": float(blocking_index(images, block=4).mean()),
        "_features": feats,
    }
    if baseline is not None:
        result["psnr"] = float(psnr(images, baseline).mean())
        result["ssim"] = float(ssim(images, baseline).mean())
    return result


def aggregate(per_seed: list[dict], real_features) -> MetricSummary:
    """Mean and spread across seeds of every metric, and FD of all seeds' images pooled."""
    out = {}
    for key, _, _ in METRICS + EXTRA_METRICS:
        if key in per_seed[0]:
            out[key], out[f"{key}_std"] = mean_std([r[key] for r in per_seed])
        else:
            out[key] = out[f"{key}_std"] = None
    pooled = torch.cat([r["_features"] for r in per_seed]).numpy()
    out["fd_pooled"] = frechet_distance(pooled, real_features)
    return MetricSummary(**out)
