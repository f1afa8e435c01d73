"""The expensive half of the FLOPs cost model: counts the real architectures and fits the
polynomials of the shipped table.

Every number comes from ``torch.utils.flop_counter.FlopCounterMode`` run over the registry's
architecture configs (:mod:`ralu.runtime.models`) instantiated on the ``meta`` device: no
weights, no Hub access.  What the counter counts is split into the two conventions of
:class:`~.pricing.Flops` (``linear``: linear and conv layers; the rest are attention matmuls).

For a fixed text length a transformer forward costs EXACTLY a quadratic polynomial in the
image-token count n (linear layers ~ n, joint attention ~ (n + text)^2, per-sample
modulation constant), and a VAE decode EXACTLY a quadratic in the latent area (convs ~ area,
mid-block attention ~ area^2).  So each component is counted at three sizes, the
coefficients are solved for in exact rational arithmetic and checked at a fourth size.
:func:`write_table` recounts every model (about a minute on two cores) and rewrites the table.

torch, diffusers and transformers are imported only when something is actually counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from ralu.runtime.models import MODELS, TextEncoder, get_model
from ralu.runtime.schedule import write_text_atomic

from .pricing import RECOUNT_COMMAND, TABLE_FORMAT, Flops, clear_caches, table_path

#: Sizes the polynomials are fitted at and checked at.  Transformer: square patch grids of
#: 16, 32, 64 (every model's positional table covers them), checked at 24x24.  VAE: latent
#: areas of 16^2, 32^2, 64^2, checked on a non-square 32x48 latent.
TRANSFORMER_FIT_TOKENS = (256, 1024, 4096)
TRANSFORMER_CHECK_TOKENS = 576
VAE_FIT_LATENTS = ((16, 16), (32, 32), (64, 64))
VAE_CHECK_LATENT = (32, 48)
#: Relative error allowed at the check size (the fit is exact, so this only catches a
#: component that is not quadratic at all).
FIT_TOLERANCE = 1e-9


# ----------------------------------------------------------------------------------------
# Counting (imports torch lazily).
# ----------------------------------------------------------------------------------------

#: FlopCounterMode ops that are linear or conv layers.  Everything else it counts is an
#: attention matmul: aten.bmm / aten.baddbmm (SDPA decomposed, as on meta and CPU) or the
#: fused SDPA / flash / efficient / flex attention kernels (GPU).
LINEAR_OPS = frozenset({
    "aten.mm", "aten.addmm", "aten._scaled_mm",
    "aten.convolution", "aten._convolution", "aten.cudnn_convolution",
    "aten.convolution_overrideable", "aten._slow_conv2d_forward",
})


def _op_name(op: Any) -> str:
    return str(op).removesuffix(".default")


def count_flops(module: Callable[..., Any], *args: Any, **kwargs: Any) -> Flops:
    """Run ``module(*args, **kwargs)`` (a module or any callable, e.g. ``vae.decode``) under
    ``FlopCounterMode`` and split what it counts into the two conventions.

    Use meta tensors: there SDPA decomposes into ``aten.bmm``, which the counter prices; on a
    CPU some SDPA kernels are not in its registry and would be silently left out.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    by_op = counter.get_flop_counts().get("Global", {})
    total = sum(by_op.values())
    linear = sum(count for op, count in by_op.items() if _op_name(op) in LINEAR_OPS)
    return Flops(float(total), float(linear))


def build_transformer(model: str) -> Any:
    """The model's diffusers transformer on the meta device."""
    import diffusers
    import torch

    arch = get_model(model).architecture
    with torch.device("meta"):
        return getattr(diffusers, arch.transformer_class)(**arch.transformer)


def build_vae(model: str) -> Any:
    """The model's VAE (``AutoencoderKL``, or the class its architecture names) on the meta device."""
    import diffusers
    import torch

    arch = get_model(model).architecture
    with torch.device("meta"):
        return getattr(diffusers, arch.vae_class)(**arch.vae)


def build_text_encoder(encoder: TextEncoder) -> Any:
    """A transformers text encoder on the meta device."""
    import torch
    import transformers

    # FLUX.2's decoder-only LLMs (Mistral, Qwen3) are counted as their CausalLM classes.
    configs = {"MistralForCausalLM": transformers.MistralConfig, "Qwen3ForCausalLM": transformers.Qwen3Config}
    # Qwen-Image's Qwen2.5-VL: the whole model (the pipeline runs it with its LM head).
    configs["Qwen2_5_VLForConditionalGeneration"] = transformers.Qwen2_5_VLConfig
    config_class = configs.get(encoder.model_class) or (transformers.T5Config if encoder.model_class.startswith("T5") else transformers.CLIPTextConfig)
    with torch.device("meta"):
        return getattr(transformers, encoder.model_class)(config_class(**encoder.config))


def _patch_grid(image_tokens: int, max_side: int) -> tuple[int, int]:
    """The most square rows x cols = image_tokens with both sides <= max_side."""
    for rows in range(math.isqrt(image_tokens), 0, -1):
        if image_tokens % rows == 0 and image_tokens // rows <= max_side:
            return rows, image_tokens // rows
    raise ValueError(f"{image_tokens} image tokens do not form a patch grid with sides <= {max_side} (the SD3 positional table). Fix: count a token number with such a factorisation; the polynomial covers the rest")


def _transformer_inputs(model: str, image_tokens: int) -> dict[str, Any]:
    """Batch-1 forward inputs with the model's text length, as meta tensors."""
    import torch

    spec = get_model(model)
    arch = spec.architecture
    config = arch.transformer
    text = torch.empty(1, spec.text_tokens, config["joint_attention_dim"], device="meta")
    if arch.transformer_class == "Flux2Transformer2DModel":
        # FLUX.2: packed tokens of 2x2 patches of the 32-channel latent (128 channels), 4-axis
        # ids, no pooled vector; an embedded guidance where the model has one (dev, not klein).
        return dict(
            hidden_states=torch.empty(1, image_tokens, config["in_channels"], device="meta"),
            encoder_hidden_states=text, timestep=torch.empty(1, device="meta"),
            img_ids=torch.empty(image_tokens, 4, device="meta"),
            txt_ids=torch.empty(spec.text_tokens, 4, device="meta"),
            guidance=torch.empty(1, device="meta") if config.get("guidance_embeds", True) else None,
        )
    if arch.transformer_class == "ChromaTransformer2DModel":
        # Chroma: FLUX's packed tokens and 3-axis ids, but no pooled vector and no guidance
        # embedding (its approximator makes the modulation from the timestep alone).
        return dict(
            hidden_states=torch.empty(1, image_tokens, config["in_channels"], device="meta"),
            encoder_hidden_states=text, timestep=torch.empty(1, device="meta"),
            img_ids=torch.empty(image_tokens, 3, device="meta"),
            txt_ids=torch.empty(spec.text_tokens, 3, device="meta"),
        )
    if arch.transformer_class == "QwenImageTransformer2DModel":
        # Qwen-Image: packed 2x2 patches (64 channels), rotary positions built inside from
        # img_shapes (one frame of a patch grid), no pooled vector, no guidance embedding.
        rows, cols = _patch_grid(image_tokens, 4096)
        return dict(
            hidden_states=torch.empty(1, image_tokens, config["in_channels"], device="meta"),
            encoder_hidden_states=text, timestep=torch.empty(1, device="meta"), img_shapes=[[(1, rows, cols)]],
        )
    pooled = torch.empty(1, config["pooled_projection_dim"], device="meta")
    timestep = torch.empty(1, device="meta")
    if spec.reference_tokens:
        # FLUX.1 Kontext: the reference image's tokens follow the generated ones in every
        # forward, as image tokens (same projections, ids and attention).
        image_tokens += spec.reference_tokens
    if arch.transformer_class == "FluxTransformer2DModel":
        # FLUX takes packed latents: one token per 2x2 latent patch, 4 * 16 channels.
        return dict(
            hidden_states=torch.empty(1, image_tokens, config["in_channels"], device="meta"),
            encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
            img_ids=torch.empty(image_tokens, 3, device="meta"),
            txt_ids=torch.empty(spec.text_tokens, 3, device="meta"),
            guidance=torch.empty(1, device="meta"),
        )
    # SD3 patchifies a (B, 16, H, W) latent itself, so the tokens must form a grid.
    patch = config["patch_size"]
    rows, cols = _patch_grid(image_tokens, config["pos_embed_max_size"])
    latent = torch.empty(1, config["in_channels"], rows * patch, cols * patch, device="meta")
    return dict(hidden_states=latent, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep)


def count_transformer_forward(model: str, image_tokens: int, transformer: Any = None) -> Flops:
    """Count one batch-1 transformer forward (no CFG) with the model's text tokens."""
    transformer = transformer if transformer is not None else build_transformer(model)
    return count_flops(transformer, **_transformer_inputs(model, image_tokens))


def count_vae_decode(model: str, latent_height: int, latent_width: int, vae: Any = None) -> Flops:
    """Count decoding one latent of latent_height x latent_width."""
    import torch

    vae = vae if vae is not None else build_vae(model)
    latent = torch.empty(1, get_model(model).latent_channels, latent_height, latent_width, device="meta")
    if get_model(model).architecture.vae_class == "AutoencoderKLQwenImage":
        latent = latent[:, :, None]  # a causal 3-D VAE: one frame
    return count_flops(vae.decode, latent)


def count_text_encoder(encoder: TextEncoder) -> Flops:
    """Count one prompt through one text encoder at its sequence length."""
    import torch

    if encoder.model_class in ("MistralForCausalLM", "Qwen3ForCausalLM"):
        # A decoder-only LLM builds its causal mask by reading the mask's values, which meta
        # tensors lack; fake tensors (the same shapes and devices) let it take the traced path.
        # The prompt is padded to the full length, so the mask is all ones.
        from torch._subclasses.fake_tensor import FakeTensorMode

        model = build_text_encoder(encoder)
        with FakeTensorMode(allow_non_fake_inputs=True):
            input_ids = torch.zeros(1, encoder.tokens, dtype=torch.long, device="meta")
            attention_mask = torch.ones(1, encoder.tokens, dtype=torch.long, device="meta")
            return count_flops(model, input_ids=input_ids, attention_mask=attention_mask)
    input_ids = torch.zeros(1, encoder.tokens, dtype=torch.long, device="meta")
    return count_flops(build_text_encoder(encoder), input_ids=input_ids)


# ----------------------------------------------------------------------------------------
# Exact quadratic fits.
# ----------------------------------------------------------------------------------------


def fit_quadratic(xs: Sequence[int], ys: Sequence[float]) -> tuple[Fraction, Fraction, Fraction]:
    """Coefficients (c0, c1, c2) of the quadratic through three points, in exact arithmetic
    (counts are integers, so the coefficients come out exact)."""
    (x0, x1, x2), (y0, y1, y2) = [Fraction(x) for x in xs], [Fraction(y) for y in ys]
    slope01 = (y1 - y0) / (x1 - x0)
    slope12 = (y2 - y1) / (x2 - x1)
    c2 = (slope12 - slope01) / (x2 - x0)
    c1 = slope01 - c2 * (x0 + x1)
    c0 = y0 - c1 * x0 - c2 * x0 * x0
    return c0, c1, c2


def _json_number(value: Fraction) -> int | float:
    # Integers stay exact in JSON; a non-integral coefficient would be a surprise, kept as float.
    return int(value) if value.denominator == 1 else float(value)


def _fit_component(xs: Sequence[int], counts: Sequence[Flops], check_x: int, check: Flops, what: str) -> dict[str, Any]:
    """Fit both conventions, verify at the check size, return the table entry."""
    entry: dict[str, Any] = {"fit_at": list(xs), "checked_at": check_x}
    for convention in ("total", "linear"):
        coefficients = fit_quadratic(xs, [getattr(c, convention) for c in counts])
        predicted = float(sum(c * Fraction(check_x) ** k for k, c in enumerate(coefficients)))
        measured = getattr(check, convention)
        error = abs(predicted - measured) / measured
        if error >= FIT_TOLERANCE:
            raise RuntimeError(
                f"{what} ({convention}) is not quadratic: predicted {predicted:.6e} at {check_x}, counted {measured:.6e} "
                f"(relative error {error:.2e}); a size-dependent code path? Fix: inspect the architecture before shipping a table"
            )
        entry[convention] = [_json_number(c) for c in coefficients]
    return entry


def fit_transformer(model: str) -> dict[str, Any]:
    """Count the transformer at the fit sizes and return its polynomial entry."""
    transformer = build_transformer(model)
    counts = [count_transformer_forward(model, n, transformer) for n in TRANSFORMER_FIT_TOKENS]
    check = count_transformer_forward(model, TRANSFORMER_CHECK_TOKENS, transformer)
    entry = _fit_component(TRANSFORMER_FIT_TOKENS, counts, TRANSFORMER_CHECK_TOKENS, check, f"{model} transformer")
    spec = get_model(model)
    if spec.reference_tokens:
        variable = f"generated image tokens (one batch-1 forward, no CFG; {spec.reference_tokens} reference image tokens counted in every forward)"
        return {"variable": variable, "text_tokens": spec.text_tokens, "reference_tokens": spec.reference_tokens, **entry}
    return {"variable": "image tokens (one batch-1 forward, no CFG)", "text_tokens": get_model(model).text_tokens, **entry}


def fit_vae_decode(model: str) -> dict[str, Any]:
    """Count the VAE decoder at the fit latents and return its polynomial entry (in area)."""
    vae = build_vae(model)
    areas = [h * w for h, w in VAE_FIT_LATENTS]
    counts = [count_vae_decode(model, h, w, vae) for h, w in VAE_FIT_LATENTS]
    check = count_vae_decode(model, *VAE_CHECK_LATENT, vae)
    check_area = VAE_CHECK_LATENT[0] * VAE_CHECK_LATENT[1]
    entry = _fit_component(areas, counts, check_area, check, f"{model} VAE decode")
    return {"variable": "latent area (pixels / 8)^2", **entry}


def count_text_encoders(model: str) -> dict[str, Any]:
    """Per-encoder costs of one prompt (constants: the sequence lengths are fixed)."""
    entries = {}
    for encoder in get_model(model).architecture.text_encoders:
        flops = count_text_encoder(encoder)
        # Counts are integers; store them as such so the JSON stays exact and readable.
        entries[encoder.label] = {"tokens": encoder.tokens, "total": int(flops.total), "linear": int(flops.linear)}
    return entries


def count_model_entry(model: str) -> dict[str, Any]:
    """Everything the table holds for one model, freshly counted."""
    return {
        "transformer": fit_transformer(model),
        "vae_decode": fit_vae_decode(model),
        "text_encoders": count_text_encoders(model),
    }


# ----------------------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def build_table(models: Sequence[str] | None = None) -> dict[str, Any]:
    """Recount every model (about a minute on two cores) into a table dict."""
    names = [get_model(m).name for m in (models or MODELS)]
    return {
        "format": TABLE_FORMAT,
        "generated_by": RECOUNT_COMMAND,
        "versions": _versions(),
        "conventions": {
            "total": "everything torch.utils.flop_counter.FlopCounterMode counts: linear, conv and attention matmuls",
            "linear": f"linear and conv layers only (ops {sorted(LINEAR_OPS)}); the paper's convention",
        },
        "polynomials": "c0 + c1 x + c2 x^2 with exact (integer) coefficients; transformer: x = image tokens at the stored text_tokens, batch 1, no CFG; vae_decode: x = latent area",
        "models": {name: count_model_entry(name) for name in names},
    }


def write_table(path: Path | None = None) -> Path:
    """Recount everything and rewrite the table atomically."""
    table = build_table()
    written = write_text_atomic(path or table_path(), json.dumps(table, indent=2) + "\n")
    clear_caches()
    return written
