"""Mean radial power spectra of image sets, compared on a log scale (torch only).

The quality search's spectral term (:mod:`ralu.calibrate.quality_search`) and the quality
testbed's spectral metric are these functions, so that what the search optimises and what
the testbed judges are one definition.  Kept apart from the search so that a caller measuring
images does not import Optuna and scipy.
"""

from __future__ import annotations

import torch


def luma(images: torch.Tensor) -> torch.Tensor:
    """``(n, H, W)`` luma (ITU-R BT.601 weights) of images in [0, 1] ``(n, 3, H, W)``, float64."""
    x = images.double().clamp(0.0, 1.0)
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def radial_power_spectrum(images: torch.Tensor) -> torch.Tensor:
    """``(n, min(H, W) // 2)``: every image's luma power (mean removed, Hann window along
    each side) averaged over the frequency rings of radius 1, 2, ... cycles per the shorter
    side.  Images in [0, 1] ``(n, 3, H, W)``.  The quality testbed's spectral metric is this
    function too (the lab calls it on its square images), so search and judge agree."""
    y = luma(images)
    n, h, w = y.shape
    side = min(h, w)
    y = y - y.mean(dim=(1, 2), keepdim=True)
    window_h = torch.hann_window(h, periodic=False, dtype=torch.float64)
    window_w = torch.hann_window(w, periodic=False, dtype=torch.float64)
    power = torch.fft.fft2(y * window_h[:, None] * window_w[None, :]).abs().pow(2)
    # Frequencies in cycles per the shorter side, so that rings are round on any aspect.
    fy = torch.fft.fftfreq(h, d=1.0 / side, dtype=torch.float64)
    fx = torch.fft.fftfreq(w, d=1.0 / side, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long()
    rings = side // 2
    keep = (radius >= 1) & (radius <= rings)
    index = (radius[keep] - 1).expand(n, -1)
    total = torch.zeros(n, rings, dtype=torch.float64).scatter_add_(1, index, power[:, keep])
    count = torch.zeros(rings, dtype=torch.float64).scatter_add_(0, radius[keep] - 1, torch.ones_like(power[0, keep]))
    return total / count


def spectral_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean over radii of ``|log10 Pa(r) - log10 Pb(r)|``, ``P`` a set's mean radial power
    spectrum (:func:`radial_power_spectrum`): 0 for identical sets, 0.05 for a power factor
    of 1.12 (or 1 / 1.12) at every radius, 1 for tenfold.  ``a`` and ``b`` are images in [0, 1] or
    their spectra ``(n, rings)``."""
    pa = a if a.ndim == 2 else radial_power_spectrum(a)
    pb = b if b.ndim == 2 else radial_power_spectrum(b)
    return float((torch.log10(pa.mean(0) + eps) - torch.log10(pb.mean(0) + eps)).abs().mean())
