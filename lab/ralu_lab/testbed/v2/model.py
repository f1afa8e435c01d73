"""Testbed v2's networks and the real diffusers pipelines that serve them.

Latent space, as FLUX and SD3 have it
-------------------------------------
A small ``diffusers.AutoencoderKL`` (:data:`AUTOENCODER_CONFIG`: two blocks, so diffusers
derives ``vae_scale_factor = 2 ** (2 - 1) = 2``; 4 latent channels) maps a 64 px RGB scene
to a 4 x 32 x 32 latent.  Both generators cut it into 2 x 2 patches: 16 x 16 = 256 image
tokens at full size (v1's cost), 64 at half size.  RALU's nearest upsampling and
re-noising therefore act on latents, its edge detection decodes the half-size latent
through the decoder (a 32 px image), and the final image comes out of the decoder, as on
the real models.  The runtime's rule "height and width are multiples of
``4 * vae_scale_factor``" (``ralu.runtime.models.resolution_multiple``) reads the factor
from the pipeline (``self.vae_scale_factor``), so 64 px needs multiples of 8 here, and the
schedule file format's multiple of 32 is met by 64.

Like FLUX's and SD3's autoencoders, ours carries a ``scaling_factor`` and a
``shift_factor`` measured on data (:func:`latent_statistics`): the mean and the inverse
standard deviation of the latent (the posterior mode) over fresh scenes, so that
``(latent - shift_factor) * scaling_factor`` has zero mean and unit variance, which is what
the generators are trained and sampled on and what the pipelines undo before decoding.

Generators
----------
The same latents, conditioning (:mod:`.conditioning`) and training objective feed two
architectures: a ``FluxTransformer2DModel`` served by ``FluxPipeline`` (packed latents,
rotary positions, guidance input uninformative in [1, 5] and real guidance through
``true_cfg_scale`` (:data:`TRUE_CFG_SCALE`), FLUX.1-dev's dynamic shift with
token counts scaled 1/16 so 256 tokens get h0 = 3.158 like 1024 px) and an
``SD3Transformer2DModel`` served by ``StableDiffusion3Pipeline`` (its own patch embedding
with a sin-cos position table of ``pos_embed_max_size`` = 32 > 16 tokens a side, so RALU's
``low_res_positions`` crop and stretch differ; SD3's static shift 3; real
classifier-free guidance with the empty prompt as the negative).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from . import conditioning, data
from .location import AUTOENCODER, FLUX, SD3, part_dir

#: The two generator architectures.
ARCHITECTURES: tuple[str, ...] = ("flux", "sd3")

#: The autoencoder: factor 2 (two blocks), 4 latent channels, no attention.  The scaling and
#: shift written here are placeholders; training measures the real ones (:func:`latent_statistics`).
AUTOENCODER_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=data.IMAGE_SIZE,
    scaling_factor=1.0,
    shift_factor=0.0,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)
#: Latent pixels per image pixel, as diffusers derives it (2 ** (blocks - 1)).
VAE_SCALE_FACTOR = 2 ** (len(AUTOENCODER_CONFIG["block_out_channels"]) - 1)
LATENT_CHANNELS = AUTOENCODER_CONFIG["latent_channels"]
#: Latent side at full size (32) and the full-size image token count (256).
LATENT_SIZE = data.IMAGE_SIZE // VAE_SCALE_FACTOR
FULL_TOKENS = (LATENT_SIZE // 2) ** 2

FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=4 * LATENT_CHANNELS,  # packed 2 x 2 latent patches
    out_channels=None,
    num_layers=3,
    num_single_layers=3,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=conditioning.JOINT_DIM,
    pooled_projection_dim=conditioning.POOLED_DIM,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)
SD3_CONFIG = dict(
    sample_size=LATENT_SIZE,
    patch_size=2,
    in_channels=LATENT_CHANNELS,
    num_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=conditioning.JOINT_DIM,
    caption_projection_dim=128,
    pooled_projection_dim=conditioning.POOLED_DIM,
    out_channels=LATENT_CHANNELS,
    pos_embed_max_size=32,
)

#: FLUX.1-dev's scheduler with token counts scaled 1/16 (256 tokens: h0 = exp(1.15)).
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=64,
    max_image_seq_len=256,
)
#: SD3's scheduler: a static shift of 3 at every size.
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)

#: Guidance of a call: FLUX's distilled-guidance input (uninformative in the trained range
#: [1, 5]), SD3's classifier-free guidance scale.
GUIDANCE_SCALE = {"flux": 3.5, "sd3": 4.0}
#: FLUX's real classifier-free guidance (``FluxPipeline``'s ``true_cfg_scale``, the empty
#: prompt as the negative).  FLUX.1-dev distils guidance into its guidance input; the testbed
#: generator cannot (its guidance input is trained uninformative), so it guides for real:
#: unguided, its 50-step samples get the shape right about two thirds of the time, guided
#: over 90 % (docs/testbed-v2.md §3).  It costs a second forward per step, as SD3's guidance.
TRUE_CFG_SCALE = {"flux": 3.5}
#: Transformer rows per image and step: both generators guide (FLUX in two forwards, SD3 in
#: one forward over a doubled batch).
GUIDANCE_BRANCHES = {"flux": 2, "sd3": 2}
FLUX_GUIDANCE_RANGE = (1.0, 5.0)
#: Baseline steps (the real models' defaults: FLUX.1-dev 50, SD3 28).
BASE_STEPS = {"flux": 50, "sd3": 28}


def check_arch(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown testbed v2 architecture {arch!r}. Fix: use one of {ARCHITECTURES}")
    return arch


# ----------------------------------------------------------------------------------------
# Building and loading the networks.
# ----------------------------------------------------------------------------------------


def build_autoencoder(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**AUTOENCODER_CONFIG)


def build_transformer(arch: str, seed: int = 0):
    """A freshly initialised generator of ``arch`` ("flux" or "sd3")."""
    torch.manual_seed(seed)
    if check_arch(arch) == "flux":
        return FluxTransformer2DModel(**FLUX_CONFIG)
    return SD3Transformer2DModel(**SD3_CONFIG)


def build_scheduler(arch: str) -> FlowMatchEulerDiscreteScheduler:
    config = FLUX_SCHEDULER_CONFIG if check_arch(arch) == "flux" else SD3_SCHEDULER_CONFIG
    return FlowMatchEulerDiscreteScheduler(**config)


def _need(folder: Path, what: str, command: str) -> None:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no testbed v2 {what} at {folder}. Fix: train it with `{command}` (see docs/testbed-v2.md), or pass its folder")


def load_autoencoder(path: str | Path | None = None, device="cpu") -> AutoencoderKL:
    folder = part_dir(AUTOENCODER, path)
    _need(folder, "autoencoder", "python -m ralu_lab.testbed.v2.train_autoencoder")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True).to(device).eval()


def load_transformer(arch: str, path: str | Path | None = None, device="cpu", dtype=torch.float32):
    folder = part_dir(FLUX if check_arch(arch) == "flux" else SD3, path)
    _need(folder, f"{arch} generator", f"python -m ralu_lab.testbed.v2.train_generator --arch {arch}")
    cls = FluxTransformer2DModel if arch == "flux" else SD3Transformer2DModel
    return cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device).eval()


def make_pipeline(arch: str, transformer, autoencoder: AutoencoderKL, pipeline_class=None):
    """The real diffusers pipeline of ``arch`` (or ``pipeline_class``, e.g. a RALU pipeline)
    on these components, without text encoders (call it with :func:`call_inputs`)."""
    check_arch(arch)
    if arch == "flux":
        pipe = (pipeline_class or FluxPipeline)(
            scheduler=build_scheduler(arch), vae=autoencoder, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, transformer=transformer,
        )
    else:
        pipe = (pipeline_class or StableDiffusion3Pipeline)(
            transformer=transformer, scheduler=build_scheduler(arch), vae=autoencoder,
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(arch: str = "flux", device="cpu", dtype=torch.float32, path=None, autoencoder=None, pipeline_class=None):
    """The trained generator of ``arch`` and the trained autoencoder in their pipeline
    (``FluxPipeline`` / ``StableDiffusion3Pipeline`` unless ``pipeline_class``).  RALU:
    ``RALUFluxPipeline.from_pipe(pipe)`` / ``RALUStableDiffusion3Pipeline.from_pipe(pipe)``."""
    transformer = load_transformer(arch, path, device, dtype)
    return make_pipeline(arch, transformer, load_autoencoder(autoencoder, device), pipeline_class)


def call_inputs(arch: str, labels, guidance_scale: float | None = None, device=None, dtype=torch.float32) -> dict:
    """The keyword arguments a testbed call needs besides noise and steps: the label's
    embeddings, the size, the guidance (:data:`GUIDANCE_SCALE`, and FLUX's
    :data:`TRUE_CFG_SCALE`) and the empty prompt as the negative."""
    labels = data.check_labels(labels)
    kwargs = dict(conditioning.encode_labels(labels, device, dtype), height=data.IMAGE_SIZE, width=data.IMAGE_SIZE)
    kwargs["guidance_scale"] = GUIDANCE_SCALE[check_arch(arch)] if guidance_scale is None else guidance_scale
    kwargs.update(conditioning.null_embeds(labels.shape[0], device, dtype, prefix="negative_"))
    if arch in TRUE_CFG_SCALE:
        kwargs["true_cfg_scale"] = TRUE_CFG_SCALE[arch]
    return kwargs


# ----------------------------------------------------------------------------------------
# Latents.
# ----------------------------------------------------------------------------------------


def encode_mode(autoencoder: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Raw latents (the posterior mode: deterministic) of images in [-1, 1]."""
    return autoencoder.encode(images).latent_dist.mode()


def images_to_latents(autoencoder: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` -> normalised latents ``(B, 4, H/2, W/2)``, what the generators see."""
    config = autoencoder.config
    return (encode_mode(autoencoder, images) - config.shift_factor) * config.scaling_factor


def latents_to_images(autoencoder: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`images_to_latents` through the decoder (as the pipelines decode)."""
    config = autoencoder.config
    return autoencoder.decode(latents / config.scaling_factor + config.shift_factor).sample


@torch.no_grad()
def latent_statistics(autoencoder: AutoencoderKL, n: int = 1024, seed: int = 4_000_000_007, batch: int = 128) -> dict[str, float]:
    """``scaling_factor`` and ``shift_factor`` of ``autoencoder`` measured on ``n`` fresh
    full-size scenes: the mean of every latent value, and 1 / their standard deviation."""
    total = total_sq = count = 0.0
    for start in range(0, n, batch):
        images, _ = data.make_batch(seed + start, min(batch, n - start))
        z = encode_mode(autoencoder, images).double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.pow(2).sum().item(), count + z.numel()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 1e-12))
    return {"scaling_factor": round(1.0 / std, 6), "shift_factor": round(mean, 6)}


# ----------------------------------------------------------------------------------------
# Schedules.
# ----------------------------------------------------------------------------------------


def base_shift(arch: str) -> float:
    """h0 of the testbed's scheduler at full size (256 tokens): FLUX exp(1.15) = 3.158, SD3 3."""
    if check_arch(arch) == "sd3":
        return SD3_SCHEDULER_CONFIG["shift"]
    c = FLUX_SCHEDULER_CONFIG
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return math.exp(c["base_shift"] + slope * (FULL_TOKENS - c["base_image_seq_len"]))


#: How far a schedule's calibration h0 may be from :func:`base_shift` (the published FLUX
#: presets were calibrated with h0 = 3, 5 % below 3.158).
H0_TOLERANCE = 0.2


def testbed_schedule(schedule, arch: str | None = None):
    """A FLUX.1-dev or SD3 schedule (name, file, dict or ``Schedule``) moved to the testbed's
    64 x 64.  The testbed's schedulers give 64 px the base shift the real model has at its
    native size (FLUX.1-dev at 1024 px; SD3 at any size), so the schedule's shifts carry
    over and only the resolution moves.  Others are refused with the fix."""
    from ralu.runtime.schedule import load_schedule, schedule_from_dict

    schedule = load_schedule(schedule)
    if arch is None and schedule.family not in ARCHITECTURES:
        raise ValueError(f"a schedule for {schedule.model!r} cannot drive a testbed generator (FLUX.1 and SD3 only). Fix: pass a FLUX.1-dev or SD3 schedule")
    arch = schedule.family if arch is None else check_arch(arch)
    if schedule.family != arch:
        raise ValueError(f"a schedule for {schedule.model!r} cannot drive the {arch} testbed generator. Fix: pass a {arch} schedule")
    size = data.IMAGE_SIZE
    if (schedule.height, schedule.width) == (size, size):
        return schedule
    h0 = base_shift(arch)
    if abs(schedule.calibration.h0 - h0) > H0_TOLERANCE:
        raise ValueError(
            f"schedule calibrated for base shift h0 = {schedule.calibration.h0:.4f}; the {arch} testbed samples with h0 = {h0:.4f}. "
            f"Fix: calibrate with --height {size} --width {size} --h0 {h0:.4f}"
        )
    return schedule_from_dict({**schedule.model_dump(), "height": size, "width": size}, f"moved to the testbed's {size}x{size}")


def training_record(folder: str | Path) -> dict:
    """The ``training.json`` written beside a network's weights."""
    return json.loads((Path(folder) / "training.json").read_text())
