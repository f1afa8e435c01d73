"""Edge-based token selection at the end of the low-res stage (docs/method.md §2).

Family-independent: the caller decodes the Tweedie estimate of the half-size latent with
its VAE; this module turns decoded images into per-token edge scores and picks the top-k
tokens of every image independently.
"""

from __future__ import annotations

import numpy as np
import torch

#: Canny hysteresis thresholds of the paper.
CANNY_THRESHOLDS = (100, 200)


def tweedie(x: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """Clean-sample estimate of rectified flow: ``x0 = x_sigma - sigma * v``.

    With the velocity ``v`` of the last Euler step this gives the same value whether ``x``
    is the state before that step (at its sigma) or after it (at the stage-end sigma).
    """
    return x - sigma * velocity


def to_uint8_gray(images: torch.Tensor, clip_only: bool = False) -> np.ndarray:
    """Decoded images ``(B, 3, H, W)`` in [-1, 1] -> grayscale ``(B, H, W)`` uint8.

    Default: the VAE range [-1, 1] is mapped to [0, 1], every channel clipped and rounded to
    8 bits, then converted with the ITU-R 601 luma weights (OpenCV's RGB2GRAY).

    ``clip_only``: the published script's order, which differs in three ways: no mapping
    from [-1, 1] (every dark pixel turns black), luma taken on the raw float32 values *before*
    clipping (a saturated colour such as (0.5, -0.3, -0.3) has luma 0, not the red channel's
    share), and the clipped luma truncated, not rounded, to 8 bits.
    """
    import cv2

    images = images.detach().float().cpu()
    if clip_only:
        # float32 throughout, weights applied left to right, as the script's numpy does.
        luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
        return (luma.clamp(0.0, 1.0) * 255.0).to(torch.uint8).numpy()
    images = images / 2.0 + 0.5
    rgb = (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.stack([cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY) for image in rgb])


def canny(gray: np.ndarray, thresholds: tuple[float, float] = CANNY_THRESHOLDS) -> np.ndarray:
    """Canny edge maps ``(B, H, W)`` bool of grayscale uint8 images ``(B, H, W)``."""
    import cv2

    low, high = thresholds
    return np.stack([cv2.Canny(image, low, high) > 0 for image in gray])


def token_scores(edges: np.ndarray | torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Edge pixels summed over every token's pixel footprint: ``(B, H, W)`` -> ``(B, gh * gw)``
    (raster order of the token grid).  H and W must be multiples of the grid."""
    edges = torch.as_tensor(np.asarray(edges)).float()
    b, h, w = edges.shape
    gh, gw = grid
    if h % gh or w % gw:
        raise ValueError(f"edge map {h}x{w} is not a whole number of cells of the {gh}x{gw} token grid")
    return edges.reshape(b, gh, h // gh, gw, w // gw).sum(dim=(2, 4)).reshape(b, gh * gw)


def top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices ``(B, k)`` of every image's k highest scores, ascending.

    Ties go to the lower index (stable sort), so the choice for one image never depends on
    the other images of its batch.
    """
    order = torch.argsort(-scores, dim=1, stable=True)[:, :k]
    return order.sort(dim=1).values


def select_edge_tokens(
    images: torch.Tensor,
    grid: tuple[int, int],
    k: int,
    clip_only: bool = False,
    thresholds: tuple[float, float] = CANNY_THRESHOLDS,
) -> torch.Tensor:
    """Decoded half-size images ``(B, 3, H, W)`` in [-1, 1] -> the ``(B, k)`` low-res tokens
    with the most Canny edge pixels (on ``images.device``)."""
    edges = canny(to_uint8_gray(images, clip_only), thresholds)
    return top_tokens(token_scores(edges, grid), k).to(images.device)
