"""The SD3 token path (ralu.runtime.sd3_tokens) against SD3Transformer2DModel.forward."""

from __future__ import annotations

import pytest
import torch
from sd3_models import POOLED_DIM, SD3_MEDIUM_LIKE, SD35_MEDIUM_LIKE, TEXT_DIM, tiny_transformer

from ralu.runtime import sd3_tokens as st
from ralu.runtime.tokens import patchify, unpatchify

VARIANTS = {"sd3-medium-like": SD3_MEDIUM_LIKE, "sd3.5-medium-like": SD35_MEDIUM_LIKE}


@pytest.fixture(scope="module", params=list(VARIANTS))
def transformer(request):
    return tiny_transformer(**VARIANTS[request.param])


def _inputs(batch=2, rows=6, cols=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, 2 * rows, 2 * cols, generator=generator),
        torch.randn(batch, 7, TEXT_DIM, generator=generator),
        torch.randn(batch, POOLED_DIM, generator=generator),
        torch.tensor([700.0, 125.5][:batch]),
    )


@pytest.mark.parametrize("skip_layers", [None, [0], [1]])
@torch.no_grad()
def test_full_grid_equals_forward(transformer, skip_layers):
    latent, text, pooled, timestep = _inputs()
    reference = transformer(latent, text, pooled, timestep, return_dict=False, skip_layers=skip_layers)[0]
    positions = st.grid_positions(transformer, 6, 5)
    tokens = st.token_forward(transformer, patchify(latent, 2), positions, text, pooled, timestep, skip_layers=skip_layers)
    assert tokens.shape == (2, 30, 16, 2, 2)
    assert torch.allclose(unpatchify(tokens, 12, 10), reference, atol=1e-5, rtol=0)


@torch.no_grad()
def test_token_set_is_order_free_and_per_image(transformer):
    """Permuting tokens (differently per image) permutes the output: a set function."""
    latent, text, pooled, timestep = _inputs()
    reference = patchify(transformer(latent, text, pooled, timestep, return_dict=False)[0], 2)
    patches = patchify(latent, 2)
    positions = st.grid_positions(transformer, 6, 5)
    order = torch.stack([torch.randperm(30, generator=torch.Generator().manual_seed(b)) for b in range(2)])
    gather = order[:, :, None, None, None].expand(-1, -1, 16, 2, 2)
    out = st.token_forward(transformer, patches.gather(1, gather), positions[order], text, pooled, timestep)
    assert torch.allclose(out, reference.gather(1, gather), atol=1e-5, rtol=0)


@torch.no_grad()
def test_patchify_roundtrip_and_layout():
    latent = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify(latent, 2)
    assert tokens.shape == (2, 6, 3, 2, 2)
    assert torch.equal(unpatchify(tokens, 4, 6), latent)
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        patchify(latent, 4)
    with pytest.raises(ValueError, match="cannot fill a 4x4 latent"):
        unpatchify(tokens, 4, 4)
    # token 4 = row 1, column 1: latent pixels rows 2-3, columns 2-3
    assert torch.equal(tokens[:, 4], latent[:, :, 2:4, 2:4])


def test_positions_are_the_models_centre_crop(transformer):
    table = transformer.pos_embed.pos_embed[0]
    for rows, cols in [(6, 5), (3, 2), (16, 16)]:
        expected = transformer.pos_embed.cropped_pos_embed(rows * 2, cols * 2)[0]
        got = st.position_embedding(transformer, st.grid_positions(transformer, rows, cols))
        assert torch.equal(got, expected)
    assert st.table_formula_matches(transformer)
    # the formula evaluated at integer coordinates reproduces the stored table
    size = transformer.pos_embed.pos_embed_max_size
    grid = st.grid_positions(transformer, size, size)
    analytic = st._analytic_embedding(transformer, grid[:, 0], grid[:, 1], table.shape[-1])
    assert torch.allclose(analytic.float(), table, atol=1e-6, rtol=0)


def test_fractional_positions_follow_the_formula(transformer):
    positions = torch.tensor([[[20.5, 21.0], [20.0, 21.5], [7.25, 30.75]]])
    got = st.position_embedding(transformer, positions)[0]
    spacing = transformer.pos_embed.base_size / transformer.pos_embed.pos_embed_max_size
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

    half = got.shape[-1] // 2
    for (row, col), emb in zip(positions[0].tolist(), got):
        expected_col = get_1d_sincos_pos_embed_from_grid(half, torch.tensor([col * spacing], dtype=torch.float64))[0]
        expected_row = get_1d_sincos_pos_embed_from_grid(half, torch.tensor([row * spacing], dtype=torch.float64))[0]
        assert torch.allclose(emb.double(), torch.cat([expected_col, expected_row]), atol=1e-6)
    # half-way between two table entries is between them (smoothness sanity check)
    mid = st.position_embedding(transformer, torch.tensor([[20.0, 21.5]]))
    ends = st.position_embedding(transformer, torch.tensor([[20.0, 21.0], [20.0, 22.0]]))
    assert (mid - ends.mean(0)).abs().max() < 0.1


def test_stored_table_off_formula_falls_back_to_interpolation():
    model = tiny_transformer()
    with torch.no_grad():
        model.pos_embed.pos_embed.mul_(0.5)
    assert not st.table_formula_matches(model)
    with pytest.warns(RuntimeWarning, match="bilinear"):
        mid = st.position_embedding(model, torch.tensor([[20.0, 21.5]]))
    ends = st.position_embedding(model, torch.tensor([[20.0, 21.0], [20.0, 22.0]]))
    assert torch.allclose(mid[0], ends.mean(0), atol=1e-6)


def test_clear_errors(transformer):
    latent, text, pooled, timestep = _inputs()
    patches = patchify(latent, 2)
    with pytest.raises(ValueError, match="position table covers"):
        st.token_forward(transformer, patches, st.grid_positions(transformer, 6, 5) + 100, text, pooled, timestep)
    with pytest.raises(ValueError, match="patch size"):
        st.token_forward(transformer, patchify(latent, 1), torch.zeros(2, 120, 2), text, pooled, timestep)
    with pytest.raises(ValueError, match="does not fit"):
        st.grid_positions(transformer, 49, 10)
    with pytest.raises(TypeError, match="SD3"):
        st.token_forward(torch.nn.Linear(2, 2), patches, st.grid_positions(transformer, 6, 5), text, pooled, timestep)


@torch.no_grad()
def test_precomputed_position_embeddings_equal_positions(transformer):
    """A sampler computes the embeddings once per stage (``position_embeds``): same output."""
    latent, text, pooled, timestep = _inputs()
    patches = patchify(latent, 2)
    positions = st.grid_positions(transformer, 6, 5) + torch.tensor([0.5, 0.0])  # fractional rows
    embeds = st.position_embedding(transformer, positions)
    want = st.token_forward(transformer, patches, positions, text, pooled, timestep)
    assert torch.equal(st.token_forward(transformer, patches, None, text, pooled, timestep, position_embeds=embeds), want)
    with pytest.raises(ValueError, match="position embeddings"):
        st.token_forward(transformer, patches, None, text, pooled, timestep, position_embeds=embeds[:-1])
    with pytest.raises(ValueError, match="positions or position_embeds"):
        st.token_forward(transformer, patches, None, text, pooled, timestep)


@torch.no_grad()
def test_a_copied_transformer_carries_its_own_token_path(transformer):
    """The token path's hooks find their state on the module they run on: a deep copy of a
    transformer that already ran it gives the same output, and the original is untouched."""
    import copy

    latent, text, pooled, timestep = _inputs()
    patches = st.patchify(latent, 2)
    positions = st.grid_positions(transformer, 6, 5) + torch.tensor([0.5, 0.0])
    want = st.token_forward(transformer, patches, positions, text, pooled, timestep)
    twin = copy.deepcopy(transformer)
    assert torch.equal(st.token_forward(twin, patches, positions, text, pooled, timestep), want)
    assert torch.equal(st.token_forward(transformer, patches, positions, text, pooled, timestep), want)
