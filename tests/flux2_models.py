"""Tiny real-class FLUX.2 models built offline (random weights): the transformer, the 32-channel
AutoencoderKLFlux2 with non-trivial BatchNorm statistics, the scheduler from the registry, and
for klein a tiny Qwen3 text encoder with a word-level tokenizer and a chat template written here."""

from __future__ import annotations

import torch

TEXT_DIM = 24  # klein's joint_attention_dim is 3 x the text encoder's hidden size
QWEN_HIDDEN = TEXT_DIM // 3
QWEN_LAYERS = 27  # Flux2KleinPipeline stacks the hidden states after layers 9, 18 and 27


def tiny_transformer(guidance_embeds: bool = True, seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000, guidance_embeds=guidance_embeds,
    ).eval()


def tiny_vae(seed: int = 0):
    """AutoencoderKLFlux2 with the real latent layout (32 channels, scale factor 8) and BatchNorm
    running statistics far from (0, 1), so that a missing (de)normalisation shows."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=32, norm_num_groups=4,
    )
    g = torch.Generator().manual_seed(seed + 1)
    vae.bn.running_mean.copy_(0.5 * torch.randn(128, generator=g))
    vae.bn.running_var.copy_(0.25 + 2.0 * torch.rand(128, generator=g))
    return vae.eval()


def scheduler(model: str = "flux2-dev"):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ralu.runtime.models import get_model

    return FlowMatchEulerDiscreteScheduler(**get_model(model).scheduler.config())


def embeds(batch: int = 1, seed: int = 0, length: int = 6, prefix: str = "") -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}prompt_embeds": torch.randn(batch, length, TEXT_DIM, generator=g)}


def tiny_qwen_stack(words=("a", "cat", "dog", "red", "blue", "photo", "of", "the")) -> dict:
    """A tiny Qwen3ForCausalLM (27 layers of width 8) and a word-level fast tokenizer with a
    chat template: ``dict(text_encoder, tokenizer)`` for Flux2KleinPipeline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<pad>", "<unk>", "<|user|>", "<|assistant|>"]
    vocab = {word: i for i, word in enumerate(specials + list(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", model_max_length=512)
    tokenizer.chat_template = "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    torch.manual_seed(0)
    encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(vocab), hidden_size=QWEN_HIDDEN, intermediate_size=16, num_hidden_layers=QWEN_LAYERS,
            num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=512, pad_token_id=0,
            tie_word_embeddings=True,
        )
    ).eval()
    return {"text_encoder": encoder, "tokenizer": tokenizer}


def dev_pipe(transformer=None, vae=None):
    """A Flux2Pipeline without a text encoder (call it with prompt_embeds)."""
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline(
        scheduler=scheduler("flux2-dev"), vae=vae or tiny_vae(), text_encoder=None, tokenizer=None, transformer=transformer or tiny_transformer(True)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def klein_pipe(text: bool = False, transformer=None, vae=None, is_distilled: bool = False):
    """A Flux2KleinPipeline (undistilled unless asked); ``text``: with the tiny Qwen3 stack."""
    from diffusers import Flux2KleinPipeline

    stack = tiny_qwen_stack() if text else {"text_encoder": None, "tokenizer": None}
    pipe = Flux2KleinPipeline(
        scheduler=scheduler("flux2-klein-base-4b"), vae=vae or tiny_vae(), transformer=transformer or tiny_transformer(False), is_distilled=is_distilled, **stack
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
