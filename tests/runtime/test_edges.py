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
