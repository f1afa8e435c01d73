"""Rotary positions of an arbitrary token set for Qwen-Image transformers, through the
model's own forward.

``QwenImageTransformer2DModel.forward`` builds its rotary tables inside, from ``img_shapes``:
``pos_embed`` (``QwenEmbedRope`` with ``scale_rope=True``) returns complex tables
``(vid_freqs (N, D/2), txt_freqs (T, D/2))`` for a whole ``frames x rows x cols`` grid.
Its positions are *centred*: on an axis of ``n`` tokens, token ``r`` sits at
``r - (n - n // 2)`` (``-ceil(n/2) .. floor(n/2) - 1``), the frame axis at 0, and the text
tokens follow on every axis from ``max(rows // 2, cols // 2)`` on.

RALU's mixed stage carries a token set that is no grid.  :func:`rotary_table` computes the
table at any (possibly fractional) positions with the module's own frequencies
(``pos_embed.rope_params``: at integer positions it equals the module's table bit for bit),
and :func:`token_positions` says where a layout's tokens sit:

* roles ``low`` and ``mixed``: centred on the low-res grid (a native half-size image); a
  child (dy, dx) of low-res token (i, j) sits at (i + dy/2, j + dx/2) in those units;
* role ``full``: centred on the full-res grid (a native full-size image).

:func:`stage_positions` substitutes the table by a forward hook on ``pos_embed``, so the
forward, the blocks, the attention modules, hooks, LoRA and step caches all run as usual.
When the images of a batch carry different tokens the tables are per image ``(B, N, D/2)``;
diffusers' ``QwenDoubleStreamAttnProcessor2_0`` applies one table to the whole batch, so for
the duration its instances are replaced by :class:`PerImageRotaryProcessor`, which does the
same but also accepts per-image tables (and keeps the original's attention backend).  Any
other processor is reported by :func:`supports_per_image_positions` so that the caller can
fall back to one forward per image.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .tokens import TokenLayout


def stage_grid(layout: TokenLayout) -> tuple[int, int]:
    """Rows and columns of the native grid a stage's positions are centred on: the low-res
    grid for roles ``low`` and ``mixed``, the full-res grid for ``full``."""
    gh, gw = layout.grid
    return (2 * gh, 2 * gw) if layout.role == "full" else (gh, gw)


def token_positions(layout: TokenLayout) -> torch.Tensor:
    """``(B, N, 2)`` float32 centred (row, col) of a layout's tokens (module docstring)."""
    rows, cols = stage_grid(layout)
    origin = torch.tensor([rows - rows // 2, cols - cols // 2], dtype=torch.float32, device=layout.full_mask.device)
    return layout.positions() - origin


def rotary_table(pos_embed, positions: torch.Tensor) -> torch.Tensor:
    """Complex rotary table ``(..., D/2)`` of image tokens at ``positions`` ``(..., 2)``
    (centred row, col; frame 0), with ``pos_embed``'s own axes and frequencies."""
    frame_dim, row_dim, col_dim = pos_embed.axes_dim
    flat = positions.reshape(-1, 2).float().cpu()
    parts = [
        pos_embed.rope_params(torch.zeros(flat.shape[0]), frame_dim, pos_embed.theta),
        pos_embed.rope_params(flat[:, 0], row_dim, pos_embed.theta),
        pos_embed.rope_params(flat[:, 1], col_dim, pos_embed.theta),
    ]
    return torch.cat(parts, dim=1).reshape(*positions.shape[:-1], -1).to(positions.device)


def grid_table(pos_embed, rows: int, cols: int, device=None) -> torch.Tensor:
    """The table ``pos_embed`` itself builds for a native ``rows x cols`` image (one frame)."""
    vid, _ = pos_embed([(1, rows, cols)], device=device, max_txt_seq_len=1)
    return vid


def _attention_modules(transformer):
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    return [block.attn for block in transformer.modules() if isinstance(block, QwenImageTransformerBlock)]


def supports_per_image_positions(transformer) -> bool:
    """True when every attention module uses diffusers' default ``QwenDoubleStreamAttnProcessor2_0``."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    modules = _attention_modules(transformer)
    return bool(modules) and all(type(module.processor) is QwenDoubleStreamAttnProcessor2_0 for module in modules)


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Qwen-Image's rotary embedding of ``x`` ``(B, L, heads, D)`` (channel pairs (2i, 2i+1)
    as complex numbers) by complex tables ``(L, D/2)`` (shared) or ``(B, L, D/2)`` (per image)."""
    freqs = freqs[None, :, None, :] if freqs.ndim == 2 else freqs[:, :, None, :]
    turned = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.to(x.device)
    return torch.view_as_real(turned).flatten(3).type_as(x)


class PerImageRotaryProcessor:
    """Joint text-image attention of a Qwen-Image block whose image rotary table may be per
    image.  ``backend``/``parallel_config``: those of the processor it stands in for."""

    def __init__(self, backend=None, parallel_config=None):
        self._attention_backend = backend
        self._parallel_config = parallel_config

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("PerImageRotaryProcessor takes the text stream and its mask only (as QwenDoubleStreamAttnProcessor2_0)")
        head_dim = attn.inner_dim // attn.heads

        def heads(projection, states, norm):
            out = projection(states).unflatten(-1, (-1, head_dim))
            return norm(out) if norm is not None else out

        image_q, image_k = heads(attn.to_q, hidden_states, attn.norm_q), heads(attn.to_k, hidden_states, attn.norm_k)
        image_v = heads(attn.to_v, hidden_states, None)
        text_q = heads(attn.add_q_proj, encoder_hidden_states, attn.norm_added_q)
        text_k = heads(attn.add_k_proj, encoder_hidden_states, attn.norm_added_k)
        text_v = heads(attn.add_v_proj, encoder_hidden_states, None)
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            image_q, image_k = rotate(image_q, image_freqs), rotate(image_k, image_freqs)
            text_q, text_k = rotate(text_q, text_freqs), rotate(text_k, text_freqs)

        mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        joint = dispatch_attention_fn(
            torch.cat([text_q, image_q], dim=1),
            torch.cat([text_k, image_k], dim=1),
            torch.cat([text_v, image_v], dim=1),
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        joint = joint.flatten(2, 3).to(text_q.dtype)
        text_len = encoder_hidden_states.shape[1]
        image_out = attn.to_out[0](joint[:, text_len:].contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(joint[:, :text_len].contiguous())


@contextmanager
def stage_positions(transformer, table: torch.Tensor):
    """Within the block, every forward of ``transformer`` rotates its image tokens by
    ``table``: ``(N, D/2)`` for every image, or ``(B, N, D/2)`` per image (which needs
    :func:`supports_per_image_positions`).  The forward's ``img_shapes`` must name the
    stage's native grid (:func:`stage_grid`): the text positions come from it, as in a
    native image of that size."""
    per_image = table.ndim == 3
    if per_image and not supports_per_image_positions(transformer):
        raise RuntimeError("per-image positions need diffusers' default QwenDoubleStreamAttnProcessor2_0 in every attention module")

    def substitute(module, args, output):
        # ``output``: the native grid's image table (replaced) and the text table (kept).
        vid, txt = output
        return table.to(vid.device), txt

    modules = _attention_modules(transformer) if per_image else []
    originals = [module.processor for module in modules]
    handle = transformer.pos_embed.register_forward_hook(substitute)
    try:
        for module, original in zip(modules, originals):
            module.processor = PerImageRotaryProcessor(getattr(original, "_attention_backend", None), getattr(original, "_parallel_config", None))
        yield
    finally:
        handle.remove()
        for module, original in zip(modules, originals):
            module.processor = original
