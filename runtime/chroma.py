"""RALU for Chroma: :class:`RALUChromaPipeline`, a ``ChromaPipeline`` that samples in three
stages (low-res, mixed, full-res) following a calibrated schedule.

Chroma's transformer (``ChromaTransformer2DModel``) is FLUX.1's layout without the pooled
text vector and the guidance embedding (a small approximator network makes the modulation
from the timestep alone): packed 2x2 latent patches as tokens, 3-axis rotary ids
(``img_ids``, ``txt_ids``) and the same ``FluxAttention`` modules.  So positions are made as
for FLUX (:func:`ralu.runtime.flux.image_ids`, per-image rotary tables through
:mod:`ralu.runtime.flux_rotary`).  What is Chroma's own:

* **true CFG** whenever ``guidance_scale > 1`` (the default 5.0), with the negative prompt
  (empty by default), as ``ChromaPipeline`` does it, in every stage;
* **the T5 attention mask**: ``ChromaPipeline`` masks the prompt's padding (all but the first
  pad token) and extends the mask by one entry per image token; every stage here extends it by
  that stage's own image-token count (low, mixed, full), with the base pipeline's own
  ``_prepare_attention_mask``, so the mask always covers exactly the joint sequence.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from diffusers import ChromaPipeline
from diffusers.pipelines.chroma.pipeline_output import ChromaPipelineOutput

from .cache import context_name
from .compat import PaperCompat
from .flux import image_ids
from .flux_rotary import per_sample_positions, supports_per_sample_positions
from .pipeline import RALUPipelineMixin, RALUStageModel
from .plan import StagePlan, count_images
from .profiling import section
from .sampler import timestep_table
from .schedule import Schedule
from .tokens import TokenLayout, patchify, unpatchify


def per_image(tensor: torch.Tensor | None, images: int, what: str) -> torch.Tensor | None:
    """``tensor`` with one row per image: given prompt embeddings (and their mask) have one row
    per prompt, and ``ChromaPipeline.encode_prompt`` repeats only what it encodes itself; rows
    are repeated as it repeats them (each prompt's images next to each other)."""
    if tensor is None or tensor.shape[0] == images:
        return tensor
    if images % tensor.shape[0]:
        raise ValueError(f"{what} has {tensor.shape[0]} rows for {images} images. Fix: pass one row per prompt or one per image")
    return tensor.repeat_interleave(images // tensor.shape[0], dim=0)


class RALUChromaPipeline(RALUPipelineMixin, ChromaPipeline):
    r"""Chroma text-to-image with Region-Adaptive Latent Upsampling (RALU).

    Same components, loading (``from_pretrained``, ``from_pipe``), LoRA loading and call
    conventions as :class:`diffusers.ChromaPipeline`; ``__call__`` takes ChromaPipeline's
    arguments plus ``schedule=`` (a shipped name such as ``"chroma-4x"``, a path to a schedule
    JSON file, a parsed dict or a :class:`ralu.runtime.Schedule`) and ``paper_compat=``.  The
    schedule fixes the steps: ``num_inference_steps`` and ``sigmas`` must be left unset.

    Sampling is RALU's (see :class:`ralu.runtime.RALUFluxPipeline`: low-res stage on the
    half-size latent, edge-selected tokens upsampled early in the mixed stage, full resolution
    last; Euler steps on each stage's own shifted grid; exact re-noising at each resolution
    change with one draw per image from the caller's generator, so image i of a batch equals
    image i generated alone).  What differs from FLUX.1:

    * **Guidance** is ChromaPipeline's true CFG: with ``guidance_scale > 1`` (default 5.0) every
      step of every stage runs the prompt and the negative prompt (``""`` when none is given)
      and combines ``v_neg + guidance_scale * (v - v_neg)``; with ``guidance_scale <= 1`` one
      forward per step, and a negative prompt given anyway is ignored with a warning.  There is
      no guidance embedding and no pooled prompt.
    * **Attention mask**: the prompt's T5 mask (``prompt_attention_mask``, from
      ``encode_prompt`` or given with ``prompt_embeds``) is extended by every stage's own
      image-token count with ChromaPipeline's ``_prepare_attention_mask``, in the mask's own
      dtype, so each stage masks exactly what the base pipeline masks.  (With the float mask
      ChromaPipeline 0.42.1 builds, SDPA adds it to the attention logits; a boolean mask given
      with ``prompt_embeds`` masks hard.  RALU keeps whichever the base pipeline would use.)
    * ``prompt_embeds`` (and their masks) may have one row per prompt: they are repeated for
      ``num_images_per_prompt`` as ``encode_prompt`` repeats what it encodes.

    Positions are FLUX's: rotary ids ``(0, row, col)``; stages 1 and 2 in low-res token units
    (a child (dy, dx) of low-res token (i, j) at (i + dy/2, j + dx/2)), stage 3 in full-res
    units, float32; per-image ids in one batched forward through a ``pos_embed`` hook
    (:mod:`ralu.runtime.flux_rotary`), or one forward per image with a non-default attention
    processor.  Upsampling, Tweedie estimates and re-noising happen on the unpacked latent
    image (the VAE's scaled space), which the edge decode and the final decode turn into
    pixels as ChromaPipeline does (scaling and shift undone).

    ``latents`` is the full-size initial noise ``(B, (H/16)(W/16), 64)`` (packed); what it fixes,
    sizes, saving and the error without a schedule are common to every RALU pipeline: see
    :class:`ralu.runtime.pipeline.RALUPipelineMixin`.  ``callback_on_step_end`` sees
    ``latents`` (the current stage's packed tokens ``(B, N_stage, 64)``, float32) and may see and
    replace ``prompt_embeds``, plus ``stage_index`` and ``stage_step``.  IP-Adapter inputs are
    refused.
    """

    family = "chroma"

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
        negative_prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        negative_ip_adapter_image=None,
        negative_ip_adapter_image_embeds=None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature; never mutated)
        max_sequence_length: int = 512,
        *,
        schedule: str | os.PathLike | Schedule | dict | None = None,
        paper_compat: bool | list[str] | PaperCompat = False,
    ) -> ChromaPipelineOutput | tuple:
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
            height,
            width,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        do_cfg = guidance_scale > 1
        negative_given = negative_prompt is not None or negative_prompt_embeds is not None
        self.warn_ignored_negative(negative_given, do_cfg, "classifier-free guidance (guidance_scale > 1)", "pass guidance_scale > 1 (e.g. 5.0)")
        _, num_images_per_prompt, images = count_images(prompt, prompt_embeds, num_images_per_prompt, generator)
        self.check_latents(latents, plan, images, generator)

        self.begin_call(plan, guidance_scale, joint_attention_kwargs or {})
        device = self._execution_device

        # 2. Text conditioning, as ChromaPipeline does it (the negative prompt "" by default).
        (
            prompt_embeds,
            text_ids,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_text_ids,
            negative_prompt_attention_mask,
        ) = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            do_classifier_free_guidance=do_cfg,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=self._joint_attention_kwargs.get("scale", None),
        )
        cond = (per_image(prompt_embeds, images, "prompt_embeds"), text_ids, per_image(prompt_attention_mask, images, "prompt_attention_mask"))
        negative = None
        if do_cfg:
            negative = (
                per_image(negative_prompt_embeds, images, "negative_prompt_embeds"),
                negative_text_ids,
                per_image(negative_prompt_attention_mask, images, "negative_prompt_attention_mask"),
            )
        dtype = prompt_embeds.dtype

        # 3. Initial noise: the full-size noise ChromaPipeline draws (or is given).
        canvas = self.prepare_canvas(plan, latents, images, generator, device, dtype, compat)

        # 4. The stages.
        model = _ChromaStageModel(self, plan, cond, negative, guidance_scale, dtype, device)
        result = self.run_ralu_stages(plan, canvas, model, generator, compat, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 5. Output, as ChromaPipeline gives it.
        return self.finish(result.canvas, output_type, dtype, return_dict, ChromaPipelineOutput)


class _ChromaStageModel(RALUStageModel):
    """The Chroma side of :func:`ralu.runtime.sampler.run_stages`: positions, the attention
    mask of each stage's token count and true CFG around ``pipe.transformer``'s own forward.

    ``prompt_embeds`` is the name ``callback_on_step_end`` reads and replaces."""

    def __init__(self, pipe, plan, cond, negative, guidance_scale, dtype, device):
        super().__init__(pipe, plan, dtype, device)
        self.prompt_embeds, self.text_ids, self.prompt_mask = cond
        self.negative = negative
        self.guidance_scale = guidance_scale

    def joint_mask(self, text_mask: torch.Tensor | None, image_tokens: int) -> torch.Tensor | None:
        """The text mask extended over ``image_tokens`` image tokens (ChromaPipeline's own
        ``_prepare_attention_mask``): ``(B, T + image_tokens)``, or None without a mask."""
        if text_mask is None:
            return None
        return self.pipe._prepare_attention_mask(text_mask.shape[0], image_tokens, text_mask.dtype, text_mask)

    def _forward(self, hidden, timestep, embeds, text_ids, mask, img_ids, context: str) -> torch.Tensor:
        kwargs = {
            "hidden_states": hidden,
            "timestep": timestep,
            "encoder_hidden_states": embeds,
            "txt_ids": text_ids,
            "attention_mask": mask,
            "joint_attention_kwargs": self.pipe.joint_attention_kwargs,
            "return_dict": False,
        }
        if img_ids.ndim == 2:
            with self.transformer.cache_context(context):
                return self.transformer(img_ids=img_ids, **kwargs)[0]
        # Non-default attention processors: one forward per image (with its own row of the mask).
        return self.forward_each_image(kwargs, context, own=lambda b: {"img_ids": img_ids[b]}, shared=("txt_ids",))

    @contextmanager
    def stage(self, layout: TokenLayout, stage: StagePlan):
        with section("positions"):
            ids = image_ids(layout).to(self.device)
            text_id_sets = [self.text_ids] + ([self.negative[1]] if self.negative is not None else [])
            if layout.shared:
                img_ids, positions = ids[0], nullcontext()
            elif supports_per_sample_positions(self.transformer):
                img_ids, positions = ids[0], per_sample_positions(self.transformer, text_id_sets, ids)
            else:
                img_ids, positions = ids, nullcontext()
            # The mask covers this stage's joint sequence: text + this stage's image tokens.
            mask = self.joint_mask(self.prompt_mask, layout.num_tokens)
            negative_mask = self.joint_mask(self.negative[2], layout.num_tokens) if self.negative is not None else None

        timesteps = timestep_table(stage, self.device)

        def velocity(patches: torch.Tensor, sigma: float) -> torch.Tensor:
            hidden = patches.flatten(2).to(self.dtype)
            t = timesteps(sigma)
            self.pipe._current_timestep = t
            timestep = t.expand(hidden.shape[0]).to(self.dtype) / 1000
            v = self._forward(hidden, timestep, self.prompt_embeds, self.text_ids, mask, img_ids, context_name(stage.index, "cond"))
            if self.negative is not None:
                neg_embeds, neg_text_ids, _ = self.negative
                v_neg = self._forward(hidden, timestep, neg_embeds, neg_text_ids, negative_mask, img_ids, context_name(stage.index, "uncond"))
                v = v_neg + self.guidance_scale * (v - v_neg)
            return v.reshape(patches.shape)

        # The step cache starts empty in every stage (nothing survives a token-count change).
        with positions, self.stage_cache(stage):
            yield velocity
