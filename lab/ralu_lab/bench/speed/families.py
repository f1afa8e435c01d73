"""One declarative adapter per benchmarked family: everything the benchmark builds and calls.

An adapter says, for one family of :data:`ralu.runtime.models.FAMILIES`: which model's shipped
schedules it measures, how the registry's real transformer config is narrowed to the
reduced-width one (the real block pattern at one 32-wide head), which prompt tensors the
pipelines take (pooled vector, attention mask, negative branch), the guidance arguments of
every call, the transformer inputs of one bare evaluation (and of the FLOPs count on the meta
device), and the step caches its transformer and base pipeline run.  The pipelines themselves
(the diffusers base class, the RALU class, the VAE class) are read from the registry.

Standard library at import (``ralu-bench speed --help`` and the report stay cheap); torch is
imported by the functions that build tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ralu.runtime.models import FAMILIES, FamilySpec, ModelSpec, get_model

#: Width of every reduced-width model's text and pooled embeddings.
REDUCED_TEXT_DIM = 64
#: Text tokens of ``--quick``'s prompt embeddings.
QUICK_TEXT_TOKENS = 32


def grid(tokens: int, max_side: int) -> tuple[int, int] | None:
    """The most square rows x cols = tokens with both sides <= max_side, or None."""
    for rows in range(math.isqrt(tokens), 0, -1):
        if tokens % rows == 0 and tokens // rows <= max_side:
            return rows, tokens // rows
    return None


def grid_ids(rows: int, cols: int, axes: int, device, first: float = 0.0):
    """``(rows * cols, axes)`` position ids: row and column on the last two axes, ``first`` on
    axis 0 (Kontext's reference index), zero elsewhere (works on the meta device too)."""
    import torch

    ids = torch.zeros(rows * cols, axes, device=device)
    if torch.device(device).type != "meta":
        index = torch.arange(rows * cols, device=device)
        ids[:, 0] = first
        ids[:, -2] = index // cols
        ids[:, -1] = index % cols
    return ids


# ----------------------------------------------------------------------------------------
# Transformer inputs of one evaluation: ``inputs(family, rows, cols, make, device)``, where
# ``make(*shape)`` gives a float tensor (meta for the FLOPs count, random for timing).
# ----------------------------------------------------------------------------------------


def flux_inputs(family, rows: int, cols: int, make, device) -> dict:
    """FLUX.1 (and Kontext, whose reference tokens follow the generated ones with index 1)."""
    import torch

    batch, config = family.transformer_batch, family.transformer
    ids = grid_ids(rows, cols, 3, device)
    if family.reference_tokens:
        side = math.isqrt(family.reference_tokens)
        ids = torch.cat([ids, grid_ids(side, family.reference_tokens // side, 3, device, first=1.0)])
    tokens = ids.shape[0]
    return dict(
        hidden_states=make(batch, tokens, config["in_channels"]), encoder_hidden_states=make(batch, family.text_tokens, family.text_dim),
        pooled_projections=make(batch, family.pooled_dim), timestep=_full(make, batch, 0.5), img_ids=ids,
        txt_ids=torch.zeros(family.text_tokens, 3, device=device), guidance=_full(make, batch, family.guidance_scale),
    )


def sd3_inputs(family, rows: int, cols: int, make, device) -> dict:
    patch = family.transformer["patch_size"]
    batch = family.transformer_batch
    return dict(
        hidden_states=make(batch, family.spec.latent_channels, rows * patch, cols * patch),
        encoder_hidden_states=make(batch, family.text_tokens, family.text_dim), pooled_projections=make(batch, family.pooled_dim),
        timestep=_full(make, batch, 500.0),
    )


def chroma_inputs(family, rows: int, cols: int, make, device) -> dict:
    """Chroma: FLUX's packed tokens and ids, no pooled vector or guidance, and the T5 mask over
    the joint sequence (ChromaPipeline's ``_prepare_attention_mask``: text mask + ones)."""
    import torch

    batch, tokens = family.transformer_batch, rows * cols
    mask = make(batch, family.text_tokens + tokens).fill_(1.0)
    return dict(
        hidden_states=make(batch, tokens, family.transformer["in_channels"]), encoder_hidden_states=make(batch, family.text_tokens, family.text_dim),
        timestep=_full(make, batch, 0.5), img_ids=grid_ids(rows, cols, 3, device), txt_ids=torch.zeros(family.text_tokens, 3, device=device),
        attention_mask=mask,
    )


def flux2_inputs(family, rows: int, cols: int, make, device) -> dict:
    """FLUX.2: packed 128-channel tokens, 4-axis ids; an embedded guidance where the model has
    one (dev, not klein)."""
    import torch

    batch, tokens = family.transformer_batch, rows * cols
    guidance = _full(make, batch, family.guidance_scale) if family.transformer.get("guidance_embeds", True) else None
    return dict(
        hidden_states=make(batch, tokens, family.transformer["in_channels"]), encoder_hidden_states=make(batch, family.text_tokens, family.text_dim),
        timestep=_full(make, batch, 0.5), img_ids=grid_ids(rows, cols, 4, device), txt_ids=torch.zeros(family.text_tokens, 4, device=device),
        guidance=guidance,
    )


def qwen_image_inputs(family, rows: int, cols: int, make, device) -> dict:
    """Qwen-Image: packed 2x2 patches, rotary positions built inside from ``img_shapes``."""
    import torch

    batch, tokens = family.transformer_batch, rows * cols
    # The mask's values are read (sequence lengths): none on the meta device, as the cost model counts it.
    mask = None if torch.device(device).type == "meta" else torch.ones(batch, family.text_tokens, dtype=torch.long, device=device)
    return dict(
        hidden_states=make(batch, tokens, family.transformer["in_channels"]), encoder_hidden_states=make(batch, family.text_tokens, family.text_dim),
        encoder_hidden_states_mask=mask,
        timestep=_full(make, batch, 0.5), img_shapes=[[(1, rows, cols)]] * batch,
    )


def _full(make, batch: int, value: float):
    """A ``(batch,)`` tensor of ``value`` in ``make``'s dtype and device (meta: shape only)."""
    return make(batch).fill_(float(value))


# ----------------------------------------------------------------------------------------
# Reduced widths: the registry's real config at one 32-wide head.
# ----------------------------------------------------------------------------------------


def _narrow(real: dict, rope: tuple[int, ...], layers: dict, quick: bool, **extra) -> dict:
    """``real`` at one 32-wide head with 64-wide text (and pooled) embeddings; ``layers``: the
    block counts ``--quick`` uses instead of the real ones."""
    config = dict(real, attention_head_dim=32, num_attention_heads=1, joint_attention_dim=REDUCED_TEXT_DIM, **extra)
    if "axes_dims_rope" in real:
        config["axes_dims_rope"] = rope
    if "pooled_projection_dim" in real:
        config["pooled_projection_dim"] = REDUCED_TEXT_DIM
    if quick:
        config.update(layers)
    return config


def flux_reduced(real: dict, quick: bool) -> dict:
    """FLUX.1 19 dual + 38 single blocks (quick: 1 + 2); the benchmark's original literal."""
    return dict(
        # FLUX packs 2x2 latent pixels into one token.
        patch_size=1, in_channels=real["in_channels"], num_layers=1 if quick else real["num_layers"],
        num_single_layers=2 if quick else real["num_single_layers"], attention_head_dim=32, num_attention_heads=1,
        joint_attention_dim=REDUCED_TEXT_DIM, pooled_projection_dim=REDUCED_TEXT_DIM, guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    )


def sd3_reduced(real: dict, quick: bool) -> dict:
    """SD3-medium's 24 joint blocks (quick: 2); the benchmark's original literal."""
    return dict(
        sample_size=real["sample_size"], patch_size=real["patch_size"], in_channels=real["in_channels"], num_layers=2 if quick else real["num_layers"],
        attention_head_dim=32, num_attention_heads=1, joint_attention_dim=REDUCED_TEXT_DIM, caption_projection_dim=32,
        pooled_projection_dim=REDUCED_TEXT_DIM, out_channels=real["out_channels"], pos_embed_max_size=real["pos_embed_max_size"],
    )


def chroma_reduced(real: dict, quick: bool) -> dict:
    # The approximator's hidden width scales with the model (real 5120 at width 3072).
    return _narrow(real, (8, 12, 12), {"num_layers": 1, "num_single_layers": 2}, quick, approximator_hidden_dim=64)


def flux2_reduced(real: dict, quick: bool) -> dict:
    return _narrow(real, (8, 8, 8, 8), {"num_layers": 1, "num_single_layers": 2}, quick)


def qwen_image_reduced(real: dict, quick: bool) -> dict:
    return _narrow(real, (8, 12, 12), {"num_layers": 2}, quick)


# ----------------------------------------------------------------------------------------
# The adapters.
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchFamily:
    """How the benchmark builds and calls one family (see the module docstring)."""

    family: str  # a key of ralu.runtime.models.FAMILIES
    model: str  # the model whose shipped schedules are measured
    reduced: Callable[[dict, bool], dict]  # (real transformer config, quick) -> the benchmarked one
    inputs: Callable[..., dict]  # transformer inputs of one evaluation (see flux_inputs)
    #: Guidance of every call of both pipelines: ``guidance_scale`` (embedded guidance or CFG,
    #: as the family's pipeline reads it; None: not passed) and ``true_cfg_scale``.
    guidance_scale: float | None
    true_cfg_scale: float | None = None
    pooled: bool = False  # a pooled text vector (FLUX.1, SD3)
    mask: str | None = None  # the prompt mask's argument name, if the pipeline takes one
    mask_dtype: str = "float"  # "float": the model's dtype (as the pipeline's encode_prompt makes it)
    #: Step caches RALU rows run (ralu.runtime.cache; what diffusers' hooks run on this transformer).
    cache_kinds: tuple[str, ...] = ("first_block", "taylorseer", "magcache")
    #: Whether the base diffusers pipeline opens cache contexts (diffusers' hooks need one): the
    #: plain-pipeline cache rows exist only then.
    plain_caches: bool = False
    #: A reference image at the output size, in every forward of both pipelines (Kontext).
    reference: bool = False
    #: Extra constructor arguments of the base pipeline.
    base_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Whether a bare evaluation needs a native patch grid (else the token path; SD3 only).
    native_grid_only: bool = False

    @property
    def spec(self) -> ModelSpec:
        return get_model(self.model)

    @property
    def registry(self) -> FamilySpec:
        return FAMILIES[self.family]

    @property
    def base_pipeline(self) -> str:
        return self.registry.base_pipelines[0]

    @property
    def ralu_pipeline(self) -> str:
        return self.registry.pipeline

    @property
    def transformer_class(self) -> str:
        return self.spec.architecture.transformer_class

    @property
    def vae_class(self) -> str:
        return self.spec.architecture.vae_class


def _adapters() -> dict[str, BenchFamily]:
    # FLUX.1's and SD3's caches are the quality harness's (quality.v2.plan; a test keeps them equal).
    flux_caches, flux_plain = ("first_block", "taylorseer", "magcache"), True
    sd3_caches, sd3_plain = ("taylorseer", "magcache"), False
    adapters = (
        BenchFamily("flux", "flux-dev", flux_reduced, flux_inputs, guidance_scale=3.5, pooled=True, cache_kinds=flux_caches, plain_caches=flux_plain),
        BenchFamily("sd3", "sd3-medium", sd3_reduced, sd3_inputs, guidance_scale=7.0, pooled=True, cache_kinds=sd3_caches, plain_caches=sd3_plain,
                    native_grid_only=True),
        # FluxKontextPipeline's defaults: embedded guidance 3.5, no true CFG; it opens no cache context.
        BenchFamily("flux-kontext", "flux-kontext-dev", flux_reduced, flux_inputs, guidance_scale=3.5, pooled=True, reference=True),
        # ChromaPipeline: CFG 5.0 (two forwards per step), the T5 mask; it opens no cache context.
        # FirstBlockCache and MagCache find the image stream through diffusers' block registry,
        # where diffusers 0.42.1 registers no Chroma block ("Model class ... not registered"):
        # TaylorSeer (per-layer hooks) is the one cache that runs.
        BenchFamily("chroma", "chroma", chroma_reduced, chroma_inputs, guidance_scale=5.0, mask="prompt_attention_mask", cache_kinds=("taylorseer",)),
        # Flux2Pipeline: embedded guidance 4.0; it opens no cache context.  FirstBlockCache's
        # hooks fail on FLUX.2's blocks (ralu.runtime.cache refuses it).
        BenchFamily("flux2", "flux2-dev", flux2_reduced, flux2_inputs, guidance_scale=4.0, cache_kinds=("taylorseer", "magcache")),
        # Flux2KleinPipeline (the undistilled base): CFG 4.0, cache contexts "cond"/"uncond".
        BenchFamily("flux2-klein", "flux2-klein-base-4b", flux2_reduced, flux2_inputs, guidance_scale=4.0, cache_kinds=("taylorseer", "magcache"),
                    plain_caches=True, base_kwargs={"is_distilled": False}),
        # QwenImagePipeline: true CFG 4.0 with a negative prompt, its mask; cache contexts "cond"/"uncond".
        BenchFamily("qwen-image", "qwen-image", qwen_image_reduced, qwen_image_inputs, guidance_scale=None, true_cfg_scale=4.0,
                    mask="prompt_embeds_mask", mask_dtype="int64", plain_caches=True),
    )
    return {adapter.family: adapter for adapter in adapters}


#: The adapters, by family (every family with shipped schedules).
ADAPTERS: dict[str, BenchFamily] = _adapters()


def adapter(family: str) -> BenchFamily:
    if family not in ADAPTERS:
        raise ValueError(f"the speed benchmark has no adapter for family {family!r}. Fix: add a BenchFamily to ralu_lab.bench.speed.families.ADAPTERS")
    return ADAPTERS[family]

