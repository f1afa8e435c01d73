"""The testbed's generator: a small ``FluxTransformer2DModel`` in pixel space, served by a
real ``diffusers.FluxPipeline``.

Pixel space, packed like FLUX latents
-------------------------------------
The "VAE" is :class:`PixelVAE`, an identity autoencoder (a diffusers ``ModelMixin`` /
``ConfigMixin``): ``latent_channels=3``, ``block_out_channels=(3,)`` so FluxPipeline's
``vae_scale_factor`` is 1, and ``decode`` returns its input.  A 32x32 RGB image is a
3 x 32 x 32 "latent", packed by FluxPipeline into 16 x 16 = 256 tokens of 2x2 pixels
(``in_channels = 12``); the half-size 16 x 16 image is 64 tokens.  Its ``scaling_factor``
and ``shift_factor`` normalise pixels (mean about -0.5, std about 0.33 in [-1, 1]) to
roughly zero mean and unit variance, as FLUX's VAE factors do for its latents:
``latents = (image - shift_factor) * scaling_factor`` and FluxPipeline decodes with
``vae.decode(latents / scaling_factor + shift_factor)``.

Schedule
--------
The scheduler is FLUX's own ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting,
with token counts scaled down 16x: ``base_image_seq_len=64``, ``max_image_seq_len=256``
(FLUX.1-dev: 256 and 4096).  The testbed at 32 px (256 tokens) therefore samples with
``mu = 1.15`` (shift h0 = exp(1.15) = 3.158) like FLUX.1-dev at 1024 px, and its half size
(64 tokens) with ``mu = 0.5`` like FLUX.1-dev at 512 px.  Calibrate RALU schedules for it
with ``--height 32 --width 32 --h0 3.1582``.

Guidance
--------
``guidance_embeds=True`` (the FLUX.1-dev code path: the pipeline feeds ``guidance_scale``
into the model); the testbed is trained with guidance values drawn uniformly in
[1, 5] that carry no information, so its output does not depend on ``guidance_scale``
in that range (default 3.5).  Real classifier-free guidance is available through
FluxPipeline's ``true_cfg_scale`` with :func:`ralu.calibrate.testbed.conditioning.null_embeds`
as the negative prompt (10 % of training conditioning is the null prompt).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

from ralu.runtime.models import get_model

from .conditioning import JOINT_DIM, POOLED_DIM
from .data import IMAGE_SIZE
from .location import transformer_dir

#: Pixel normalisation of :class:`PixelVAE` (data statistics of the procedural images).
PIXEL_SHIFT = -0.5
PIXEL_SCALE = 3.0

#: The transformer's architecture (``FluxTransformer2DModel`` arguments).
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=12,
    out_channels=None,
    num_layers=3,
    num_single_layers=3,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=JOINT_DIM,
    pooled_projection_dim=POOLED_DIM,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)

#: FLUX.1-dev's scheduler and mu rule at the testbed's token counts (see the module docstring).
_FLUX_SCHEDULER = get_model("flux-dev").scheduler
SCHEDULER = dataclasses.replace(
    _FLUX_SCHEDULER, dynamic=dataclasses.replace(_FLUX_SCHEDULER.dynamic, base_image_seq_len=64, max_image_seq_len=256)
)
SCHEDULER_CONFIG = SCHEDULER.config()

#: Sampling steps by default: FLUX.1-dev's baseline.
BASE_STEPS = get_model("flux-dev").base_steps

#: Guidance value for sampling (any value in the trained range [1, 5] gives the same model).
GUIDANCE_SCALE = 3.5
#: Range of the (uninformative) guidance values seen in training.
GUIDANCE_RANGE = (1.0, 5.0)


class PixelVAE(ModelMixin, ConfigMixin):
    """Identity "autoencoder" for pixel-space FLUX: images in [-1, 1] are the latents.

    ``block_out_channels`` has one entry so that FluxPipeline's ``vae_scale_factor`` is 1.
    It holds one buffer only so that diffusers can read its device and dtype.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 3,
        block_out_channels: tuple[int, ...] = (3,),
        scaling_factor: float = PIXEL_SCALE,
        shift_factor: float = PIXEL_SHIFT,
        sample_size: int = IMAGE_SIZE,
    ):
        super().__init__()
        if latent_channels != in_channels:
            raise ValueError("PixelVAE is the identity: latent_channels must equal in_channels")
        self.register_buffer("anchor", torch.zeros(1), persistent=False)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        parameters = torch.cat([x, torch.zeros_like(x)], dim=1)
        posterior = DiagonalGaussianDistribution(parameters, deterministic=True)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        sample = z.to(self.anchor.dtype)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        return self.decode(sample, return_dict=return_dict)


def images_to_latents(images: torch.Tensor, vae: PixelVAE | None = None) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [-1, 1] -> normalised (unpacked) latents."""
    shift = PIXEL_SHIFT if vae is None else vae.config.shift_factor
    scale = PIXEL_SCALE if vae is None else vae.config.scaling_factor
    return (images - shift) * scale


def latents_to_images(latents: torch.Tensor, vae: PixelVAE | None = None) -> torch.Tensor:
    """Inverse of :func:`images_to_latents`."""
    shift = PIXEL_SHIFT if vae is None else vae.config.shift_factor
    scale = PIXEL_SCALE if vae is None else vae.config.scaling_factor
    return latents / scale + shift


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> FLUX tokens ``(B, H/2 * W/2, 4C)`` (channel order c, dy, dx), as
    ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """FLUX ``img_ids`` ``(H/2 * W/2, 3)`` for a ``height x width`` pixel image."""
    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, torch.float32)


def build_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """A freshly initialised transformer with :data:`TRANSFORMER_CONFIG`."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def load_transformer(path: str | Path | None = None, device="cpu", dtype=torch.float32) -> FluxTransformer2DModel:
    """The repository's trained transformer (or the given diffusers-format folder's), in eval
    mode; :mod:`.location` says where the repository's weights are found."""
    path = transformer_dir(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no testbed transformer at {path}. Fix: train one with `python -m ralu.calibrate.testbed.train` "
            "(python -m ralu.calibrate.testbed.train --help)"
        )
    model = FluxTransformer2DModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def load_pipeline(device="cpu", dtype=torch.float32, path: str | Path | None = None, pipeline_class=FluxPipeline) -> FluxPipeline:
    """A real ``FluxPipeline`` (or ``pipeline_class``) driving the trained testbed model.

    No text encoders: call it with ``**encode_labels(labels)`` (prompt_embeds and
    pooled_prompt_embeds), ``height=width=32``, e.g.::

        pipe = load_pipeline()
        out = pipe(**encode_labels([[0, 0, 0]]), height=32, width=32, num_inference_steps=50,
                   guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="pt")

    ``RALUFluxPipeline.from_pipe(pipe, vae=pipe.vae)`` (diffusers carries over only
    components of the type-hinted class, and the VAE here is a :class:`PixelVAE`) or
    ``pipeline_class=RALUFluxPipeline`` gives the RALU runtime on the same components.
    """
    transformer = load_transformer(path, device, dtype)
    vae = PixelVAE().to(device)  # float32 whatever the transformer's dtype: it only passes images through
    pipe = pipeline_class(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scheduler_shift(tokens: int) -> float:
    """exp(mu) of the testbed scheduler at ``tokens`` image tokens (FluxPipeline's calculate_shift)."""
    return SCHEDULER.base_shift(tokens)


def testbed_h0() -> float:
    """The scheduler's shift at the testbed's 32 px (256 tokens): exp(1.15) = 3.158,
    FLUX.1-dev's at 1024 px."""
    return scheduler_shift((IMAGE_SIZE // 2) ** 2)


#: How far a schedule's calibration h0 may be from :func:`testbed_h0` (the published FLUX
#: presets were calibrated with h0 = 3, 5 % below).
H0_TOLERANCE = 0.2


def testbed_schedule(schedule):
    """A FLUX.1-dev schedule (shipped name, file, dict or ``Schedule``) at the testbed's 32x32.

    The testbed's scheduler gives 32 px the base shift FLUX.1-dev has at 1024 px, so a
    schedule calibrated for 1024 px carries over with its shifts unchanged; only the
    resolution is moved.  Schedules for SD3, or calibrated for another base shift (another
    resolution), are refused with the fix.
    """
    from ralu.runtime.schedule import load_schedule, schedule_from_dict

    schedule = load_schedule(schedule)
    if schedule.family != "flux":
        raise ValueError(f"a schedule for {schedule.model!r}: the testbed is a FLUX transformer. Fix: pass a flux-dev schedule")
    if (schedule.height, schedule.width) == (IMAGE_SIZE, IMAGE_SIZE):
        return schedule
    h0 = testbed_h0()
    if abs(schedule.calibration.h0 - h0) > H0_TOLERANCE:
        raise ValueError(
            f"schedule calibrated for base shift h0 = {schedule.calibration.h0:.4f} ({schedule.height}x{schedule.width}); the testbed "
            f"samples with h0 = {h0:.4f} (FLUX.1-dev at 1024x1024). Fix: calibrate at 1024x1024, or with --h0 {h0:.4f}"
        )
    return schedule_from_dict({**schedule.model_dump(), "height": IMAGE_SIZE, "width": IMAGE_SIZE}, f"moved to the testbed's {IMAGE_SIZE}x{IMAGE_SIZE}")


def training_record(path: str | Path | None = None) -> dict:
    """The JSON record written next to the weights by the training command."""
    return json.loads((transformer_dir(path) / "training.json").read_text())
