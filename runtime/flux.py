"""RALU for FLUX.1: :class:`RALUFluxPipeline`, a ``FluxPipeline`` that samples in three
stages (low-res, mixed, full-res) following a calibrated schedule.

The family-independent part of a call is :class:`ralu.runtime.pipeline.RALUPipelineMixin`;
this module supplies the FLUX side: prompt encoding and true CFG as ``FluxPipeline`` does
them, the packed latent layout, and the transformer evaluation on each stage's tokens with
rotary positions (:mod:`ralu.runtime.flux_rotary`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from .cache import context_name
from .compat import PaperCompat
from .flux_rotary import per_sample_positions, supports_per_sample_positions
from .pipeline import RALUPipelineMixin, RALUStageModel
from .plan import StagePlan, count_images
from .profiling import section
from .sampler import timestep_table
from .schedule import Schedule
from .tokens import TokenLayout, patchify, unpatchify


def image_ids(layout: TokenLayout) -> torch.Tensor:
    """FLUX ``img_ids`` ``(B, N, 3)`` in float32: channel 0 zero, then (row, col) positions."""
    positions = layout.positions()
    return torch.cat([torch.zeros_like(positions[..., :1]), positions], dim=-1)


def check_true_cfg(pipe, true_cfg_scale, negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds) -> bool:
    """Whether a FLUX.1 call (text-to-image or Kontext) runs true CFG, as FluxPipeline decides it
    (``true_cfg_scale > 1`` and a negative prompt); a negative prompt without it is ignored with
    a warning, and the two embeddings of true CFG must have the same shape."""
    has_neg_prompt = negative_prompt is not None or (negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None)
    do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
    negative_given = any(value is not None for value in (negative_prompt, negative_prompt_2, negative_prompt_embeds, negative_pooled_prompt_embeds))
    pipe.warn_ignored_negative(negative_given, true_cfg_scale > 1, "true CFG (true_cfg_scale > 1)", "pass true_cfg_scale > 1 (e.g. 4.0)", helpers=1)
    if do_true_cfg and prompt_embeds is not None and negative_prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have the same shape")
    return do_true_cfg


class RALUFluxPipeline(RALUPipelineMixin, FluxPipeline):
    r"""FLUX.1 text-to-image with Region-Adaptive Latent Upsampling (RALU).

    Same components, loading (``from_pretrained``, ``from_pipe``), LoRA loading and call
    conventions as :class:`diffusers.FluxPipeline`; ``__call__`` takes FluxPipeline's
    arguments plus ``schedule=`` (a shipped name such as ``"flux-dev-7x"``, a path to a
    schedule JSON file, a parsed dict or a :class:`ralu.runtime.Schedule`) and
    ``paper_compat=``.  The schedule fixes the steps: ``num_inference_steps`` and ``sigmas``
    must be left unset.

    Sampling (one stage per schedule stage; 1 stage = full-res only, 2 = low + full,
    3 = low + mixed + full):

    1. **low**: the half-size latent (``M/4`` tokens); its initial noise is the full-size
       noise FluxPipeline would draw, summed over 2x2 blocks / 2 (exactly N(0, I)).
    2. **mixed**: at the end of stage 1 the Tweedie estimate ``x0 = x - sigma * v`` is
       decoded by the VAE (half-size image, mapped from [-1, 1] to [0, 1]), Canny
       (``canny_thresholds``, 100/200) finds edges, and every image's ``k = floor(r M / 4)``
       low-res tokens with most edge pixels are upsampled (``M/4 + 3k`` tokens).
    3. **full**: everything upsampled (``M`` tokens, native full-size positions).

    Each stage takes Euler steps ``x <- x + v (sigma_next - sigma)`` on its own shifted grid
    (``Schedule.sigmas(k)``).  At each resolution change the latent is nearest-upsampled in
    latent-pixel space and re-noised exactly (docs/method.md §3, :mod:`ralu.runtime.noise`), with
    one fixed-shape N(0, I) draw per image from the caller's generator: with a list of
    generators, image i of a batch equals image i generated alone.

    Positions: stages 1 and 2 measure rotary positions in low-res token units (a child
    (dy, dx) of low-res token (i, j) sits at (i + dy/2, j + dx/2)); stage 3 in full-res
    units (a native full-size image), all in float32.  When the images of a batch carry
    different tokens (stage 2), the batch stays one forward of the transformer: per-image
    rotary tables from the transformer's own ``pos_embed`` are substituted by a forward
    hook and applied by a processor equivalent to diffusers' default
    (:mod:`ralu.runtime.flux_rotary`).  With a non-default attention processor
    (IP-Adapter, custom), stage 2 falls back to one forward per image.

    Resolution rule: ``height`` and ``width`` default to the schedule's and must equal them
    (the calibrated shifts depend on the resolution; re-deriving them is calibration:
    run ``ralu-calibrate`` for the new size).  They must be multiples of 32.  A schedule for
    another model family, with more than 3 stages, or malformed, raises
    :class:`ralu.runtime.ScheduleError` before any compute.

    ``latents`` is the full-size initial noise ``(B, (H/16)(W/16), 64)`` (packed); what it fixes (and what it does not),
    sizes, saving and the error without a schedule are common to every RALU pipeline: see
    :class:`ralu.runtime.pipeline.RALUPipelineMixin`.

    Negative prompt, as FluxPipeline: used only with true CFG (``true_cfg_scale > 1``);
    given without it, it is ignored with a warning (as in the SD3 pipeline).

    ``paper_compat``: ``True`` reproduces the published research script's choices
    (token repetition, N(0, I) on tokens not upsampled, clip to [0, 1] before Canny, one
    reused correlated draw from the global RNG); a list of names from
    :class:`ralu.runtime.compat.PaperCompat` turns on single switches.

    During a call, ``callback_on_step_end(pipe, step, timestep, callback_kwargs)`` is called
    after every step with ``step`` counted across stages; ``callback_kwargs`` holds the
    requested tensors (``latents``: the current stage's packed tokens ``(B, N_stage, 64)``,
    float32) plus ``stage_index`` and ``stage_step``; ``pipe.stage_index`` and
    ``pipe.stage_step`` hold the same; ``latents`` the callback returns must keep the shape
    it was given.  After a call ``pipe.selected_tokens`` is the ``(B, k)`` tensor of low-res
    tokens upsampled early (raster order of the low-res grid), or None.  The state is kept in
    float32 whatever the model dtype.
    """

    family = "flux"

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def latents_to_canvas(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents ``(B, N, 4 C)`` (2x2 patches, channel order c, dy, dx) -> ``(B, C, H, W)``."""
        return unpatchify(latents.unflatten(2, (self.latent_channels, 2, 2)), height, width)

    def canvas_to_latents(self, canvas: torch.Tensor) -> torch.Tensor:
        return patchify(canvas).flatten(2)

    @torch.no_grad()
    def __call__(
        self,
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
        *,
        schedule: str | os.PathLike | Schedule | dict | None = None,
        paper_compat: bool | list[str] | PaperCompat = False,
    ) -> FluxPipelineOutput | tuple:
        # 1. Check inputs: everything that can be wrong is refused before any compute.
        plan, compat = self.check_ralu_inputs(
            schedule, height, width, paper_compat, output_type,
            fixed={"num_inference_steps": num_inference_steps, "sigmas": sigmas},
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
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        do_true_cfg = check_true_cfg(
            self, true_cfg_scale, negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds
        )
        _, num_images_per_prompt, images = count_images(prompt, prompt_embeds, num_images_per_prompt, generator)
        self.check_latents(latents, plan, images, generator)

        self.begin_call(plan, guidance_scale, joint_attention_kwargs or {})
        device = self._execution_device

        # 2. Text conditioning, as FluxPipeline does it.
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

        # 3. Initial noise: the full-size noise FluxPipeline draws (or is given).
        canvas = self.prepare_canvas(plan, latents, images, generator, device, dtype, compat)

        # 4. The stages.
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(images)
        model = _FluxStageModel(self, plan, prompt_embeds, pooled_prompt_embeds, text_ids, negative, true_cfg_scale, guidance, dtype, device)
        result = self.run_ralu_stages(plan, canvas, model, generator, compat, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 5. Output, as FluxPipeline gives it.
        return self.finish(result.canvas, output_type, dtype, return_dict, FluxPipelineOutput)


class _FluxStageModel(RALUStageModel):
    """The FLUX side of :func:`ralu.runtime.sampler.run_stages`: token packing, positions,
    guidance and true CFG around ``pipe.transformer``'s own forward."""

    def __init__(self, pipe, plan, prompt_embeds, pooled_prompt_embeds, text_ids, negative, true_cfg_scale, guidance, dtype, device):
        super().__init__(pipe, plan, dtype, device)
        self.prompt_embeds, self.pooled_prompt_embeds, self.text_ids = prompt_embeds, pooled_prompt_embeds, text_ids
        self.negative = negative
        self.true_cfg_scale = true_cfg_scale
        self.guidance = guidance

    def token_ids(self, layout: TokenLayout) -> torch.Tensor:
        """``(B, N, 3)`` rotary ids of the tokens one forward carries in ``layout`` (a family
        that appends tokens of its own, such as Kontext's reference image, extends them)."""
        return image_ids(layout)

    def _forward(self, hidden, timestep, embeds, pooled, text_ids, img_ids, context: str) -> torch.Tensor:
        kwargs = {
            "hidden_states": hidden,
            "timestep": timestep,
            "guidance": self.guidance,
            "pooled_projections": pooled,
            "encoder_hidden_states": embeds,
            "txt_ids": text_ids,
            "joint_attention_kwargs": self.pipe.joint_attention_kwargs,
            "return_dict": False,
        }
        if img_ids.ndim == 2:
            with self.transformer.cache_context(context):
                return self.transformer(img_ids=img_ids, **kwargs)[0]
        # Fallback for non-default attention processors: one forward per image.
        return self.forward_each_image(kwargs, context, own=lambda b: {"img_ids": img_ids[b]}, shared=("txt_ids",))

    @contextmanager
    def stage(self, layout: TokenLayout, stage: StagePlan):
        with section("positions"):
            ids = self.token_ids(layout).to(self.device)
            text_id_sets = [self.text_ids] + ([self.negative[2]] if self.negative is not None else [])
            if layout.shared:
                img_ids, positions = ids[0], nullcontext()
            elif supports_per_sample_positions(self.transformer):
                img_ids, positions = ids[0], per_sample_positions(self.transformer, text_id_sets, ids)
            else:
                img_ids, positions = ids, nullcontext()

        timesteps = timestep_table(stage, self.device)

        def velocity(patches: torch.Tensor, sigma: float) -> torch.Tensor:
            hidden = patches.flatten(2).to(self.dtype)
            t = timesteps(sigma)
            self.pipe._current_timestep = t
            timestep = t.expand(hidden.shape[0]).to(self.dtype) / 1000
            v = self._forward(hidden, timestep, self.prompt_embeds, self.pooled_prompt_embeds, self.text_ids, img_ids, context_name(stage.index, "cond"))
            if self.negative is not None:
                neg_embeds, neg_pooled, neg_text_ids = self.negative
                v_neg = self._forward(hidden, timestep, neg_embeds, neg_pooled, neg_text_ids, img_ids, context_name(stage.index, "uncond"))
                v = v_neg + self.true_cfg_scale * (v - v_neg)
            return v.reshape(patches.shape)

        # The step cache starts empty in every stage (nothing survives a token-count change).
        with positions, self.stage_cache(stage):
            yield velocity
