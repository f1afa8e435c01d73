"""Token layouts and the first stage's canvas (ralu.runtime.tokens)."""

from __future__ import annotations

import math

import pytest
import torch
from monte_carlo import SIGMAS

from ralu.runtime.compat import PaperCompat
from ralu.runtime.tokens import TokenLayout, block_sum, initial_canvas, patchify, upsample_nearest


def test_positions_follow_the_convention():
    layout = TokenLayout.from_selection(torch.tensor([[1]]), (2, 2))
    assert (layout.num_low, layout.num_full, layout.num_tokens) == (3, 4, 7)
    expected = [[0, 0], [1, 0], [1, 1], [0, 1], [0, 1.5], [0.5, 1], [0.5, 1.5]]  # child (dy,dx) of (0,1) at (dy/2, 1+dx/2)
    assert layout.positions()[0].tolist() == expected
    assert layout.positions().dtype == torch.float32
    # Low stage = native half-size grid; full stage = native full-size grid (as FluxPipeline builds them).
    assert TokenLayout.low(1, (2, 3)).positions()[0].tolist() == [[i, j] for i in range(2) for j in range(3)]
    assert TokenLayout.full(1, (2, 3)).positions()[0].tolist() == [[r, c] for r in range(4) for c in range(6)]


def test_gather_scatter_roundtrip_and_flux_packing():
    g = torch.Generator().manual_seed(0)
    b, c, gh, gw = 3, 5, 3, 4
    low = torch.randn(b, c, 2 * gh, 2 * gw, generator=g)
    full = torch.randn(b, c, 4 * gh, 4 * gw, generator=g)
    selected = torch.stack([torch.randperm(gh * gw, generator=g)[:4].sort().values for _ in range(b)])
    layout = TokenLayout.from_selection(selected, (gh, gw))
    canvas = torch.where(layout.pixel_mask(), full, upsample_nearest(low))
    patches = layout.gather(canvas)
    assert patches.shape == (b, gh * gw + 3 * 4, c, 2, 2)
    assert torch.equal(layout.scatter(patches), canvas)
    assert not layout.shared
    # Full layout order and packing are FluxPipeline's _pack_latents.
    packed = full.view(b, c, 2 * gh, 2, 2 * gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 4 * gh * gw, 4 * c)
    assert torch.equal(TokenLayout.full(b, (gh, gw)).gather(full).flatten(2), packed)
    assert torch.equal(patchify(full).flatten(2), packed)


def test_single_resolution_layouts_roundtrip():
    g = torch.Generator().manual_seed(1)
    b, c, gh, gw = 2, 3, 3, 4
    half = torch.randn(b, c, 2 * gh, 2 * gw, generator=g)
    full = torch.randn(b, c, 4 * gh, 4 * gw, generator=g)
    low_layout, full_layout = TokenLayout.low(b, (gh, gw)), TokenLayout.full(b, (gh, gw))
    assert torch.equal(low_layout.gather(upsample_nearest(half)), patchify(half))
    assert torch.equal(low_layout.scatter(patchify(half)), upsample_nearest(half))
    assert torch.equal(full_layout.gather(full), patchify(full))
    assert torch.equal(full_layout.scatter(patchify(full)), full)


def test_layout_rejects_uneven_selection():
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[0, 0, 0] = True
    with pytest.raises(ValueError, match="same number"):
        TokenLayout(mask, "mixed")


def test_initial_canvas_keeps_unit_variance():
    noise = torch.randn(400, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    half = initial_canvas(noise, "low")[:, :, ::2, ::2]
    assert torch.allclose(half, block_sum(noise) / 2)
    assert abs(half.var().item() - 1.0) < SIGMAS * math.sqrt(2 / half.numel())


def test_subsample_noise_switch_takes_every_second_latent_pixel():
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    canvas = initial_canvas(noise, "low", PaperCompat(subsample_noise=True))
    # The canvas holds the half-size latent nearest-upsampled; that latent is the script's
    # nearest downsampling of the full noise: rows and columns 0, 2, 4, ...
    assert torch.equal(canvas[..., ::2, ::2], noise[..., ::2, ::2])
    assert torch.equal(canvas, upsample_nearest(noise[..., ::2, ::2]))
    assert not torch.allclose(initial_canvas(noise, "low")[..., ::2, ::2], noise[..., ::2, ::2])
    assert torch.equal(initial_canvas(noise, "full", PaperCompat(subsample_noise=True)), noise)
    assert PaperCompat.parse(True).subsample_noise
