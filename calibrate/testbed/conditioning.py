"""Labels -> the "text" inputs of FLUX: ``prompt_embeds`` and ``pooled_prompt_embeds``.

The testbed has no text encoder: every attribute value owns a FIXED random embedding
(drawn from a seeded generator, identical on every machine and never trained), and a label
set ``[shape, colour, position]`` becomes three "text tokens", one per attribute, in
attribute order:

* ``prompt_embeds`` ``(B, 3, JOINT_DIM)``: token a is the embedding of attribute a's value
  (what T5 gives real FLUX);
* ``pooled_prompt_embeds`` ``(B, POOLED_DIM)``: the sum over attributes of a second table,
  divided by sqrt(3) (what CLIP's pooled output gives real FLUX).

The model learns to read these tables through its ``context_embedder`` and
``time_text_embed`` exactly as FLUX reads T5/CLIP.  :func:`null_embeds` is the "empty
prompt" (the model is trained with 10 % of its conditioning replaced by it), usable as
``negative_prompt_embeds`` for true classifier-free guidance.
"""

from __future__ import annotations

import math

import torch

from .data import ATTRIBUTES, NUM_VALUES, check_labels, parse

#: Width of a text token (the transformer's ``joint_attention_dim``).
JOINT_DIM = 64
#: Width of the pooled embedding (the transformer's ``pooled_projection_dim``).
POOLED_DIM = 64
#: Text tokens per prompt: one per attribute.
TEXT_TOKENS = len(ATTRIBUTES)
#: Seed of the fixed embedding tables (part of the testbed's definition: never change it,
#: the repository's testbed weights were trained with these tables).
TABLE_SEED = 20250708


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


_TOKENS, _POOLED, _NULL_TOKENS, _NULL_POOLED = embedding_tables(NUM_VALUES, TEXT_TOKENS, JOINT_DIM, POOLED_DIM, TABLE_SEED)


def encode_labels(labels, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Label sets ``(B, 3)`` (or one ``[shape, colour, position]``) -> ``dict(prompt_embeds,
    pooled_prompt_embeds)``, ready for ``FluxPipeline(**encode_labels(labels), ...)``."""
    labels = check_labels(labels).cpu()
    tokens = torch.stack([_TOKENS[a][labels[:, a]] for a in range(TEXT_TOKENS)], dim=1)
    pooled = sum(_POOLED[a][labels[:, a]] for a in range(TEXT_TOKENS)) / math.sqrt(TEXT_TOKENS)
    return {
        "prompt_embeds": tokens.to(device=device, dtype=dtype),
        "pooled_prompt_embeds": pooled.to(device=device, dtype=dtype),
    }


def encode_prompts(prompts: str | list[str], device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Human prompts (``"a red circle, top-left"``; see :func:`ralu.calibrate.testbed.data.describe`)
    -> ``dict(prompt_embeds, pooled_prompt_embeds)``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    return encode_labels(torch.tensor([parse(p) for p in prompts]), device, dtype)


def null_embeds(batch: int, device=None, dtype=torch.float32, prefix: str = "") -> dict[str, torch.Tensor]:
    """The unconditional ("empty prompt") embeddings for ``batch`` images; with
    ``prefix="negative_"`` the keys FluxPipeline takes for true CFG."""
    return {
        f"{prefix}prompt_embeds": _NULL_TOKENS.expand(batch, -1, -1).to(device=device, dtype=dtype).clone(),
        f"{prefix}pooled_prompt_embeds": _NULL_POOLED.expand(batch, -1).to(device=device, dtype=dtype).clone(),
    }
