"""The noise injection at a transition (ralu.runtime.noise), checked by Monte Carlo (see
monte_carlo.py for the tolerances)."""

from __future__ import annotations

import math

import pytest
import torch
from monte_carlo import SIGMAS, block_pairs, check_unit

from ralu.runtime.compat import PaperCompat
from ralu.runtime.noise import clear_global_noise, correlated_noise, group_sum, renoise
from ralu.runtime.schedule import transition
from ralu.runtime.tokens import TokenLayout, expand_mask, upsample_nearest


@pytest.mark.parametrize("repeat_tokens", [False, True])
def test_correlated_noise_has_covariance_identity_minus_cj(repeat_tokens):
    c = 0.2
    eps = torch.randn(4000, 2, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z = correlated_noise(eps, c, repeat_tokens)
    n = z.numel()
    assert abs((z * z).mean().item() / (1 - c) - 1) < SIGMAS * math.sqrt(2 / n)
    # Pixel (0, 0) of every 4x4 cell, a pixel of its group (nearest: the 2x2 block, (0, 1);
    # repetition: same offset in the next child, (0, 2)) and one of another group.
    first = z[..., 0::4, 0::4]
    same_group = z[..., 0::4, 2::4] if repeat_tokens else z[..., 0::4, 1::4]
    other_group = z[..., 1::4, 1::4] if repeat_tokens else z[..., 2::4, 2::4]
    m = first.numel()
    assert abs((first * same_group).mean().item() + c) < SIGMAS / math.sqrt(m)
    assert abs((first * other_group).mean().item()) < SIGMAS / math.sqrt(m)
    # The group mean direction has eigenvalue 1 - 4c: group sums have variance 4 (1 - 4c).
    sums = group_sum(z, repeat_tokens)
    assert abs(sums.var().item() / (4 * (1 - 4 * c)) - 1) < SIGMAS * math.sqrt(2 / (n / 4))


def _monte_carlo_transition(n, was_full, now_full, e, c, compat, seed=0):
    """Known clean latent x0 (offset 20 so a wrong signal scale shows), x_e on the
    rectified-flow path at the current resolution of every cell, then one transition.
    Returns residual (x_s - s Up(x0)) / (1 - s) and pixel masks (newly, stays_full, stays_low)."""
    g = torch.Generator().manual_seed(seed)
    channels, (gh, gw) = 4, was_full.shape[1:]
    h, w = 4 * gh, 4 * gw
    x0_low = 20.0 + torch.randn(1, channels, h // 2, w // 2, generator=g, dtype=torch.float64)
    x0_full = 20.0 + torch.randn(1, channels, h, w, generator=g, dtype=torch.float64)
    was_pix = expand_mask(was_full, 4)[:, None]
    x0 = torch.where(was_pix, x0_full, upsample_nearest(x0_low))
    noise = torch.where(
        was_pix,
        torch.randn(n, channels, h, w, generator=g, dtype=torch.float64),
        upsample_nearest(torch.randn(n, channels, h // 2, w // 2, generator=g, dtype=torch.float64)),
    )
    x_e = e * x0 + (1 - e) * noise
    coefficients = transition(e, c)
    eps = torch.randn(n, channels, h, w, generator=g, dtype=torch.float64)
    out = renoise(x_e, was_full, now_full, coefficients, eps, c, compat)
    s = coefficients.start
    residual = (out - s * x0) / (1 - s)
    newly = expand_mask(now_full & ~was_full, 4)[:, None].expand_as(out)
    stays_full = was_pix.expand_as(out)
    stays_low = expand_mask(~now_full, 4)[:, None].expand_as(out)
    return residual, newly, stays_full, stays_low


def _random_selection(n, grid, k, seed):
    g = torch.Generator().manual_seed(seed)
    return TokenLayout.from_selection(torch.stack([torch.randperm(grid[0] * grid[1], generator=g)[:k] for _ in range(n)]), grid).full_mask


N_MC, GRID, K = 2000, (4, 4), 6


@pytest.mark.parametrize("c", [0.04, 0.2])
def test_transition_low_to_mixed_is_exact(c):
    was_full = torch.zeros(N_MC, *GRID, dtype=torch.bool)
    now_full = _random_selection(N_MC, GRID, K, seed=1)
    residual, newly, _, stays_low = _monte_carlo_transition(N_MC, was_full, now_full, e=0.3, c=c, compat=PaperCompat())
    check_unit(residual[newly], 1.0, "upsampled")
    check_unit(residual[..., ::2, ::2][stays_low[..., ::2, ::2]], 1.0, "stays low-res")
    for products in block_pairs(residual, newly):  # no correlation left inside upsampled blocks
        assert abs(products.mean().item()) < SIGMAS / math.sqrt(products.numel())
    # low-res tokens stay low-res: their 2x2 blocks hold one value.
    assert torch.equal(residual[..., 0::2, 0::2][stays_low[..., ::2, ::2]], residual[..., 1::2, 1::2][stays_low[..., ::2, ::2]])


def test_transition_mixed_to_full_is_exact():
    c = 0.04
    was_full = _random_selection(N_MC, GRID, K, seed=2)
    now_full = torch.ones(N_MC, *GRID, dtype=torch.bool)
    residual, newly, stays_full, _ = _monte_carlo_transition(N_MC, was_full, now_full, e=0.45, c=c, compat=PaperCompat(), seed=3)
    check_unit(residual[newly], 1.0, "upsampled")
    check_unit(residual[stays_full], 1.0, "already full-res")
    for mask in (newly, stays_full):
        for products in block_pairs(residual, mask):
            assert abs(products.mean().item()) < SIGMAS / math.sqrt(products.numel())


def test_plain_noise_would_fail_the_correlation_check(monkeypatch):
    # The same check catches the naive choice z = eps on upsampled blocks (what the
    # correction removes): the correlation left is c / (1 + c) ~ 0.038.
    import ralu.runtime.noise as noise_module

    was_full = torch.zeros(N_MC, *GRID, dtype=torch.bool)
    now_full = torch.ones(N_MC, *GRID, dtype=torch.bool)
    monkeypatch.setattr(noise_module, "correlated_noise", lambda eps, c, repeat_tokens=False: eps)
    residual, newly, _, _ = _monte_carlo_transition(N_MC, was_full, now_full, e=0.3, c=0.04, compat=PaperCompat())
    products = block_pairs(residual, newly)[0]
    assert products.mean().item() > SIGMAS / math.sqrt(products.numel())


@pytest.mark.parametrize("compat", [PaperCompat(unit_noise=True), PaperCompat.parse(True)])
def test_paper_compat_adds_relative_variance_c_on_not_upsampled_tokens(compat):
    clear_global_noise()
    c = 0.04
    was_full = _random_selection(N_MC, GRID, K, seed=4)
    now_full = was_full | _random_selection(N_MC, GRID, 3, seed=5)
    residual, newly, stays_full, stays_low = _monte_carlo_transition(N_MC, was_full, now_full, e=0.3, c=c, compat=compat, seed=6)
    check_unit(residual[stays_full & ~newly], 1.0 + c, "already full-res (paper)")
    low_unique = residual[..., ::2, ::2][stays_low[..., ::2, ::2]]
    check_unit(low_unique, 1.0 + c, "stays low-res (paper)")


def test_exact_mode_draws_per_image_and_paper_mode_reuses_one_draw():
    clear_global_noise()
    canvas = torch.zeros(2, 1, 8, 8)
    was = torch.zeros(2, 2, 2, dtype=torch.bool)
    now = torch.ones(2, 2, 2, dtype=torch.bool)
    eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    coefficients = transition(0.3, 0.04)
    exact = renoise(canvas, was, now, coefficients, eps, 0.04)
    assert not torch.allclose(exact[0], exact[1])
    paper = renoise(canvas, was, now, coefficients, eps, 0.04, PaperCompat(global_noise=True))
    again = renoise(canvas, was, now, coefficients, torch.randn_like(eps), 0.04, PaperCompat(global_noise=True))
    assert torch.equal(paper[0], paper[1]) and torch.equal(paper, again)


def test_token_repetition_tiles_the_parent_token():
    half = torch.arange(16.0).reshape(1, 1, 4, 4)  # 2x2 low-res tokens of 2x2 half-size pixels
    canvas = upsample_nearest(half)
    was, now = torch.zeros(1, 2, 2, dtype=torch.bool), torch.ones(1, 2, 2, dtype=torch.bool)
    coefficients = transition(0.999999, 0.25)  # signal scale ~ 1, noise scale ~ 0
    out = renoise(canvas, was, now, coefficients, torch.zeros(1, 1, 8, 8), 0.25, PaperCompat(repeat_tokens=True))
    expected_cell = torch.tensor([[0.0, 1, 0, 1], [4, 5, 4, 5], [0, 1, 0, 1], [4, 5, 4, 5]])
    assert torch.allclose(out[0, 0, :4, :4], expected_cell, atol=1e-4)
    nearest = renoise(canvas, was, now, coefficients, torch.zeros(1, 1, 8, 8), 0.25)
    assert torch.allclose(nearest, canvas, atol=1e-4)


def test_transition_memory_is_linear_in_tokens():
    """No op in the noise injection or the token bookkeeping produces more than a few
    canvases' worth of elements (a dense covariance would be canvas.numel() ** 2)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    b, grid = 2, (8, 8)
    canvas = torch.randn(b, 16, 32, 32)
    was = torch.zeros(b, *grid, dtype=torch.bool)
    with Largest():
        layout = TokenLayout.from_selection(torch.tensor([[1, 5, 9], [2, 3, 60]]), grid)
        out = renoise(canvas, was, layout.full_mask, transition(0.3, 0.04), torch.randn_like(canvas), 0.04)
        layout.scatter(layout.gather(out))
    assert Largest.largest <= 2 * canvas.numel()
