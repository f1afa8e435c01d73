"""Token layouts, edge selection and the noise injection at a transition (Monte Carlo).

Monte Carlo tolerances: a pooled mean of n independent unit-variance values has standard
error 1/sqrt(n); a pooled variance estimate of n Gaussian values has standard error
sqrt(2/n) (relative); a pooled mean of products of two independent N(0, 1) has standard
error 1/sqrt(n).  Checks use 5 standard errors (fixed seeds make them deterministic).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ralu.runtime.compat import PaperCompat
from ralu.runtime.edges import canny, select_edge_tokens, to_uint8_gray, token_scores, top_tokens, tweedie
from ralu.runtime.noise import clear_global_noise, correlated_noise, group_sum, renoise
from ralu.runtime.schedule import transition
from ralu.runtime.tokens import TokenLayout, block_sum, expand_mask, initial_canvas, patchify, upsample_nearest

SIGMAS = 5.0


# ----------------------------------------------------------------------------------------
# Token layouts
# ----------------------------------------------------------------------------------------


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


def test_timestep_table_matches_per_step_conversion():
    from ralu.runtime.plan import StagePlan
    from ralu.runtime.sampler import timestep_table

    stage = StagePlan(index=0, role="full", sigmas=np.array([1.0, 0.7310585786, 0.3333333333, 0.0]), tokens=4)
    lookup = timestep_table(stage, "cpu")
    for sigma in stage.sigmas:
        assert torch.equal(lookup(float(sigma)), torch.tensor(float(sigma) * 1000.0, dtype=torch.float32))
    assert torch.equal(lookup(0.123), torch.tensor(123.0, dtype=torch.float32))


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


# ----------------------------------------------------------------------------------------
# Edge selection
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Structured noise
# ----------------------------------------------------------------------------------------


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


def _check_unit(values, expected_var, label):
    n = values.numel()
    assert abs(values.mean().item()) < SIGMAS * math.sqrt(expected_var / n), f"{label}: mean {values.mean().item()}"
    ratio = values.var().item() / expected_var
    assert abs(ratio - 1) < SIGMAS * math.sqrt(2 / n), f"{label}: variance {values.var().item()} expected {expected_var}"


def _block_pairs(residual, mask):
    """Products of the (0,0) pixel of each 2x2 block with its three partners, where ``mask``."""
    top_left = residual[..., 0::2, 0::2]
    keep = mask[..., 0::2, 0::2]
    return [(top_left * residual[..., dy::2, dx::2])[keep] for dy, dx in ((0, 1), (1, 0), (1, 1))]


N_MC, GRID, K = 2000, (4, 4), 6


@pytest.mark.parametrize("c", [0.04, 0.2])
def test_transition_low_to_mixed_is_exact(c):
    was_full = torch.zeros(N_MC, *GRID, dtype=torch.bool)
    now_full = _random_selection(N_MC, GRID, K, seed=1)
    residual, newly, _, stays_low = _monte_carlo_transition(N_MC, was_full, now_full, e=0.3, c=c, compat=PaperCompat())
    _check_unit(residual[newly], 1.0, "upsampled")
    _check_unit(residual[..., ::2, ::2][stays_low[..., ::2, ::2]], 1.0, "stays low-res")
    for products in _block_pairs(residual, newly):  # no correlation left inside upsampled blocks
        assert abs(products.mean().item()) < SIGMAS / math.sqrt(products.numel())
    # low-res tokens stay low-res: their 2x2 blocks hold one value.
    assert torch.equal(residual[..., 0::2, 0::2][stays_low[..., ::2, ::2]], residual[..., 1::2, 1::2][stays_low[..., ::2, ::2]])


def test_transition_mixed_to_full_is_exact():
    c = 0.04
    was_full = _random_selection(N_MC, GRID, K, seed=2)
    now_full = torch.ones(N_MC, *GRID, dtype=torch.bool)
    residual, newly, stays_full, _ = _monte_carlo_transition(N_MC, was_full, now_full, e=0.45, c=c, compat=PaperCompat(), seed=3)
    _check_unit(residual[newly], 1.0, "upsampled")
    _check_unit(residual[stays_full], 1.0, "already full-res")
    for mask in (newly, stays_full):
        for products in _block_pairs(residual, mask):
            assert abs(products.mean().item()) < SIGMAS / math.sqrt(products.numel())


def test_plain_noise_would_fail_the_correlation_check(monkeypatch):
    # The same check catches the naive choice z = eps on upsampled blocks (what the
    # correction removes): the correlation left is c / (1 + c) ~ 0.038.
    import ralu.runtime.noise as noise_module

    was_full = torch.zeros(N_MC, *GRID, dtype=torch.bool)
    now_full = torch.ones(N_MC, *GRID, dtype=torch.bool)
    monkeypatch.setattr(noise_module, "correlated_noise", lambda eps, c, repeat_tokens=False: eps)
    residual, newly, _, _ = _monte_carlo_transition(N_MC, was_full, now_full, e=0.3, c=0.04, compat=PaperCompat())
    products = _block_pairs(residual, newly)[0]
    assert products.mean().item() > SIGMAS / math.sqrt(products.numel())


@pytest.mark.parametrize("compat", [PaperCompat(unit_noise=True), PaperCompat.parse(True)])
def test_paper_compat_adds_relative_variance_c_on_not_upsampled_tokens(compat):
    clear_global_noise()
    c = 0.04
    was_full = _random_selection(N_MC, GRID, K, seed=4)
    now_full = was_full | _random_selection(N_MC, GRID, 3, seed=5)
    residual, newly, stays_full, stays_low = _monte_carlo_transition(N_MC, was_full, now_full, e=0.3, c=c, compat=compat, seed=6)
    _check_unit(residual[stays_full & ~newly], 1.0 + c, "already full-res (paper)")
    low_unique = residual[..., ::2, ::2][stays_low[..., ::2, ::2]]
    _check_unit(low_unique, 1.0 + c, "stays low-res (paper)")


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


# ----------------------------------------------------------------------------------------
# The whole sampler, Monte Carlo: a point-mass "model" keeps the latent on the path, so the
# state each stage starts from must be exactly on the rectified-flow path there.
# ----------------------------------------------------------------------------------------


class PointMassModel:
    """Exact velocity for data concentrated at ``x0`` (a canvas): ``v = (x - x0) / sigma``.
    Euler steps with it stay on ``x = (1 - sigma) x0 + sigma n``; records the state every
    stage starts from (= right after the transition)."""

    def __init__(self, x0, seed=0):
        self.x0 = x0
        self.starts = {}
        self.generator = torch.Generator().manual_seed(seed)

    def stage(self, layout, stage):
        from contextlib import contextmanager

        @contextmanager
        def context():
            target = layout.gather(self.x0)

            def velocity(patches, sigma):
                self.starts.setdefault(stage.index, (sigma, layout.scatter(patches), layout))
                return (patches - target) / sigma

            yield velocity

        return context()

    def decode_for_edges(self, latent):
        b, _, h, w = latent.shape
        return torch.rand(b, 3, 4 * h, 4 * w, generator=self.generator) * 2 - 1  # random edges per image


def test_sampler_starts_every_stage_on_the_path(make_schedule):
    from ralu.runtime.plan import make_plan
    from ralu.runtime.sampler import run_stages

    n, c = 2000, 0.04
    schedule = make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (2, 1.0, 2.2)], c=c, up_ratio=0.4, height=128, width=128)
    plan = make_plan(schedule, "flux", 128, 128)
    assert plan.grid == (4, 4) and [s.tokens for s in plan.stages] == [16, 16 + 3 * 6, 64]
    g = torch.Generator().manual_seed(0)
    x0 = upsample_nearest(20.0 + torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)).expand(n, -1, -1, -1)
    model = PointMassModel(x0)
    noise = torch.randn(n, 4, 16, 16, generator=g, dtype=torch.float64)
    result = run_stages(plan, initial_canvas(noise, "low").double(), model, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(result.canvas.float(), x0.float(), atol=1e-3)  # the point mass is reached
    assert len({tuple(row.tolist()) for row in result.selected}) > n // 2  # per-image selections
    previous = torch.zeros(n, 4, 4, dtype=torch.bool)
    for index in (1, 2):
        sigma, canvas, layout = model.starts[index]
        s = schedule.stages[index].start
        assert sigma == pytest.approx(1 - s)
        residual = (canvas - s * x0) / (1 - s)
        newly = expand_mask(layout.full_mask & ~previous, 4)[:, None].expand_as(canvas)
        old = expand_mask(previous, 4)[:, None].expand_as(canvas)
        low = expand_mask(~layout.full_mask, 4)[:, None].expand_as(canvas)
        _check_unit(residual[newly], 1.0, f"stage {index + 1} upsampled")
        if old.any():
            _check_unit(residual[old], 1.0, f"stage {index + 1} already full-res")
        if low.any():
            _check_unit(residual[..., ::2, ::2][low[..., ::2, ::2]], 1.0, f"stage {index + 1} low-res")
        for products in _block_pairs(residual, newly):
            assert abs(products.mean().item()) < SIGMAS / math.sqrt(products.numel())
        previous = layout.full_mask
