"""Shared fixtures: tiny real-class models built offline, and a schedule builder.

Nothing here downloads anything (tests run with HF_HUB_OFFLINE=1).  Keep fixtures per
model family in their own section.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


#: The lab's tests (ralu_lab): marked ``lab`` by path (docs/architecture.md: the test tiers).
LAB_TESTS = Path(__file__).resolve().parent / "lab"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if LAB_TESTS in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.lab)


def pytest_configure(config):
    # Tiny models: one thread is fastest, and multi-threaded ops slow down by orders of
    # magnitude when the cores are shared with other jobs.  RALU_TEST_THREADS overrides.
    import torch

    torch.set_num_threads(int(os.environ.get("RALU_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # Tools run in-process (training and evaluation mains) set torch's thread count; another
    # count changes float reduction order, and the golden values are held to 1e-6.
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------


def build_schedule(stages, c=0.04, up_ratio=0.3, height=64, width=64, model="flux-dev"):
    """A valid schedule from ``stages = [(steps, end, shift), ...]`` (starts and transitions
    derived from the ends and ``c``)."""
    from schedule_factory import schedule_dict

    from ralu.runtime.schedule import schedule_from_dict

    steps, ends, shifts = zip(*stages)
    return schedule_from_dict(schedule_dict(model, steps, ends, shifts, c, up_ratio, height, width), "<test>")


@pytest.fixture
def make_schedule():
    return build_schedule


# ----------------------------------------------------------------------------------------
# FLUX
# ----------------------------------------------------------------------------------------


def flux_scheduler_config() -> dict:
    """FLUX.1-dev's scheduler (dynamic shifting), from the model registry."""
    from ralu.runtime.models import get_model

    return get_model("flux-dev").scheduler.config()


TINY_FLUX_TEXT_DIM = 32


def tiny_flux_transformer(seed: int = 0):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_FLUX_TEXT_DIM,
        pooled_projection_dim=TINY_FLUX_TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_vae(seed: int = 0, scaling_factor: float = 0.3611, shift_factor: float = 0.1159):
    """A tiny AutoencoderKL with the real latent layout: 16 latent channels, scale factor 8.
    Defaults are FLUX's scaling/shift (decoded random latents have enough contrast for
    Canny 100/200 to find edges); SD3 passes its own."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return vae.eval()


def tiny_flux_vae(seed: int = 0):
    return tiny_vae(seed)


def tiny_flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**flux_scheduler_config())


@pytest.fixture(scope="session")
def flux_models():
    """(transformer, vae): shared, never modified by tests (tests that change a model
    build their own)."""
    return tiny_flux_transformer(), tiny_flux_vae()


@pytest.fixture
def flux_pipe(flux_models):
    """A FluxPipeline without text encoders (call it with prompt_embeds)."""
    from diffusers import FluxPipeline

    transformer, vae = flux_models
    pipe = FluxPipeline(
        scheduler=tiny_flux_scheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def flux_embeds():
    """``embeds(batch, seed)`` -> dict(prompt_embeds, pooled_prompt_embeds) for the tiny FLUX."""
    import torch

    def embeds(batch: int = 1, seed: int = 0, length: int = 8, prefix: str = ""):
        g = torch.Generator().manual_seed(seed)
        return {
            f"{prefix}prompt_embeds": torch.randn(batch, length, TINY_FLUX_TEXT_DIM, generator=g),
            f"{prefix}pooled_prompt_embeds": torch.randn(batch, TINY_FLUX_TEXT_DIM, generator=g),
        }

    return embeds


def tiny_text_stack(vocab_words=("a", "cat", "dog", "red", "blue", "photo", "of", "the")):
    """Tiny CLIP and T5 text encoders with word-level tokenizers, built locally:
    ``dict(text_encoder, tokenizer, text_encoder_2, tokenizer_2)``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {word: i for i, word in enumerate(specials + list(vocab_words))}

    def tokenizer(max_length):
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(
            tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=max_length
        )

    torch.manual_seed(0)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=TINY_FLUX_TEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=TINY_FLUX_TEXT_DIM,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(vocab), d_model=TINY_FLUX_TEXT_DIM, d_kv=8, d_ff=37, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=3)
    ).eval()
    return {"text_encoder": clip, "tokenizer": tokenizer(77), "text_encoder_2": t5, "tokenizer_2": tokenizer(512)}


@pytest.fixture
def saved_flux_pipeline(tmp_path_factory, flux_models):
    """A complete tiny FluxPipeline (tiny CLIP + T5 text stack) saved with save_pretrained;
    returns its folder."""
    from diffusers import FluxPipeline

    transformer, vae = flux_models
    pipe = FluxPipeline(scheduler=tiny_flux_scheduler(), vae=vae, transformer=transformer, **tiny_text_stack())
    folder = tmp_path_factory.mktemp("tiny-flux")
    pipe.save_pretrained(folder)
    return folder


def build_v2_weights(folder: Path) -> Path:
    """Random-init testbed v2 weights laid out like ``lab/testbed-weights/v2/`` (autoencoder/
    classifier/ flux/ sd3/) under ``folder``: speed and code paths do not depend on training.
    The autoencoder's scaling and shift factors are measured as training measures them."""
    import torch
    from safetensors.torch import save_file

    from ralu_lab.testbed.v2 import model as tb
    from ralu_lab.testbed.v2.classifier import WEIGHTS_FILE, Classifier

    vae = tb.build_autoencoder(0).eval()
    vae.register_to_config(**tb.latent_statistics(vae, n=64, batch=64))
    vae.save_pretrained(folder / "autoencoder")
    for i, arch in enumerate(tb.ARCHITECTURES):
        tb.build_transformer(arch, seed=1 + i).save_pretrained(folder / arch)
    torch.manual_seed(3)
    (folder / "classifier").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in Classifier().state_dict().items()}, str(folder / "classifier" / WEIGHTS_FILE))
    return folder


@pytest.fixture(scope="session")
def v2_weights(tmp_path_factory) -> Path:
    """A folder of random-init testbed v2 weights, built once per session."""
    return build_v2_weights(tmp_path_factory.mktemp("v2-weights"))
