"""Tiny real-class Qwen-Image models (random weights, built offline) for the Qwen-Image tests."""

from __future__ import annotations

#: Width of the tiny prompt embeddings (the real Qwen2.5-VL-7B: 3584).
TINY_QWEN_TEXT_DIM = 32


def qwen_scheduler():
    """Qwen-Image's scheduler (dynamic shifting, shift_terminal), from the model registry."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ralu.runtime.models import get_model

    return FlowMatchEulerDiscreteScheduler(**get_model("qwen-image").scheduler.config())


def tiny_qwen_transformer(seed: int = 0):
    import torch
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TINY_QWEN_TEXT_DIM, axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_qwen_vae(seed: int = 0):
    """AutoencoderKLQwenImage with the real latent layout (16 channels, 8x) and the real
    latents_mean / latents_std (the registry's), at a tiny width (16: decoded random
    latents have enough contrast for Canny 100/200 to find edges)."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    from ralu.runtime.models import QWEN_IMAGE_VAE

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=list(QWEN_IMAGE_VAE["latents_mean"]), latents_std=list(QWEN_IMAGE_VAE["latents_std"]),
    ).eval()


def qwen_embeds(batch: int = 1, seed: int = 0, length: int = 7, prefix: str = "", padded: int = 0) -> dict:
    """``prompt_embeds`` and ``prompt_embeds_mask`` for the tiny transformer; the last
    ``padded`` positions of every other image are padding (mask 0, embeddings 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, length, TINY_QWEN_TEXT_DIM, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        mask[1::2, length - padded :] = 0
        embeds = embeds * mask[..., None]
    return {f"{prefix}prompt_embeds": embeds, f"{prefix}prompt_embeds_mask": mask}


def tiny_qwen_text_stack(seed: int = 0) -> dict:
    """A tiny Qwen2.5-VL text encoder and a Qwen2 tokenizer built locally (byte-level BPE over
    the 256 byte symbols, no merges, the chat-template specials):
    ``dict(text_encoder, tokenizer)``."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    # Byte-level BPE writes each byte as one printable character: printable Latin-1 bytes as
    # themselves, the others as code points from 256 on.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    symbols = [chr(byte) for byte in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=TINY_QWEN_TEXT_DIM, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TINY_QWEN_TEXT_DIM, fullatt_block_indexes=[0]),
    )
    return {"text_encoder": Qwen2_5_VLForConditionalGeneration(config).eval(), "tokenizer": tokenizer}
