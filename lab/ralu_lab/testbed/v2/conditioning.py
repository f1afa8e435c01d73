"""Labels -> the "text" inputs both generators take (testbed v2).

No text encoder: every attribute value owns a FIXED random embedding (a seeded generator,
identical on every machine, never trained), and a prompt becomes one "text token" per
attribute it asks for (:data:`ralu_lab.testbed.v2.data.PROMPT_ATTRIBUTES`, in that
order; the scenes' marks are not asked for):

* ``prompt_embeds`` ``(B, 6, JOINT_DIM)``: token a is the embedding of attribute a's value
  (what T5 gives FLUX, and the joint text sequence gives SD3);
* ``pooled_prompt_embeds`` ``(B, POOLED_DIM)``: the sum over those attributes of a second
  table, divided by sqrt(6) (CLIP's pooled vector).

The same tables drive the FLUX and the SD3 generator (both take ``prompt_embeds`` and
``pooled_prompt_embeds``).  :func:`null_embeds` is the empty prompt: 10 % of training
conditioning is replaced by it, so it serves as the negative prompt of classifier-free
guidance (SD3's default; FLUX's ``true_cfg_scale``).
"""

from __future__ import annotations

import math

import torch

from .data import PROMPT_ATTRIBUTES, PROMPT_COLUMNS, VALUES, check_labels

#: Width of a text token (the transformers' ``joint_attention_dim``).
JOINT_DIM = 64
#: Width of the pooled embedding (``pooled_projection_dim``).
POOLED_DIM = 64
#: Text tokens per prompt: one per prompt attribute.
TEXT_TOKENS = len(PROMPT_ATTRIBUTES)
#: Seed of the fixed tables: part of the testbed's definition (the weights were trained
#: with these tables), never change it.
TABLE_SEED = 20251130


def embedding_tables(num_values, text_tokens: int, joint_dim: int, pooled_dim: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Fixed random embeddings, drawn in one order from ``seed``: per attribute a
    ``(k, joint_dim)`` token table and a ``(k, pooled_dim)`` pooled table, then the null
    (unconditional) tokens and pooled vector."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(k, joint_dim, generator=generator) for k in num_values]
    pooled = [torch.randn(k, pooled_dim, generator=generator) for k in num_values]
    null_tokens = torch.randn(text_tokens, joint_dim, generator=generator)
    null_pooled = torch.randn(pooled_dim, generator=generator)
    return tokens, pooled, null_tokens, null_pooled


_TOKENS, _POOLED, _NULL_TOKENS, _NULL_POOLED = embedding_tables([len(VALUES[a]) for a in PROMPT_ATTRIBUTES], TEXT_TOKENS, JOINT_DIM, POOLED_DIM, TABLE_SEED)


def encode_labels(labels, device=None, dtype=torch.float32, prefix: str = "") -> dict[str, torch.Tensor]:
    """Labels ``(B, 7)`` -> ``{prefix}prompt_embeds`` and ``{prefix}pooled_prompt_embeds``
    of their prompt attributes (the marks column is not read)."""
    labels = check_labels(labels).cpu()
    tokens = torch.stack([_TOKENS[t][labels[:, a]] for t, a in enumerate(PROMPT_COLUMNS)], dim=1)
    pooled = sum(_POOLED[t][labels[:, a]] for t, a in enumerate(PROMPT_COLUMNS)) / math.sqrt(TEXT_TOKENS)
    return {
        f"{prefix}prompt_embeds": tokens.to(device=device, dtype=dtype),
        f"{prefix}pooled_prompt_embeds": pooled.to(device=device, dtype=dtype),
    }


def null_embeds(batch: int, device=None, dtype=torch.float32, prefix: str = "") -> dict[str, torch.Tensor]:
    """The empty prompt for ``batch`` images; ``prefix="negative_"`` gives the keys the
    pipelines take for guidance."""
    return {
        f"{prefix}prompt_embeds": _NULL_TOKENS.expand(batch, -1, -1).to(device=device, dtype=dtype).clone(),
        f"{prefix}pooled_prompt_embeds": _NULL_POOLED.expand(batch, -1).to(device=device, dtype=dtype).clone(),
    }


def drop_conditioning(cond: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """``cond`` with the rows where ``keep`` is False replaced by the empty prompt (training's
    conditioning dropout, which makes guidance possible)."""
    null = null_embeds(keep.shape[0], device=keep.device)
    return {key: torch.where(keep.view(-1, *[1] * (value.ndim - 1)), value, null[key].to(value.dtype)) for key, value in cond.items()}
