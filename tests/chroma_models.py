"""Tiny real-class Chroma pipelines built offline (random weights, the real diffusers and
transformers classes at tiny sizes, a locally written word-level tokenizer)."""

from __future__ import annotations

import torch

TEXT_DIM = 32


def tiny_transformer(seed: int = 0):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()


def scheduler():
    """Chroma1-HD's scheduler, from the model registry."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ralu.runtime.models import get_model

    return FlowMatchEulerDiscreteScheduler(**get_model("chroma").scheduler.config())


def text_stack() -> dict:
    """A tiny T5 encoder and its word-level tokenizer: ``dict(text_encoder, tokenizer)``."""
    from conftest import tiny_text_stack

    stack = tiny_text_stack()
    return {"text_encoder": stack["text_encoder_2"], "tokenizer": stack["tokenizer_2"]}


def components(with_text: bool = False, seed: int = 0) -> dict:
    """ChromaPipeline components; without text encoders unless ``with_text``."""
    from conftest import tiny_vae

    parts = {"scheduler": scheduler(), "vae": tiny_vae(seed), "transformer": tiny_transformer(seed), "text_encoder": None, "tokenizer": None}
    if with_text:
        parts.update(text_stack())
    return parts


def embeds(batch: int = 1, seed: int = 0, length: int = 8, valid: int = 5, prefix: str = "", dtype=torch.float32) -> dict:
    """Prompt embeddings and the mask ChromaPipeline would make for a prompt of ``valid - 1``
    tokens padded to ``length``: the first ``valid`` entries on (the tokens and the first pad
    token), the rest off, in ``dtype`` (float as ``encode_prompt`` makes it, or bool)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(length) < valid).to(dtype)[None].repeat(batch, 1)
    return {f"{prefix}prompt_embeds": torch.randn(batch, length, TEXT_DIM, generator=g), f"{prefix}prompt_attention_mask": mask}
