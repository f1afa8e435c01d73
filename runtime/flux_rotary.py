"""Per-image rotary positions for FLUX transformers, through the model's own forward.

``FluxTransformer2DModel.forward`` takes one position set for the whole batch (a 3-D
``img_ids`` is reduced to ``ids[0]``).  RALU's mixed stage gives every image its own token
positions.  :func:`per_sample_positions` makes one batched forward use per-image positions
without bypassing anything:

* the rotary tables are computed by the transformer's own ``pos_embed`` module (float32
  ids, the module's own float64 frequencies) for every image: ``(B, L, D)`` cos and sin;
* a forward hook on ``pos_embed`` substitutes them for the shared table the forward
  computes from the 2-D ids it is given;
* the attention modules' processors are, for the duration, :class:`PerSampleRotaryAttnProcessor`,
  which does what diffusers' default ``FluxAttnProcessor`` does but also accepts per-image
  tables (and keeps the original processor's attention backend).

The forward, the blocks, the Linear layers (so LoRA/PEFT), hooks and caches all run as
usual.  Only the default processor is replaced; a transformer with any other processor
(IP-Adapter, custom) is reported by :func:`supports_per_sample_positions` so the caller can
fall back to one forward per image.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .profiling import section


def _attention_modules(transformer):
    from diffusers.models.transformers.transformer_flux import FluxAttention

    return [module for module in transformer.modules() if isinstance(module, FluxAttention)]


def supports_per_sample_positions(transformer) -> bool:
    """True when every attention module uses diffusers' default ``FluxAttnProcessor``."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    modules = _attention_modules(transformer)
    return bool(modules) and all(type(module.processor) is FluxAttnProcessor for module in modules)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX rotary embedding of ``x`` ``(B, L, heads, D)`` with tables ``(L, D)`` (shared)
    or ``(B, L, D)`` (per image); pairs of channels (2i, 2i+1) rotate together."""
    if cos.ndim == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    cos, sin = cos.to(x.device), sin.to(x.device)
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


class PerSampleRotaryAttnProcessor:
    """Joint attention of a ``FluxAttention`` module (dual-stream or single-stream block)
    whose rotary tables may be per image.  ``backend``/``parallel_config``: those of the
    processor it stands in for."""

    def __init__(self, backend=None, parallel_config=None):
        self._attention_backend = backend
        self._parallel_config = parallel_config

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            if getattr(attn, "fused_projections", False):
                text_q, text_k, text_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                text_q = attn.add_q_proj(encoder_hidden_states)
                text_k = attn.add_k_proj(encoder_hidden_states)
                text_v = attn.add_v_proj(encoder_hidden_states)
            text_q = attn.norm_added_q(text_q.unflatten(-1, (-1, attn.head_dim)))
            text_k = attn.norm_added_k(text_k.unflatten(-1, (-1, attn.head_dim)))
            text_v = text_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_k, key], dim=1)
            value = torch.cat([text_v, value], dim=1)

        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            query, key = rotate(query, cos, sin), rotate(key, cos, sin)

        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out


def rotary_tables(transformer, txt_ids: torch.Tensor, img_ids: torch.Tensor):
    """Per-image rotary tables ``(B, T + N, D)`` (cos, sin) from the transformer's own
    ``pos_embed``, for text ids ``(T, 3)`` and per-image image ids ``(B, N, 3)`` (float32)."""
    batch = img_ids.shape[0]
    txt = txt_ids.to(device=img_ids.device, dtype=torch.float32)[None].expand(batch, -1, -1)
    ids = torch.cat([txt, img_ids.float()], dim=1)
    cos, sin = transformer.pos_embed(ids.reshape(-1, ids.shape[-1]))
    return cos.reshape(batch, ids.shape[1], -1), sin.reshape(batch, ids.shape[1], -1)


@contextmanager
def per_sample_positions(transformer, txt_ids_list, img_ids: torch.Tensor):
    """Within the block, every forward of ``transformer`` uses the per-image positions
    ``img_ids`` ``(B, N, 3)``.  ``txt_ids_list``: the text ids ``(T, 3)`` of every forward
    that will run (e.g. positive and negative prompt); pass ``img_ids[0]`` as the forward's
    2-D ``img_ids``.  Requires :func:`supports_per_sample_positions`."""
    if not supports_per_sample_positions(transformer):
        raise RuntimeError("per-image positions need diffusers' default FluxAttnProcessor in every attention module")
    tables = {}
    with section("positions"):
        for txt_ids in txt_ids_list:
            length = txt_ids.shape[0] + img_ids.shape[1]
            if length not in tables:
                tables[length] = rotary_tables(transformer, txt_ids, img_ids)

    def substitute(module, args, output):
        ids = args[0]
        if ids.shape[0] not in tables:
            raise RuntimeError(f"pos_embed called with {ids.shape[0]} ids; per-image tables exist for {sorted(tables)}")
        return tables[ids.shape[0]]

    modules = _attention_modules(transformer)
    originals = [module.processor for module in modules]
    handle = transformer.pos_embed.register_forward_hook(substitute)
    try:
        for module, original in zip(modules, originals):
            module.processor = PerSampleRotaryAttnProcessor(
                getattr(original, "_attention_backend", None), getattr(original, "_parallel_config", None)
            )
        yield
    finally:
        handle.remove()
        for module, original in zip(modules, originals):
            module.processor = original
