"""RALU for FLUX.1 Kontext: :class:`RALUFluxKontextPipeline`, a ``FluxKontextPipeline`` that
samples in three stages (low-res, mixed, full-res) following a calibrated schedule.

Kontext is FLUX.1-dev's transformer conditioned in context: the reference image's packed VAE
latent is appended to the generated tokens of every forward, with ids ``(1, row, col)``
(``FluxKontextPipeline.prepare_latents``: the generated image's ids with channel 0 set to 1),
and only the generated tokens' velocity is used.  Everything else (the text stack, guidance,
true CFG, the packed latent, the dynamic shift from the generated tokens) is FLUX.1's, so
this module reuses :mod:`ralu.runtime.flux`: the stage model extends FLUX's with the
reference tokens and their ids; the rest of a call is
:class:`ralu.runtime.pipeline.RALUPipelineMixin`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from .compat import PaperCompat
from .flux import RALUFluxPipeline, _FluxStageModel, check_true_cfg
from .pipeline import RALUPipelineMixin
from .plan import count_images
from .schedule import Schedule
from .tokens import TokenLayout


def reference_ids_in(reference_ids: torch.Tensor, role: str) -> torch.Tensor:
    """The reference's ids ``(R, 3)`` in a stage's position units, float32.

    The reference is a grid of full-res tokens, so it is placed as every full-res token of
    the stage is (:mod:`ralu.runtime.tokens`): at its own ``(row, col)`` in the full stage
    (FluxKontextPipeline's ids exactly) and at ``(row / 2, col / 2)`` in the low and mixed
    stages, where positions are measured in low-res token units.  Channel 0 (Kontext's index
    1 that tells the reference from the generated image) is an index, not a distance: kept.
    """
    ids = reference_ids.float().clone()
    if role != "full":
        ids[:, 1:] = ids[:, 1:] / 2.0
    return ids


def _keep_transformer_channels(self, value) -> None:
    # FluxKontextPipeline.__init__ stores the VAE's latent channels as ``latent_channels``;
    # the canvas's channels are read from the transformer (the same 16 in every Kontext folder).
    return None


class RALUFluxKontextPipeline(RALUPipelineMixin, FluxKontextPipeline):
    r"""FLUX.1 Kontext image editing (and text-to-image) with Region-Adaptive Latent Upsampling.

    Same components, loading, LoRA loading and call conventions as
    :class:`diffusers.FluxKontextPipeline`; ``__call__`` takes its arguments plus ``schedule=``
    and ``paper_compat=`` (as :class:`ralu.runtime.RALUFluxPipeline`, whose sampling,
    noise, ``latents``, callback, CFG and ``paper_compat`` conventions hold here unchanged).
    What differs from FLUX.1:

    * **The reference image** (``image``) is prepared exactly as FluxKontextPipeline does it:
      resized to the nearest of ``PREFERRED_KONTEXT_RESOLUTIONS`` (``_auto_resize=True``) or
      to multiples of 16 pixels, VAE-encoded (the distribution's mode), packed.  Its tokens stay
      at full resolution in every stage and are appended after the generated tokens of every
      forward; only the generated tokens' velocity is used.  Edges for the mixed stage are
      chosen on the generated image only.  Without ``image`` the call is FLUX.1 text-to-image
      with the Kontext weights, as in the base pipeline.
    * **Positions**: the generated tokens follow FLUX.1's RALU convention (stages 1 and 2 in
      low-res token units, the full stage native).  The reference keeps its own ids
      ``(1, row, col)``, expressed in the same units as every full-res token of the stage:
      ``(1, row / 2, col / 2)`` in the low and mixed stages, ``(1, row, col)`` in the full
      stage.  So in every stage a generated token and the reference content at the same place
      share their spatial coordinates, as in FluxKontextPipeline (docs/families.md §4).
      Per-image positions in one batched forward (the mixed stage) go through
      :mod:`ralu.runtime.flux_rotary` with the reference's ids appended to each image's.
    * **Size**: the schedule fixes ``height x width``; ``max_area`` (which makes the base
      pipeline pick its own output size) must be left unset.
    * **Cost**: the reference's tokens are in every forward of the baseline and of RALU, so a
      schedule's speed-up counts them (``reference_tokens`` of the ``flux-kontext-dev``
      registry record: a ~1 MP reference, 4096 tokens).

    ``latents`` is the full-size packed initial noise ``(B, (H/16)(W/16), 64)`` of the
    generated image only.  Negative prompt as FluxKontextPipeline: used only with true CFG
    (``true_cfg_scale > 1``); given without it, it is ignored with a warning.
    """

    family = "flux-kontext"

    # The packed latent layout is FLUX.1's.
    latent_channels = RALUFluxPipeline.latent_channels.setter(_keep_transformer_channels)
    latents_to_canvas = RALUFluxPipeline.latents_to_canvas
    canvas_to_latents = RALUFluxPipeline.canvas_to_latents

    def preprocess_reference(self, image, auto_resize: bool):
        """The reference as FluxKontextPipeline prepares it before ``prepare_latents``: an
        image ``(B, 3, h, w)`` in [-1, 1] at a preferred Kontext resolution (or the image's own
        size, floored to multiples of 16 pixels), latents ``(B, 16, h, w)`` as given, or None."""
        if image is None or (isinstance(image, torch.Tensor) and image.size(1) == self.latent_channels):
            return image
        multiple_of = self.vae_scale_factor * 2
        first = image[0] if isinstance(image, list) else image
        image_height, image_width = self.image_processor.get_default_height_width(first)
        if auto_resize:
            aspect_ratio = image_width / image_height
            _, image_width, image_height = min((abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        image_width = image_width // multiple_of * multiple_of
        image_height = image_height // multiple_of * multiple_of
        image = self.image_processor.resize(image, image_height, image_width)
        return self.image_processor.preprocess(image, image_height, image_width)

    @staticmethod
    def check_reference_batch(reference: torch.Tensor | None, images: int) -> None:
        """FluxKontextPipeline repeats a batch of references to the images of the call; the
        count must divide it (checked before any compute)."""
        if reference is None:
            return
        count = reference.shape[0]
        if images % count:
            raise ValueError(f"{count} reference images for {images} images: the references are repeated to the batch. Fix: pass one reference image, or one per prompt (a divisor of the number of images)")

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        negative_ip_adapter_image=None,
        negative_ip_adapter_image_embeds=None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature; never mutated)
        max_sequence_length: int = 512,
        max_area: int | None = None,
        _auto_resize: bool = True,
        *,
        schedule: str | os.PathLike | Schedule | dict | None = None,
        paper_compat: bool | list[str] | PaperCompat = False,
    ) -> FluxPipelineOutput | tuple:
        # 1. Check inputs: everything that can be wrong is refused before any compute.
        plan, compat = self.check_ralu_inputs(
            schedule,
            height,
            width,
            paper_compat,
            output_type,
            fixed={"num_inference_steps": num_inference_steps, "sigmas": sigmas, "max_area": max_area},
            unsupported={
                "ip_adapter_image": ip_adapter_image,
                "ip_adapter_image_embeds": ip_adapter_image_embeds,
                "negative_ip_adapter_image": negative_ip_adapter_image,
                "negative_ip_adapter_image_embeds": negative_ip_adapter_image_embeds,
            },
        )
        height, width = plan.schedule.height, plan.schedule.width
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        do_true_cfg = check_true_cfg(
            self, true_cfg_scale, negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds
        )
        _, num_images_per_prompt, images = count_images(prompt, prompt_embeds, num_images_per_prompt, generator)
        self.check_latents(latents, plan, images, generator)
        image = self.preprocess_reference(image, _auto_resize)
        self.check_reference_batch(image, images)

        self.begin_call(plan, guidance_scale, joint_attention_kwargs or {})
        device = self._execution_device

        # 2. Text conditioning, as FluxKontextPipeline does it.
        lora_scale = self._joint_attention_kwargs.get("scale", None)
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        negative = None
        if do_true_cfg:
            negative = self.encode_prompt(
                prompt=negative_prompt,
                prompt_2=negative_prompt_2,
                prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )
        dtype = prompt_embeds.dtype

        # 3. The reference's packed latents and ids: FluxKontextPipeline.prepare_latents itself
        #    (given a placeholder for the noise, which is drawn next, from the same generator).
        reference = reference_ids = None
        if image is not None:
            _, reference, _, reference_ids = self.prepare_latents(image, images, self.latent_channels, height, width, dtype, device, generator, latents=torch.empty(0, device=device))

        # 4. Initial noise: the full-size noise FluxKontextPipeline draws (or is given).
        canvas = self.prepare_canvas(plan, latents, images, generator, device, dtype, compat)

        # 5. The stages.
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(images)
        model = _KontextStageModel(self, plan, prompt_embeds, pooled_prompt_embeds, text_ids, negative, true_cfg_scale, guidance, dtype, device, reference, reference_ids)
        result = self.run_ralu_stages(plan, canvas, model, generator, compat, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 6. Output, as FluxKontextPipeline gives it.
        return self.finish(result.canvas, output_type, dtype, return_dict, FluxPipelineOutput)


class _KontextStageModel(_FluxStageModel):
    """FLUX.1's stage model with Kontext's reference tokens appended to every forward: their
    ids follow the stage's position units (:func:`reference_ids_in`), their output is dropped."""

    def __init__(self, pipe, plan, prompt_embeds, pooled_prompt_embeds, text_ids, negative, true_cfg_scale, guidance, dtype, device, reference, reference_ids):
        super().__init__(pipe, plan, prompt_embeds, pooled_prompt_embeds, text_ids, negative, true_cfg_scale, guidance, dtype, device)
        #: ``(B, R, 64)`` packed reference latents and their ``(R, 3)`` ids, or None (text-to-image).
        self.reference, self.reference_ids = reference, reference_ids

    def token_ids(self, layout: TokenLayout) -> torch.Tensor:
        ids = super().token_ids(layout)
        if self.reference is None:
            return ids
        reference = reference_ids_in(self.reference_ids, layout.role).to(ids.device)
        return torch.cat([ids, reference[None].expand(ids.shape[0], -1, -1)], dim=1)

    def _forward(self, hidden, timestep, embeds, pooled, text_ids, img_ids, context: str) -> torch.Tensor:
        if self.reference is None:
            return super()._forward(hidden, timestep, embeds, pooled, text_ids, img_ids, context)
        generated = hidden.shape[1]
        joint = torch.cat([hidden, self.reference.to(device=hidden.device, dtype=hidden.dtype)], dim=1)
        return super()._forward(joint, timestep, embeds, pooled, text_ids, img_ids, context)[:, :generated]
