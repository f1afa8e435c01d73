"""Edge-based token selection (ralu.runtime.edges)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ralu.runtime.edges import canny, select_edge_tokens, to_uint8_gray, token_scores, top_tokens, tweedie


def test_top_tokens_per_image_with_stable_ties():
    scores = torch.tensor([[1.0, 5.0, 5.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
    assert top_tokens(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert top_tokens(scores[1:], 2).tolist() == [[0, 1]]  # independent of the batch


def test_token_scores_pool_each_footprint():
    edges = np.zeros((1, 4, 6), dtype=bool)
    edges[0, 0, 0] = edges[0, 1, 1] = edges[0, 3, 5] = True
    assert token_scores(edges, (2, 3)).tolist() == [[2.0, 0.0, 0.0, 0.0, 0.0, 1.0]]


def test_decode_mapping_keeps_dark_edges():
    # A dark image (all of it in [-1, 0]) with a vertical step inside the left tokens: the
    # published clip to [0, 1] makes it uniformly black (no edge, ties -> raster order);
    # mapping from [-1, 1] finds the step.
    image = torch.full((1, 3, 32, 32), -0.9)
    image[..., 8:] = -0.1
    assert to_uint8_gray(image).min() == 13 and to_uint8_gray(image, clip_only=True).max() == 0
    assert canny(to_uint8_gray(image)).any() and not canny(to_uint8_gray(image, clip_only=True)).any()
    assert select_edge_tokens(image, (2, 2), 2).tolist() == [[0, 2]]
    assert select_edge_tokens(image, (2, 2), 2, clip_only=True).tolist() == [[0, 1]]


def test_tweedie():
    x, v = torch.tensor([1.0]), torch.tensor([0.5])
    assert tweedie(x, v, 0.4).item() == pytest.approx(0.8)


def _published_gray(images: torch.Tensor) -> np.ndarray:
    """The published script's grayscale, written from its description: luma of the raw
    float32 decoded values, then clip to [0, 1], scale by 255 and truncate to uint8."""
    rgb = images.float().permute(0, 2, 3, 1).numpy()
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return (np.clip(luma, 0, 1) * 255).astype(np.uint8)


def test_clip_decode_picks_the_published_tokens_on_saturated_colours():
    # 4x4-pixel cells of saturated colours, channels out of [0, 1] on both sides: clipping
    # each channel before luma (our earlier order) changes most gray values.
    levels = torch.tensor([-0.6, -0.3, 0.2, 0.5, 0.9, 1.3])
    cells = levels[torch.randint(0, len(levels), (2, 3, 16, 16), generator=torch.Generator().manual_seed(0))]
    images = cells.repeat_interleave(4, -2).repeat_interleave(4, -1)
    assert to_uint8_gray(torch.tensor([0.5, -0.3, -0.3]).view(1, 3, 1, 1), clip_only=True).item() == 0
    published = _published_gray(images)
    assert np.array_equal(to_uint8_gray(images, clip_only=True), published)
    grid = (8, 8)
    scores = token_scores(canny(published), grid)
    per_channel = to_uint8_gray(images.clamp(0, 1) * 2 - 1)  # clip channels, round, then luma
    other_scores = token_scores(canny(per_channel), grid)
    checked = differs = 0
    for k in range(1, 64):
        # The script breaks ties with random noise: compare where the k-th and (k+1)-th
        # scores of every image differ, so that the published choice is unique.
        ranked = scores.sort(dim=1, descending=True).values
        if not bool((ranked[:, k - 1] > ranked[:, k]).all()):
            continue
        want = scores.topk(k, dim=1).indices.sort(dim=1).values
        assert torch.equal(select_edge_tokens(images, grid, k, clip_only=True), want)
        differs += not torch.equal(top_tokens(other_scores, k), want)
        checked += 1
    assert checked >= 5 and differs >= 3
