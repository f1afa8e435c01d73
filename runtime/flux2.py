"""RALU for FLUX.2: :class:`RALUFlux2Pipeline` (``Flux2Pipeline``, FLUX.2-dev) and
:class:`RALUFlux2KleinPipeline` (``Flux2KleinPipeline``, the undistilled FLUX.2 [klein] base
models), which sample in three stages (low-res, mixed, full-res) following a calibrated schedule.

The family-independent part of a call is :class:`ralu.runtime.pipeline.RALUPipelineMixin`;
this module supplies the FLUX.2 side, shared by both classes (:class:`Flux2Layout`,
:class:`_Flux2StageModel`):

* **the canvas** is the space the transformer's tokens live in: FLUX.2's VAE latent has 32
  channels; the pipeline cuts it into 2x2 patches (128 channels) and normalises every patch
  channel with the VAE's BatchNorm running statistics.  The canvas ``(B, 32, H/8, W/8)`` holds
  those *normalised* tokens unpacked (a token is ``patch.flatten()``, channel order c, dy, dx,
  as diffusers' ``_patchify_latents``).  Upsampling, the Tweedie estimate and re-noising
  happen there (docs/method.md); only the decode undoes the normalisation.
* **positions**: 4-axis rotary ids ``(t, h, w, l)`` per token, ``t = l = 0`` for the image and
  ``(h, w)`` the token's position in the units of :mod:`ralu.runtime.tokens` (low-res units in
  stages 1 and 2, a child (dy, dx) of low-res token (i, j) at (i + dy/2, j + dx/2); native
  full-size ids in stage 3), float32.  ``Flux2Transformer2DModel`` takes one id set for the
  whole batch, so a mixed stage whose images carry different tokens runs one forward per
  image (each in its own cache context).
* **the shift**: FLUX.2's ``compute_empirical_mu`` depends on the step count; a schedule's h0
  is the base model's shift for the baseline's steps (:class:`ralu.runtime.models.EmpiricalShift`),
  and each stage walks the static-shift grid the calibrator chose for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from .cache import context_name
from .compat import PaperCompat
from .pipeline import RALUPipelineMixin, RALUStageModel
from .plan import Plan, StagePlan, count_images
from .profiling import section
from .sampler import timestep_table
from .schedule import Schedule
from .tokens import TokenLayout, patchify


def image_ids(layout: TokenLayout) -> torch.Tensor:
    """FLUX.2 ``img_ids`` ``(B, N, 4)`` in float32: (t, h, w, l) with t = l = 0 and (h, w) the
    token positions of ``layout``."""
    positions = layout.positions()
    zeros = torch.zeros_like(positions[..., :1])
    return torch.cat([zeros, positions, zeros], dim=-1)


def patch_channels(canvas: torch.Tensor) -> torch.Tensor:
    """A canvas ``(B, C, H, W)`` -> diffusers' patchified latent ``(B, 4C, H/2, W/2)`` (channel
    ``4c + 2dy + dx``, as ``Flux2Pipeline._patchify_latents``)."""
    b, c, h, w = canvas.shape
    return canvas.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unpatch_channels(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patch_channels`."""
    b, c4, h, w = latents.shape
    return latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


class Flux2Layout(RALUPipelineMixin):
    """What both FLUX.2 RALU pipelines share: the latent layout, the initial noise, the
    BatchNorm normalisation and the decode."""

    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def latents_to_canvas(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``latents`` as the FLUX.2 pipelines take them, ``(B, 4C, H/2, W/2)`` (patchified,
        normalised) -> the canvas ``(B, C, H, W)``."""
        if tuple(latents.shape[2:]) != (height // 2, width // 2):
            raise ValueError(f"latents of spatial size {tuple(latents.shape[2:])} do not make a {height}x{width} latent")
        return unpatch_channels(latents)

    def canvas_to_latents(self, canvas: torch.Tensor) -> torch.Tensor:
        return patch_channels(canvas)

    def batch_norm(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's BatchNorm mean and std ``(1, 4C, 1, 1)`` as the pipelines read them."""
        mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def denormalise(self, canvas: torch.Tensor) -> torch.Tensor:
        """Normalised canvas -> the VAE's own latent ``(B, C, H, W)`` (the pipelines' decode
        step: patch statistics undone, then unpatchified)."""
        patched = patch_channels(canvas)
        mean, std = self.batch_norm(patched)
        return unpatch_channels(patched * std + mean)

    def decode_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        latent = self.denormalise(canvas).to(device=get_module_execution_device(self.vae), dtype=self.vae.dtype)
        return self.vae.decode(latent, return_dict=False)[0]

    def prepare_canvas(self, plan: Plan, latents, images: int, generator, device, dtype, compat: PaperCompat) -> torch.Tensor:
        """The first stage's canvas from the noise the FLUX.2 pipelines draw: ``(B, 4C, H/2,
        W/2)`` (patchified; a different draw order than a ``(B, C, H, W)`` draw)."""
        if latents is None:
            shape = (images, 4 * self.latent_channels, 2 * plan.grid[0], 2 * plan.grid[1])
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return super().prepare_canvas(plan, latents, images, generator, device, dtype, compat)

    def check_no_image(self, image) -> None:
        if image is not None:
            raise ValueError(f"image: reference-image editing is not supported by {type(self).__name__} (text-to-image only). Fix: leave image unset")

    def output_latents(self, canvas: torch.Tensor) -> torch.Tensor:
        """What the base pipeline returns for ``output_type="latent"``."""
        raise NotImplementedError

    def finish(self, canvas: torch.Tensor, output_type: str, dtype: torch.dtype, return_dict: bool, output_class):
        if output_type != "latent":
            return super().finish(canvas, output_type, dtype, return_dict, output_class)
        image = self.output_latents(canvas).to(dtype)
        self.maybe_free_model_hooks()
        return output_class(images=image) if return_dict else (image,)

    def run_flux2(self, plan, compat, canvas_args, model, callback_on_step_end, callback_on_step_end_tensor_inputs, output_type, return_dict):
        """Initial noise, the stages and the output (steps 3-5 of both ``__call__``\\ s)."""
        latents, images, generator, device, dtype = canvas_args
        canvas = self.prepare_canvas(plan, latents, images, generator, device, dtype, compat)
        result = self.run_ralu_stages(plan, canvas, model, generator, compat, callback_on_step_end, callback_on_step_end_tensor_inputs)
        return self.finish(result.canvas, output_type, dtype, return_dict, Flux2PipelineOutput)


_SHARED_DOC = """
    Same components, loading (``from_pretrained``, ``from_pipe``), LoRA loading and call
    conventions as the base pipeline; ``__call__`` takes its text-to-image arguments plus
    ``schedule=`` (a shipped name, a path to a schedule JSON file, a parsed dict or a
    :class:`ralu.runtime.Schedule`) and ``paper_compat=``.  The schedule fixes the steps:
    ``num_inference_steps`` and ``sigmas`` must be left unset; ``height``/``width`` default to
    the schedule's and must equal them.  ``image`` (reference-image editing) is refused.

    Sampling follows :class:`ralu.runtime.RALUFluxPipeline` (low-res stage, edge-selected mixed
    stage, full-res stage; exact re-noising at each resolution change with one N(0, I) draw per
    image from the caller's generator: with a list of generators, image i of a batch equals
    image i generated alone).  What differs for FLUX.2:

    * the state is the *normalised* patch tokens (the VAE BatchNorm statistics applied, as the
      base pipeline denoises them), unpacked to a ``(B, 32, H/8, W/8)`` canvas; upsampling,
      Tweedie and re-noising happen there, and only decodes (the final one and the edge decode
      of the half-size Tweedie estimate) undo the normalisation;
    * positions are 4-axis ids ``(0, h, w, 0)`` in float32 (low-res units in stages 1 and 2);
      when the images of a batch select different tokens, the mixed stage runs one forward per
      image;
    * the initial noise is the ``(B, 128, H/16, W/16)`` draw of the base pipeline (or the given
      ``latents`` of that shape); the low-res stage starts from its 2x2 block sums / 2.

    ``callback_on_step_end`` sees ``latents`` as the current stage's packed tokens ``(B,
    N_stage, 128)`` (float32) plus ``stage_index`` and ``stage_step``, and may replace
    ``prompt_embeds``.
"""


class RALUFlux2Pipeline(Flux2Layout, Flux2Pipeline):
    __doc__ = (
        r"""FLUX.2 (dev) text-to-image with Region-Adaptive Latent Upsampling (RALU), on
    :class:`diffusers.Flux2Pipeline`.
"""
        + _SHARED_DOC
        + r"""
    Guidance as Flux2Pipeline: ``guidance_scale`` is embedded (FLUX.2-dev is guidance-distilled).
    Added over the base pipeline, as FluxPipeline has it: true classifier-free guidance with
    ``true_cfg_scale > 1`` and a negative prompt (``negative_prompt`` or
    ``negative_prompt_embeds``), ``v = v_neg + true_cfg_scale (v - v_neg)``; a negative prompt
    without ``true_cfg_scale > 1`` is ignored with a warning.  ``output_type="latent"`` returns
    the packed normalised tokens ``(B, N, 128)``, as Flux2Pipeline does.
    """
    )

    family = "flux2"

    def output_latents(self, canvas: torch.Tensor) -> torch.Tensor:
        return patchify(canvas).flatten(2)

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature; never mutated)
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int] = (10, 20, 30),
        caption_upsample_temperature: float | None = None,
        *,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        true_cfg_scale: float = 1.0,
        schedule: str | os.PathLike | Schedule | dict | None = None,
        paper_compat: bool | list[str] | PaperCompat = False,
    ) -> Flux2PipelineOutput | tuple:
        # 1. Check inputs: everything that can be wrong is refused before any compute.
        self.check_no_image(image)
        plan, compat = self.check_ralu_inputs(
            schedule, height, width, paper_compat, output_type, fixed={"num_inference_steps": num_inference_steps, "sigmas": sigmas}, unsupported={}
        )
        height, width = plan.schedule.height, plan.schedule.width
        self.check_inputs(
            prompt=prompt, height=height, width=width, prompt_embeds=prompt_embeds, callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs
        )
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        do_true_cfg = true_cfg_scale > 1 and has_negative
        self.warn_ignored_negative(has_negative, true_cfg_scale > 1, "true CFG (true_cfg_scale > 1)", "pass true_cfg_scale > 1 (e.g. 4.0)")
        if do_true_cfg and prompt_embeds is not None and negative_prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have the same shape. Fix: encode both at the same max_sequence_length")
        _, num_images_per_prompt, images = count_images(prompt, prompt_embeds, num_images_per_prompt, generator)
        self.check_latents(latents, plan, images, generator)

        self.begin_call(plan, guidance_scale, attention_kwargs)
        self._attention_kwargs = attention_kwargs
        device = self._execution_device

        # 2. Text conditioning, as Flux2Pipeline does it.
        if caption_upsample_temperature:
            prompt = self.upsample_prompt(prompt, images=None, temperature=caption_upsample_temperature, device=device)
        encode = dict(device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length, text_encoder_out_layers=text_encoder_out_layers)
        prompt_embeds, text_ids = self.encode_prompt(prompt=prompt, prompt_embeds=prompt_embeds, **encode)
        negative = None
        if do_true_cfg:
            if negative_prompt_embeds is None and prompt is not None and not isinstance(prompt, str) and isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * len(prompt)
            negative = self.encode_prompt(prompt=negative_prompt, prompt_embeds=negative_prompt_embeds, **encode)
        dtype = prompt_embeds.dtype

        # 3-5. Initial noise (as Flux2Pipeline draws it), the stages, the output.
        guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(images) if self.transformer.config.guidance_embeds else None
        model = _Flux2StageModel(self, plan, prompt_embeds, text_ids, negative, true_cfg_scale, guidance, dtype, device)
        return self.run_flux2(plan, compat, (latents, images, generator, device, dtype), model, callback_on_step_end, callback_on_step_end_tensor_inputs, output_type, return_dict)


class RALUFlux2KleinPipeline(Flux2Layout, Flux2KleinPipeline):
    __doc__ = (
        r"""FLUX.2 [klein] text-to-image with Region-Adaptive Latent Upsampling (RALU), on
    :class:`diffusers.Flux2KleinPipeline`, for the undistilled ("base") klein models.
"""
        + _SHARED_DOC
        + r"""
    Guidance as Flux2KleinPipeline: classifier-free guidance with ``guidance_scale > 1``,
    ``v = v_neg + guidance_scale (v - v_neg)``, the negative branch the empty prompt or
    ``negative_prompt_embeds``; added over the base pipeline, ``negative_prompt`` (text) encodes
    another negative prompt.  A step-distilled klein (``is_distilled``) is refused: its 4 steps
    leave RALU nothing to save.  ``output_type="latent"`` returns the de-normalised VAE latent
    ``(B, 32, H/8, W/8)``, as Flux2KleinPipeline does.
    """
    )

    family = "flux2-klein"

    def output_latents(self, canvas: torch.Tensor) -> torch.Tensor:
        return self.denormalise(canvas)

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature; never mutated)
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int] = (9, 18, 27),
        *,
        negative_prompt: str | list[str] | None = None,
        schedule: str | os.PathLike | Schedule | dict | None = None,
        paper_compat: bool | list[str] | PaperCompat = False,
    ) -> Flux2PipelineOutput | tuple:
        # 1. Check inputs: everything that can be wrong is refused before any compute.
        if self.config.is_distilled:
            raise ValueError(
                f"{type(self).__name__} holds a step-distilled FLUX.2 [klein] (is_distilled=True): its few steps leave RALU nothing to save. "
                "Fix: use an undistilled klein base model (e.g. FLUX.2-klein-base-4B)"
            )
        self.check_no_image(image)
        plan, compat = self.check_ralu_inputs(
            schedule, height, width, paper_compat, output_type, fixed={"num_inference_steps": num_inference_steps, "sigmas": sigmas}, unsupported={}
        )
        height, width = plan.schedule.height, plan.schedule.width
        self.check_inputs(
            prompt=prompt, height=height, width=width, prompt_embeds=prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, guidance_scale=guidance_scale,
        )
        do_cfg = guidance_scale > 1
        negative_given = negative_prompt is not None or negative_prompt_embeds is not None
        self.warn_ignored_negative(negative_given, do_cfg, "classifier-free guidance (guidance_scale > 1)", "pass guidance_scale > 1 (e.g. 4.0)")
        _, num_images_per_prompt, images = count_images(prompt, prompt_embeds, num_images_per_prompt, generator)
        self.check_latents(latents, plan, images, generator)

        self.begin_call(plan, guidance_scale, attention_kwargs)
        self._attention_kwargs = attention_kwargs
        device = self._execution_device

        # 2. Text conditioning, as Flux2KleinPipeline does it (negative: the empty prompt by default).
        encode = dict(device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length, text_encoder_out_layers=text_encoder_out_layers)
        prompt_embeds, text_ids = self.encode_prompt(prompt=prompt, prompt_embeds=prompt_embeds, **encode)
        negative = None
        if do_cfg:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            if prompt is not None and isinstance(prompt, list) and isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * len(prompt)
            negative = self.encode_prompt(prompt=negative_prompt, prompt_embeds=negative_prompt_embeds, **encode)
        dtype = prompt_embeds.dtype

        # 3-5. Initial noise (as Flux2KleinPipeline draws it), the stages, the output.
        model = _Flux2StageModel(self, plan, prompt_embeds, text_ids, negative, guidance_scale, None, dtype, device)
        return self.run_flux2(plan, compat, (latents, images, generator, device, dtype), model, callback_on_step_end, callback_on_step_end_tensor_inputs, output_type, return_dict)


class _Flux2StageModel(RALUStageModel):
    """The FLUX.2 side of :func:`ralu.runtime.sampler.run_stages`: 4-axis positions, embedded
    guidance and classifier-free guidance around ``pipe.transformer``'s own forward.

    ``negative``: ``(embeds, text_ids)`` of the negative branch, or None (no CFG);
    ``cfg_scale`` weighs it (true CFG for dev, CFG for klein); ``guidance``: the embedded
    guidance per image, or None (klein)."""

    def __init__(self, pipe, plan, prompt_embeds, text_ids, negative, cfg_scale, guidance, dtype, device):
        super().__init__(pipe, plan, dtype, device)
        self.prompt_embeds, self.text_ids = prompt_embeds, text_ids
        self.negative = negative
        self.cfg_scale = cfg_scale
        self.guidance = guidance

    def _forward(self, hidden, timestep, embeds, text_ids, img_ids, context: str) -> torch.Tensor:
        kwargs = {
            "hidden_states": hidden,
            "timestep": timestep,
            "guidance": self.guidance,
            "encoder_hidden_states": embeds,
            "txt_ids": text_ids,
            "joint_attention_kwargs": self.pipe.attention_kwargs,
            "return_dict": False,
        }
        if img_ids.ndim == 2:
            with self.transformer.cache_context(context):
                return self.transformer(img_ids=img_ids, **kwargs)[0]
        # The images carry different tokens: the transformer takes one id set per forward.
        return self.forward_each_image(kwargs, context, own=lambda b: {"img_ids": img_ids[b]})

    @contextmanager
    def stage(self, layout: TokenLayout, stage: StagePlan):
        with section("positions"):
            ids = image_ids(layout).to(self.device)
            img_ids = ids[0] if layout.shared else ids
        timesteps = timestep_table(stage, self.device)

        def velocity(patches: torch.Tensor, sigma: float) -> torch.Tensor:
            hidden = patches.flatten(2).to(self.transformer.dtype)
            t = timesteps(sigma)
            self.pipe._current_timestep = t
            timestep = t.expand(hidden.shape[0]).to(self.dtype) / 1000
            v = self._forward(hidden, timestep, self.prompt_embeds, self.text_ids, img_ids, context_name(stage.index, "cond"))
            if self.negative is not None:
                neg_embeds, neg_text_ids = self.negative
                v_neg = self._forward(hidden, timestep, neg_embeds, neg_text_ids, img_ids, context_name(stage.index, "uncond"))
                v = v_neg + self.cfg_scale * (v - v_neg)
            return v.reshape(patches.shape)

        # The step cache starts empty in every stage (nothing survives a token-count change).
        with self.stage_cache(stage):
            yield velocity
