"""Tiny, offline Stable Diffusion 3 / 3.5 components for the SD3 tests (no Hub access)."""

from __future__ import annotations

import functools

import torch

TEXT_DIM = 32
POOLED_DIM = 32
TEXT_TOKENS = 7

SD3_MEDIUM_LIKE: dict = {}
SD35_MEDIUM_LIKE: dict = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"}


def tiny_transformer(seed: int = 0, **overrides):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM,
        out_channels=16,
        pos_embed_max_size=48,
    )
    config.update(overrides)
    model = SD3Transformer2DModel(**config).eval()
    # Random init leaves adaLN / output layers near zero in some versions: make every
    # parameter carry signal so equality tests are not vacuous.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.abs().max() == 0:
                parameter.normal_(0.0, 0.05)
    return model


def tiny_vae(seed: int = 0):
    from conftest import tiny_vae as tiny_latent_vae

    return tiny_latent_vae(seed, scaling_factor=1.5305, shift_factor=0.0609)


def sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def text_inputs(batch: int, seed: int = 1, negative: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    out = {
        "prompt_embeds": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "pooled_prompt_embeds": torch.randn(batch, POOLED_DIM, generator=generator),
    }
    if negative:
        out["negative_prompt_embeds"] = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator)
        out["negative_pooled_prompt_embeds"] = torch.randn(batch, POOLED_DIM, generator=generator)
    return out


@functools.cache
def _components(variant: str) -> tuple:
    transformer = tiny_transformer(**(SD35_MEDIUM_LIKE if variant == "sd3.5" else SD3_MEDIUM_LIKE))
    return transformer, tiny_vae()


def pipeline_components(variant: str = "sd3") -> dict:
    """Components for ``StableDiffusion3Pipeline(**components)`` (text stack left out)."""
    transformer, vae = _components(variant)
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": sd3_scheduler(),
        "text_encoder": None,
        "tokenizer": None,
        "text_encoder_2": None,
        "tokenizer_2": None,
        "text_encoder_3": None,
        "tokenizer_3": None,
    }


def tiny_sd3_text_stack(vocab_words=("a", "cat", "dog", "red", "blue", "photo", "of", "the")) -> dict:
    """Two tiny CLIP text encoders with projection and a tiny T5, with word-level tokenizers,
    built locally: the six text components of ``StableDiffusion3Pipeline``.  CLIP hidden
    states (8 + 8) are zero-padded to the T5 width (TEXT_DIM); pooled outputs 16 + 16 = POOLED_DIM."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {word: i for i, word in enumerate(specials + list(vocab_words))}

    def tokenizer(max_length):
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=max_length)

    def clip(seed):
        torch.manual_seed(seed)
        config = CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=POOLED_DIM // 2,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        return CLIPTextModelWithProjection(config).eval()

    torch.manual_seed(2)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=3)).eval()
    return {
        "text_encoder": clip(0),
        "tokenizer": tokenizer(77),
        "text_encoder_2": clip(1),
        "tokenizer_2": tokenizer(77),
        "text_encoder_3": t5,
        "tokenizer_3": tokenizer(512),
    }
