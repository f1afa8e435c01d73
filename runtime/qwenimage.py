"""RALU for Qwen-Image: :class:`RALUQwenImagePipeline`, a ``QwenImagePipeline`` that samples
in three stages (low-res, mixed, full-res) following a calibrated schedule.

The family-independent part of a call is :class:`ralu.runtime.pipeline.RALUPipelineMixin`;
this module supplies the Qwen-Image side: prompt encoding (Qwen2.5-VL) and true CFG with its
norm rescaling as ``QwenImagePipeline`` does them, the packed latent layout (2x2 patches, as
FLUX), the decode through the causal 3-D VAE (one frame, ``latents_mean``/``latents_std``),
the scheduler's terminal stretch (``shift_terminal``) on the last stage, and the transformer
evaluation on each stage's tokens with rotary positions (:mod:`ralu.runtime.qwenimage_rotary`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import get_module_execution_device

from .cache import context_name
from .compat import PaperCompat
from .pipeline import RALUPipelineMixin, RALUStageModel
from .plan import Plan, StagePlan, count_images
from .profiling import section
from .qwenimage_rotary import rotary_table, stage_grid, stage_positions, supports_per_image_positions, token_positions
from .sampler import timestep_table
from .schedule import Schedule
from .tokens import TokenLayout, patchify, unpatchify

__all__ = ["RALUQwenImagePipeline", "stretch_to_terminal"]

logger = logging.get_logger(__name__)


def stretch_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """A last stage's sigmas (ending at 0) with diffusers' ``shift_terminal`` stretch.

    ``FlowMatchEulerDiscreteScheduler`` stretches a whole grid in progress time ``p = 1 -
    sigma`` by one factor so that its last nonzero sigma is ``shift_terminal``
    (``p -> p (1 - shift_terminal) / p_last``).  For a stage that starts at ``p_0`` the same
    linear stretch is taken about the stage start (``p -> p_0 + (p - p_0) (1 - shift_terminal
    - p_0) / (p_last - p_0)``), so the stage still starts where the transition put the latent;
    for ``p_0 = 0`` (a one-stage schedule) it is exactly diffusers'.  Stages of one step (no
    nonzero sigma after the start), or that start below ``shift_terminal``, are left alone.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    progress = 1.0 - sigmas
    first, last, target = progress[0], progress[-2], 1.0 - shift_terminal
    if len(sigmas) < 3 or not last > first or not target > first:
        return sigmas
    stretched = progress.copy()
    stretched[:-1] = first + (progress[:-1] - first) * ((target - first) / (last - first))
    return np.concatenate([1.0 - stretched[:-1], sigmas[-1:]])


class RALUQwenImagePipeline(RALUPipelineMixin, QwenImagePipeline):
    r"""Qwen-Image text-to-image with Region-Adaptive Latent Upsampling (RALU).

    Same components, loading (``from_pretrained``, ``from_pipe``), LoRA loading and call
    conventions as :class:`diffusers.QwenImagePipeline`; ``__call__`` takes its arguments plus
    ``schedule=`` (a shipped name such as ``"qwen-image-4x"``, a path to a schedule JSON file, a
    parsed dict or a :class:`ralu.runtime.Schedule`) and ``paper_compat=``.  The schedule fixes
    the steps: ``num_inference_steps`` and ``sigmas`` must be left unset.

    What differs from :class:`ralu.runtime.RALUFluxPipeline` (the stages, noise, edge
    selection and re-noising are the same):

    * **Positions.**  The transformer builds its rotary tables itself from ``img_shapes``,
      centred on the image (``QwenEmbedRope``, ``scale_rope``).  Stage 1 is a native half-size
      image (``img_shapes`` of the half size); stage 3 a native full-size one.  Stage 2 runs
      with the half-size ``img_shapes`` (so the text positions stay those of stage 1) and a
      forward hook on ``pos_embed`` substitutes the table of its tokens: the low-res tokens
      keep their stage-1 positions, a child (dy, dx) of low-res token (i, j) sits at
      (i + dy/2, j + dx/2), computed with the module's own frequencies.  When the images of
      a batch carry different tokens, the batch stays one forward (per-image tables, applied
      by a processor equivalent to diffusers' default one); with a non-default attention
      processor it falls back to one forward per image
      (:mod:`ralu.runtime.qwenimage_rotary`).
    * **True CFG** as ``QwenImagePipeline``: with ``true_cfg_scale > 1`` and a negative prompt
      (or ``negative_prompt_embeds``) every step of every stage runs a second, negative
      forward with its own text mask, and the combination is rescaled per token to the norm
      of the conditional prediction.  A negative prompt without ``true_cfg_scale > 1`` is
      ignored with a warning.  ``guidance_scale`` is for guidance-distilled transformers only
      (``guidance_embeds``), as in the base pipeline.
    * **Sigmas.**  The scheduler's ``shift_terminal`` (0.02 in Qwen/Qwen-Image) stretches
      the last stage's grid so that its last nonzero sigma is that value, as the scheduler
      does to the base grid (:func:`stretch_to_terminal`); a one-stage schedule at the base
      shift therefore walks QwenImagePipeline's own grid.
    * **Decode.**  The VAE is a causal 3-D one: the canvas is de-normalised with the VAE's
      ``latents_mean``/``latents_std`` and decoded as one frame, for the final image and the
      edge decode alike (:meth:`decode_canvas`).

    Resolution rule: ``height`` and ``width`` default to the schedule's and must equal them;
    they must be multiples of 32.  The transformer must be a plain Qwen-Image one
    (``zero_cond_t`` and the layered 3-D rotary of the Edit/Layered variants are refused).

    ``latents`` is the full-size initial noise ``(B, (H/16)(W/16), 64)`` (packed, as
    QwenImagePipeline takes it); what it fixes (and what it does not), sizes, saving and the
    error without a schedule are common to every RALU pipeline: see
    :class:`ralu.runtime.pipeline.RALUPipelineMixin`.

    ``callback_on_step_end(pipe, step, timestep, callback_kwargs)`` is called after every step
    with ``step`` counted across stages; ``callback_kwargs`` holds the requested tensors
    (``latents``: the current stage's packed tokens ``(B, N_stage, 64)``, float32;
    ``prompt_embeds``) plus ``stage_index`` and ``stage_step``.  After a call
    ``pipe.selected_tokens`` is the ``(B, k)`` tensor of low-res tokens upsampled early, or None.
    """

    family = "qwen-image"

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def latents_to_canvas(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents ``(B, N, 4 C)`` (2x2 patches, channel order c, dy, dx) -> ``(B, C, H, W)``."""
        return unpatchify(latents.unflatten(2, (self.latent_channels, 2, 2)), height, width)

    def canvas_to_latents(self, canvas: torch.Tensor) -> torch.Tensor:
        return patchify(canvas).flatten(2)

    def decode_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        """A latent image ``(B, 16, h, w)`` -> images ``(B, 3, 8h, 8w)`` in [-1, 1]: de-normalised
        with the VAE's ``latents_mean``/``latents_std`` and decoded as one frame, as
        QwenImagePipeline decodes."""
        vae = self.vae
        latents = canvas.to(device=get_module_execution_device(vae), dtype=vae.dtype)[:, :, None]
        channels = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1).to(latents.device, latents.dtype)
        return vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]

    def plan(self, schedule, height: int | None = None, width: int | None = None) -> Plan:
        """Check a request and lay out its stages (no compute): a plain Qwen-Image transformer,
        and the scheduler's ``shift_terminal`` stretch on the last stage."""
        plan = super().plan(schedule, height, width)
        config = self.transformer.config
        for option in ("zero_cond_t", "use_layer3d_rope", "use_additional_t_cond"):
            if getattr(config, option, False):
                raise ValueError(f"transformer {option}=True (an Edit/Layered variant): RALUQwenImagePipeline runs text-to-image Qwen-Image transformers only. Fix: load a Qwen-Image text-to-image transformer")
        if config.patch_size != 2 or (config.out_channels or config.in_channels) * 4 != config.in_channels:
            raise ValueError(f"transformer patch_size={config.patch_size}, in_channels={config.in_channels}, out_channels={config.out_channels}: RALU's tokens are packed 2x2 latent patches. Fix: use a Qwen-Image transformer")
        terminal = getattr(self.scheduler.config, "shift_terminal", None)
        if terminal:
            last = plan.stages[-1]
            stages = plan.stages[:-1] + (dataclasses.replace(last, sigmas=stretch_to_terminal(last.sigmas, terminal)),)
            plan = dataclasses.replace(plan, stages=stages)
        return plan

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        negative_prompt: str | list[str] = None,
        true_cfg_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature; never mutated)
        max_sequence_length: int = 512,
        *,
        schedule: str | os.PathLike | Schedule | dict | None = None,
        paper_compat: bool | list[str] | PaperCompat = False,
    ) -> QwenImagePipelineOutput | tuple:
        # 1. Check inputs: everything that can be wrong is refused before any compute.
        plan, compat = self.check_ralu_inputs(
            schedule, height, width, paper_compat, output_type, fixed={"num_inference_steps": num_inference_steps, "sigmas": sigmas}, unsupported={}
        )
        height, width = plan.schedule.height, plan.schedule.width
        self.check_inputs(
            prompt,
            height,
            width,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            negative_prompt_embeds_mask=negative_prompt_embeds_mask,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        has_neg_prompt = negative_prompt is not None or negative_prompt_embeds is not None
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
        self.warn_ignored_negative(has_neg_prompt, true_cfg_scale > 1, "true CFG (true_cfg_scale > 1)", "pass true_cfg_scale > 1 (e.g. 4.0)")
        if self.transformer.config.guidance_embeds and guidance_scale is None:
            raise ValueError("guidance_scale is required: this transformer is guidance-distilled (guidance_embeds). Fix: pass guidance_scale=...")
        if not self.transformer.config.guidance_embeds and guidance_scale not in (None, 1.0):
            logger.warning(f"guidance_scale is passed as {guidance_scale}, but ignored since the model is not guidance-distilled.")
        _, num_images_per_prompt, images = count_images(prompt, prompt_embeds, num_images_per_prompt, generator)
        self.check_latents(latents, plan, images, generator)

        self.begin_call(plan, guidance_scale, attention_kwargs or {})
        self._attention_kwargs = attention_kwargs or {}
        device = self._execution_device

        # 2. Text conditioning, as QwenImagePipeline does it (masks: None when nothing is padded).
        prompt_embeds, prompt_embeds_mask = self.encode_prompt(
            prompt=prompt,
            prompt_embeds=prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
        )
        negative = None
        if do_true_cfg:
            negative = self.encode_prompt(
                prompt=negative_prompt,
                prompt_embeds=negative_prompt_embeds,
                prompt_embeds_mask=negative_prompt_embeds_mask,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
            )
        dtype = prompt_embeds.dtype

        # 3. Initial noise: the full-size noise QwenImagePipeline draws (or is given).
        canvas = self.prepare_canvas(plan, latents, images, generator, device, dtype, compat)

        # 4. The stages.
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(images)
        model = _QwenImageStageModel(self, plan, prompt_embeds, prompt_embeds_mask, negative, true_cfg_scale, guidance, dtype, device)
        result = self.run_ralu_stages(plan, canvas, model, generator, compat, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 5. Output, as QwenImagePipeline gives it.
        return self.finish(result.canvas, output_type, dtype, return_dict, QwenImagePipelineOutput)


class _QwenImageStageModel(RALUStageModel):
    """The Qwen-Image side of :func:`ralu.runtime.sampler.run_stages`: token packing,
    rotary positions, true CFG around ``pipe.transformer``'s own forward."""

    def __init__(self, pipe, plan, prompt_embeds, prompt_embeds_mask, negative, true_cfg_scale, guidance, dtype, device):
        super().__init__(pipe, plan, dtype, device)
        self.prompt_embeds, self.prompt_embeds_mask = prompt_embeds, prompt_embeds_mask
        self.negative = negative
        self.true_cfg_scale = true_cfg_scale
        self.guidance = guidance

    def _forward(self, hidden, timestep, embeds, mask, img_shapes, per_image_tables, context: str) -> torch.Tensor:
        kwargs = {
            "timestep": timestep,
            "guidance": self.guidance,
            "encoder_hidden_states_mask": mask,
            "encoder_hidden_states": embeds,
            "img_shapes": img_shapes,
            "attention_kwargs": self.pipe.attention_kwargs,
            "return_dict": False,
        }
        if per_image_tables is None:
            with self.transformer.cache_context(context):
                return self.transformer(hidden_states=hidden, **kwargs)[0]
        # Fallback for non-default attention processors: one forward per image, with its own table.
        return self.forward_each_image(dict(kwargs, hidden_states=hidden), context, around=lambda b: stage_positions(self.transformer, per_image_tables[b]))

    @contextmanager
    def stage(self, layout: TokenLayout, stage: StagePlan):
        rows, cols = stage_grid(layout)
        img_shapes = [[(1, rows, cols)]] * layout.batch
        positions, per_image_tables = nullcontext(), None
        if layout.role == "mixed":
            # Low and full stages are native grids: the transformer's own table is theirs.
            with section("positions"):
                coordinates = token_positions(layout).to(self.device)
                table = rotary_table(self.transformer.pos_embed, coordinates[0] if layout.shared else coordinates)
            if table.ndim == 2 or supports_per_image_positions(self.transformer):
                positions = stage_positions(self.transformer, table)
            else:
                per_image_tables = table
        timesteps = timestep_table(stage, self.device)

        def velocity(patches: torch.Tensor, sigma: float) -> torch.Tensor:
            hidden = patches.flatten(2).to(self.dtype)
            t = timesteps(sigma)
            self.pipe._current_timestep = t
            timestep = t.expand(hidden.shape[0]).to(self.dtype) / 1000
            v = self._forward(hidden, timestep, self.prompt_embeds, self.prompt_embeds_mask, img_shapes, per_image_tables, context_name(stage.index, "cond"))
            if self.negative is not None:
                neg_embeds, neg_mask = self.negative
                v_neg = self._forward(hidden, timestep, neg_embeds, neg_mask, img_shapes, per_image_tables, context_name(stage.index, "uncond"))
                combined = v_neg + self.true_cfg_scale * (v - v_neg)
                v = combined * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
            return v.reshape(patches.shape)

        # The step cache starts empty in every stage (nothing survives a token-count change).
        with positions, self.stage_cache(stage):
            yield velocity
