"""A token-level forward of diffusers' ``SD3Transformer2DModel``.

``SD3Transformer2DModel.forward`` takes a latent image (B, C, H, W).  Only two of its parts
depend on that grid: the patch embedding (a stride-p convolution plus a sin-cos position table
cropped from the centre of a ``pos_embed_max_size`` square) and the final unpatchify.  Everything
in between (time/text embedders, joint blocks, ``norm_out``, ``proj_out``) works on any token
sequence.  :func:`token_forward` therefore runs the model on an arbitrary per-image set of
(patch, position) pairs, which is what the mixed-resolution stage of RALU needs: the tokens are
laid out as a one-row latent strip and go through the model's own ``forward``, whose patch
embedding output is replaced by the tokens' embeddings (a pair of hooks on ``pos_embed``).
Forward hooks, diffusers' caches, LoRA scaling, CPU offload and a compiled forward therefore
see every evaluation, exactly as on a native grid.

Nothing of the model is re-implemented numerically except the position table evaluation and
(un)patchify: every weight is used through the model's own modules (the patch projection is the
model's ``pos_embed.proj`` convolution applied to one patch at a time), so LoRA / PEFT layers on
the transformer still apply.

Coordinates: a *table coordinate* ``(row, col)`` indexes the model's ``pos_embed_max_size`` x
``pos_embed_max_size`` position table (row-major, as ``PatchEmbed.cropped_pos_embed`` reads it).
A native ``h x w`` token grid sits at rows ``top .. top + h - 1`` and columns
``left .. left + w - 1`` with ``top = (G - h) // 2``, ``left = (G - w) // 2`` (the centre crop).
Integer coordinates are read from the model's table buffer itself; fractional ones are evaluated
analytically with the table's own formula (``diffusers.models.embeddings``'s 1-D sin-cos at
``index * base_size / G / interpolation_scale``; in the table the first half of the features
encodes the column, the second half the row).  If a checkpoint's stored table does not follow
that formula, fractional coordinates fall back to bilinear interpolation of the stored table
(with a warning).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

from .tokens import patchify, unpatchify

__all__ = [
    "check_sd3_transformer",
    "embed_tokens",
    "grid_origin",
    "grid_positions",
    "position_embedding",
    "table_formula_matches",
    "token_forward",
]


def check_sd3_transformer(transformer) -> None:
    """Raise a clear error when ``transformer`` is not an SD3-style model the token path knows."""
    pos_embed = getattr(transformer, "pos_embed", None)
    missing = [name for name in ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks", "norm_out", "proj_out") if getattr(transformer, name, None) is None]
    if missing:
        raise TypeError(f"{type(transformer).__name__} lacks {missing}: the SD3 token path needs an SD3Transformer2DModel (SD3 / SD3.5). Fix: load the transformer of a Stable Diffusion 3 checkpoint")
    if getattr(pos_embed, "pos_embed_max_size", None) is None or getattr(pos_embed, "pos_embed", None) is None:
        raise TypeError("the transformer's patch embedding has no cropped sin-cos table (pos_embed_max_size is None): not an SD3 layout. Fix: use an SD3 / SD3.5 transformer")
    if getattr(pos_embed, "layer_norm", False):
        raise TypeError("the transformer's patch embedding normalises patches (layer_norm=True): not an SD3 layout")


# ----------------------------------------------------------------------------------------
# Positions.
# ----------------------------------------------------------------------------------------


def grid_origin(transformer, rows: int, cols: int) -> tuple[int, int]:
    """Table coordinate of the top-left token of a native ``rows x cols`` grid (centre crop)."""
    size = transformer.pos_embed.pos_embed_max_size
    if rows > size or cols > size:
        largest = size * transformer.pos_embed.patch_size * 8
        raise ValueError(
            f"a {rows}x{cols} token grid does not fit the transformer's {size}x{size} position table (pos_embed_max_size). "
            f"Fix: generate a smaller image (at most {largest} px a side for a VAE factor of 8)"
        )
    return (size - rows) // 2, (size - cols) // 2


def grid_positions(transformer, rows: int, cols: int, device=None) -> torch.Tensor:
    """Table coordinates (rows * cols, 2) of a native grid, row-major: what ``forward`` uses."""
    top, left = grid_origin(transformer, rows, cols)
    r = torch.arange(rows, device=device, dtype=torch.float32) + top
    c = torch.arange(cols, device=device, dtype=torch.float32) + left
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(rows * cols, 2)


def _table(transformer) -> tuple[torch.Tensor, int]:
    pos_embed = transformer.pos_embed
    size = pos_embed.pos_embed_max_size
    table = pos_embed.pos_embed
    return table.reshape(size, size, table.shape[-1]), size


def _table_spacing(transformer) -> float:
    pos_embed = transformer.pos_embed
    return pos_embed.base_size / pos_embed.pos_embed_max_size / pos_embed.interpolation_scale


def _analytic_embedding(transformer, rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """The table's own formula at (possibly fractional) table coordinates; flat inputs (N,)."""
    spacing = _table_spacing(transformer)
    dtype = torch.float32 if rows.device.type == "mps" else torch.float64
    emb_cols = get_1d_sincos_pos_embed_from_grid(dim // 2, cols.to(dtype) * spacing, dtype=dtype)
    emb_rows = get_1d_sincos_pos_embed_from_grid(dim // 2, rows.to(dtype) * spacing, dtype=dtype)
    return torch.cat([emb_cols, emb_rows], dim=1)


_FORMULA_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, int, bool]] = weakref.WeakKeyDictionary()


def table_formula_matches(transformer) -> bool:
    """Whether the model's stored table equals the sin-cos formula (checked on 3G entries, cached)."""
    pos_embed = transformer.pos_embed
    buffer = pos_embed.pos_embed
    key = (buffer.data_ptr(), buffer._version)
    cached = _FORMULA_CHECKED.get(pos_embed)
    if cached is not None and cached[:2] == key:
        return cached[2]
    table, size = _table(transformer)
    index = torch.arange(size, device=buffer.device)
    zeros = torch.zeros_like(index)
    rows = torch.cat([index, index, zeros])
    cols = torch.cat([index, zeros, index])
    stored = table[rows, cols].double()
    analytic = _analytic_embedding(transformer, rows.float(), cols.float(), table.shape[-1]).to(stored)
    tolerance = max(1e-4, 4 * torch.finfo(buffer.dtype).eps)
    matches = bool((stored - analytic).abs().max() <= tolerance)
    _FORMULA_CHECKED[pos_embed] = (*key, matches)
    return matches


def _bilinear(table: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    size = table.shape[0]
    r0 = rows.floor().clamp(0, size - 1)
    c0 = cols.floor().clamp(0, size - 1)
    r1 = (r0 + 1).clamp(max=size - 1)
    c1 = (c0 + 1).clamp(max=size - 1)
    wr = (rows - r0).unsqueeze(-1).to(table.dtype)
    wc = (cols - c0).unsqueeze(-1).to(table.dtype)
    r0, c0, r1, c1 = r0.long(), c0.long(), r1.long(), c1.long()
    top = table[r0, c0] * (1 - wc) + table[r0, c1] * wc
    bottom = table[r1, c0] * (1 - wc) + table[r1, c1] * wc
    return top * (1 - wr) + bottom * wr


def position_embedding(transformer, positions: torch.Tensor) -> torch.Tensor:
    """Per-token position embedding at table coordinates ``positions`` (..., 2) = (row, col).

    Returns (..., D) in the table's dtype.  Integer coordinates are gathered from the model's
    own table (bit-identical to ``forward``); fractional ones use the table's formula.
    """
    if positions.shape[-1] != 2:
        raise ValueError(f"positions must end in (row, col), got shape {tuple(positions.shape)}")
    table, size = _table(transformer)
    flat = positions.reshape(-1, 2).to(device=table.device, dtype=torch.float32)
    if flat.numel() and (flat.min() < 0 or flat.max() > size - 1):
        raise ValueError(f"token positions span [{flat.min().item():g}, {flat.max().item():g}] but the position table covers [0, {size - 1}] (pos_embed_max_size={size}). Fix: generate a smaller image")
    rounded = flat.round()
    integral = (flat == rounded).all(dim=-1)
    index = rounded.long()
    out = table[index[:, 0], index[:, 1]]
    if not bool(integral.all()):
        fractional = ~integral
        rows, cols = flat[fractional, 0], flat[fractional, 1]
        if table_formula_matches(transformer):
            values = _analytic_embedding(transformer, rows, cols, table.shape[-1])
        else:
            warnings.warn(
                "the transformer's stored position table does not follow the sin-cos formula of its config; "
                "fractional token positions use bilinear interpolation of the stored table instead",
                RuntimeWarning,
                stacklevel=2,
            )
            values = _bilinear(table.double(), rows.double(), cols.double())
        out = out.clone()
        out[fractional] = values.to(out.dtype)
    return out.reshape(*positions.shape[:-1], table.shape[-1])


# ----------------------------------------------------------------------------------------
# The forward.
# ----------------------------------------------------------------------------------------


def embed_tokens(transformer, patches: torch.Tensor, positions: torch.Tensor | None, position_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Patch projection through the model's own ``pos_embed.proj`` plus position embedding.

    ``patches`` (B, n, C, p, p), ``positions`` (B, n, 2) or (n, 2) -> (B, n, D).
    ``position_embeds`` (B, n, D) or (n, D): ``position_embedding(transformer, positions)``
    computed beforehand (a sampler does it once per stage, not once per step); it replaces
    ``positions``, which may then be None.
    """
    position_embeds = _checked_position_embeds(transformer, patches, positions, position_embeds, "embed_tokens")
    return _project(transformer.pos_embed, patches, position_embeds)


def _checked_position_embeds(transformer, patches: torch.Tensor, positions, position_embeds, caller: str) -> torch.Tensor:
    """The position embeddings of ``patches`` ``(B, n, C, p, p)``: ``position_embeds`` as
    given, or computed from ``positions``; a ValueError when the patch size or the counts
    do not match the transformer."""
    _, count, _, patch, patch_w = patches.shape
    if patch != transformer.pos_embed.patch_size or patch_w != transformer.pos_embed.patch_size:
        raise ValueError(f"patches are {patch}x{patch_w} but the transformer's patch size is {transformer.pos_embed.patch_size}")
    if position_embeds is None:
        if positions is None:
            raise ValueError(f"{caller} needs positions or position_embeds")
        if positions.shape[-2] != count:
            raise ValueError(f"{count} patches but {positions.shape[-2]} positions")
        return position_embedding(transformer, positions)
    if position_embeds.shape[-2] != count:
        raise ValueError(f"{count} patches but {position_embeds.shape[-2]} position embeddings")
    return position_embeds


def _project(pos_embed, patches: torch.Tensor, position_embeds: torch.Tensor) -> torch.Tensor:
    """The model's patch projection of ``patches`` (B, n, C, p, p), one patch at a time,
    plus their position embeddings."""
    batch, count, channels, patch, _ = patches.shape
    projected = pos_embed.proj(patches.reshape(batch * count, channels, patch, patch))
    projected = projected.reshape(batch, count, -1)
    return (projected + position_embeds).to(projected.dtype)


class _Substitution:
    """What a patch embedding returns during a token forward: the embeddings of the tokens of
    ``strip`` (the one-row latent the forward was given, re-cut into patches) at the
    precomputed ``position_embeds``; None outside a token forward (it runs as usual)."""

    def __init__(self):
        self.position_embeds: torch.Tensor | None = None
        self.strip: torch.Tensor | None = None


_SUBSTITUTION = "_ralu_token_substitution"


def _before_embedding(pos_embed, args):
    state = pos_embed.__dict__[_SUBSTITUTION]
    if state.position_embeds is None:
        return None
    # The strip can be wider than the position table; the embedding's own output is replaced
    # below, so it only sees one patch.
    state.strip = args[0]
    patch = pos_embed.patch_size
    return (args[0][..., :patch, :patch], *args[1:])


def _after_embedding(pos_embed, args, output):
    state = pos_embed.__dict__[_SUBSTITUTION]
    if state.position_embeds is None:
        return None
    strip, state.strip = state.strip, None
    return _project(pos_embed, patchify(strip, pos_embed.patch_size), state.position_embeds)


def _substitution(transformer) -> _Substitution:
    """The substitution state of the transformer's patch embedding, with its two hooks
    installed once.  The hooks stay installed (they do nothing outside a token forward) and
    are module-level functions that find the state on the module they are called with: a
    compiled transformer sees the same hooks on every call, and a copied transformer
    (``copy.deepcopy``) carries its own state."""
    pos_embed = transformer.pos_embed
    state = pos_embed.__dict__.get(_SUBSTITUTION)
    if state is None:
        state = pos_embed.__dict__[_SUBSTITUTION] = _Substitution()
        pos_embed.register_forward_pre_hook(_before_embedding)
        pos_embed.register_forward_hook(_after_embedding)
    return state


def token_forward(
    transformer,
    patches: torch.Tensor,
    positions: torch.Tensor | None,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    joint_attention_kwargs: dict[str, Any] | None = None,
    skip_layers: list[int] | None = None,
    position_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """``SD3Transformer2DModel.forward`` on an arbitrary token set.

    Args:
        patches: (B, n, C, p, p) latent patches, one per token (any order, any mix of grids).
        positions: (B, n, 2) or (n, 2) float table coordinates (row, col) of each token; may be
            None when ``position_embeds`` is given.
        encoder_hidden_states, pooled_projections, timestep: as for ``forward``.
        joint_attention_kwargs: as for ``forward`` (``scale`` sets the LoRA scale).
        skip_layers: block indices to skip, as ``forward``'s ``skip_layers``.
        position_embeds: (B, n, D) or (n, D), ``position_embedding(transformer, positions)``
            computed once for many evaluations at the same positions (a sampling stage).

    Returns (B, n, C_out, p, p): the model's output patch for each token.  On a full native grid
    (``patchify`` of the latent at ``grid_positions``) this equals ``unpatchify``-able ``forward``
    output.  Memory beyond attention is O(n).
    """
    check_sd3_transformer(transformer)
    if patches.dim() != 5:
        raise ValueError(f"patches must be (B, n, C, p, p), got shape {tuple(patches.shape)}")
    position_embeds = _checked_position_embeds(transformer, patches, positions, position_embeds, "token_forward")
    count, patch = patches.shape[1], patches.shape[3]
    # The tokens, laid out as a one-row latent strip, go through the model's own forward (so
    # its hooks, caches and a compiled forward see the step); only the patch embedding's
    # output is substituted (see _substitution), and the strip the forward returns is cut
    # back into one output patch per token.
    state = _substitution(transformer)
    state.position_embeds = position_embeds
    try:
        out = transformer(
            hidden_states=unpatchify(patches, patch, count * patch),
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            joint_attention_kwargs=joint_attention_kwargs,
            return_dict=False,
            skip_layers=skip_layers,
        )[0]
    finally:
        state.position_embeds = state.strip = None
    return patchify(out, patch)
