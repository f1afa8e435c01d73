"""RALU for Stable Diffusion 3 / 3.5: :class:`RALUStableDiffusion3Pipeline`.

The family-independent parts (the glue of a call, stage plan, canvas and token layouts,
NT-DM noise injection, edge selection, the Euler loop) live in :mod:`ralu.runtime.pipeline`, :mod:`ralu.runtime.plan`, :mod:`~ralu.runtime.tokens`,
:mod:`~ralu.runtime.noise`, :mod:`~ralu.runtime.edges` and :mod:`~ralu.runtime.sampler`.  This
module supplies the SD3 side: prompt encoding and classifier-free guidance as
``StableDiffusion3Pipeline`` does them, skip-layer guidance, and the transformer evaluation on
each stage's token set.

SD3 latents are not packed: the transformer cuts ``(B, 16, H/8, W/8)`` into 2x2 patches itself
and adds a sin-cos position table (a centre crop of a ``pos_embed_max_size`` square).  A token is
therefore exactly one 2x2 latent-pixel patch, the layout of :mod:`ralu.runtime.tokens`.  Stages
whose tokens form a native grid run the model's own ``forward`` on the latent; the mixed stage
(and, with ``low_res_positions="stretch"``, the low-res stage) runs
:func:`ralu.runtime.sd3_tokens.token_forward`, the same ``forward`` on an arbitrary per-image
(patch, position) set, so hooks, caches and ``torch.compile`` see every step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

from . import sd3_tokens
from .cache import cache_context, context_name
from .compat import PaperCompat
from .pipeline import RALUPipelineMixin, RALUStageModel
from .plan import Plan, StagePlan, count_images
from .profiling import section
from .sampler import timestep_table
from .schedule import Schedule, unshift_sigma
from .tokens import TokenLayout, patchify, unpatchify

__all__ = ["POSITION_MODES", "RALUStableDiffusion3Pipeline", "table_positions"]

#: Where low-res tokens sit in the transformer's position table (see the class docstring).
POSITION_MODES = ("crop", "stretch")

#: Tolerance of the skip-layer-guidance window test (step fractions are exact fractions i/N).
_SLG_EPS = 1e-9


def check_position_mode(mode) -> str:
    """``mode`` if it is one of :data:`POSITION_MODES` (the one check of ``low_res_positions``,
    for a call and for :func:`table_positions` alike), else a one-line ValueError."""
    if mode not in POSITION_MODES:
        raise ValueError(f"low_res_positions={mode!r} is unknown. Fix: use one of {POSITION_MODES}")
    return mode


def table_positions(transformer, layout: TokenLayout, mode: str = "crop") -> torch.Tensor:
    """Table coordinates ``(B, N, 2)`` (row, col) of a layout's tokens.

    ``layout.positions()`` is in low-res token units for the roles ``low`` and ``mixed`` (a
    child (dy, dx) of low-res token (i, j) at (i + dy/2, j + dx/2)) and in full-res units for
    ``full``.  ``"crop"`` puts low-res units on the centre crop a native half-size image uses
    (so stage 1 is exactly a half-size generation); ``"stretch"`` doubles them onto the centre
    crop of the full-size image (the low-res grid is the full-size table at double step).
    Role ``full`` is always the native full-size crop.
    """
    check_position_mode(mode)
    positions = layout.positions()
    gh, gw = layout.grid
    if layout.role == "full":
        top, left = sd3_tokens.grid_origin(transformer, 2 * gh, 2 * gw)
    elif mode == "crop":
        top, left = sd3_tokens.grid_origin(transformer, gh, gw)
    else:
        top, left = sd3_tokens.grid_origin(transformer, 2 * gh, 2 * gw)
        positions = 2.0 * positions
    return positions + torch.tensor([top, left], dtype=positions.dtype, device=positions.device)


def _raster(layout: TokenLayout) -> bool:
    """Whether a layout's tokens are a whole grid in raster order (a native forward fits)."""
    if layout.role == "low" and layout.num_full == 0:
        index = layout.low_index
    elif layout.role == "full" and layout.num_low == 0:
        index = layout.full_index
    else:
        return False
    return bool((index == torch.arange(index.shape[1], device=index.device)).all())


class RALUStableDiffusion3Pipeline(RALUPipelineMixin, StableDiffusion3Pipeline):
    r"""Stable Diffusion 3 / 3.5 text-to-image with Region-Adaptive Latent Upsampling (RALU).

    Same components, loading (``from_pretrained``, ``from_pipe``), LoRA loading and call
    conventions as :class:`diffusers.StableDiffusion3Pipeline`; ``__call__`` takes its arguments
    plus ``schedule=`` (a shipped name such as ``"sd3-medium-3x"``, a path to a schedule JSON
    file, a parsed dict or a :class:`ralu.runtime.Schedule`; its model must be of the ``sd3``
    family), ``paper_compat=`` and ``low_res_positions=``.  The schedule fixes the steps:
    ``num_inference_steps``, ``sigmas`` and ``mu`` must be left unset.

    Sampling (one stage per schedule stage; 1 stage = full-res only, 2 = low + full,
    3 = low + mixed + full), with ``M`` the full-size image token count:

    1. **low**: the half-size latent (``M/4`` tokens); its initial noise is the full-size noise
       StableDiffusion3Pipeline would draw, summed over 2x2 blocks / 2 (exactly N(0, I)).
    2. **mixed**: at the end of stage 1 the Tweedie estimate ``x0 = x - sigma * v`` (guided
       velocity of the last step) is decoded by the VAE (half-size image, mapped from [-1, 1]
       to [0, 1]), Canny (``canny_thresholds``, 100/200) finds edges, and every image's
       ``k = floor(r M / 4)`` low-res tokens with most edge pixels are upsampled (``M/4 + 3k``
       tokens; a low-res token is a 2x2 patch of the half-size latent, its 4 children the
       2x2 patches of the nearest-upsampled 4x4 latent-pixel cell).
    3. **full**: everything upsampled (``M`` tokens): the model's own forward.

    Each stage takes Euler steps ``x <- x + v (sigma_next - sigma)`` on its own shifted grid
    (``Schedule.sigmas(k)``) with ``timestep = 1000 * sigma``; one transformer evaluation per
    step, the negative and positive halves of classifier-free guidance batched together and
    sharing their image's token selection.  At each resolution change the latent is
    nearest-upsampled in latent-pixel space and re-noised exactly (docs/method.md §3,
    :mod:`ralu.runtime.noise`) with one fixed-shape N(0, I) draw per image from the caller's
    generator: with a list of generators, image i of a batch equals image i generated alone.

    Positions (``low_res_positions``; SD3 has no rotary embedding but a sin-cos table indexed
    by token position, :mod:`ralu.runtime.sd3_tokens`):

    * ``"crop"`` (default): stage 1 is exactly a native half-size generation (the smaller
      centre crop of the table, same spacing: what SD3 sees when asked for a half-size image,
      so stage 1 runs the model's own forward).  The mixed stage stays in that frame: a kept
      low-res token (i, j) where stage 1 had it, a child (dy, dx) of an upsampled token at
      (i + dy/2, j + dx/2), between table entries (the table's own sin-cos formula evaluated
      there).  Stage 3 is a native full-size generation.
    * ``"stretch"``: every stage in the full-size frame: the low-res grid is the full-size
      crop at double step (low-res token (i, j) at full-res position (2i, 2j), the place of
      its top-left child; children at (2i + dy, 2j + dx)), all integer table entries.

    In both, a child sits at its parent's position plus (dy, dx)/2 low-res units, as in the
    FLUX runtime; the conventions differ only in the frame of the low-res and mixed stages.

    Skip-layer guidance (``skip_guidance_layers``, SD3.5-medium's recipe): as in
    StableDiffusion3Pipeline, an extra forward of the positive half with those blocks skipped
    adds ``(v_cond - v_skip) * skip_layer_guidance_scale``; it runs at the steps whose noise
    level lies inside the window (``skip_layer_guidance_start``, ``skip_layer_guidance_stop``)
    of the *base* schedule's step fractions (a step at sigma is at fraction
    ``1 - unshift(sigma, h0)``, ``h0`` the schedule's base shift), in every stage.

    Resolution rule: ``height`` and ``width`` default to the schedule's and must equal them;
    multiples of 32; the full-size token grid must fit the transformer's position table.
    A schedule of another family, with more than 3 stages, or malformed raises
    :class:`ralu.runtime.ScheduleError` before any compute.

    ``latents`` is the full-size initial noise ``(B, 16, H/8, W/8)``; what it fixes (and what it does not),
    sizes, saving and the error without a schedule are common to every RALU pipeline: see
    :class:`ralu.runtime.pipeline.RALUPipelineMixin`.

    Negative prompt, as StableDiffusion3Pipeline: used only with classifier-free guidance
    (``guidance_scale > 1``); given without it, it is ignored with a warning (as in the
    FLUX pipeline with ``true_cfg_scale <= 1``).

    ``paper_compat``: ``True`` reproduces the published research script's choices (token
    repetition, N(0, I) on tokens not upsampled, clip to [0, 1] before Canny, one reused
    correlated draw from the global RNG); a list of names from
    :class:`ralu.runtime.compat.PaperCompat` turns on single switches.

    During a call, ``callback_on_step_end(pipe, step, timestep, callback_kwargs)`` is called
    after every step with ``step`` counted across stages; ``callback_kwargs`` holds the
    requested tensors (``latents``: the current stage's tokens ``(B, N_stage, 4 C)``, each a
    2x2 latent patch flattened in (c, dy, dx) order, float32 (the layout of the FLUX runtime);
    ``prompt_embeds`` / ``pooled_prompt_embeds``: negative and positive halves concatenated,
    as in StableDiffusion3Pipeline) plus ``stage_index`` and ``stage_step``; ``pipe.stage_index``
    and ``pipe.stage_step`` hold the same; ``latents`` the callback returns must keep the shape
    it was given.  After a call ``pipe.selected_tokens`` is the ``(B, k)`` tensor of low-res
    tokens upsampled early (raster order of the low-res grid), or None.  The state is kept in
    float32 whatever the model dtype.  IP-Adapter is not supported.
    """

    family = "sd3"
    #: Default of ``__call__``'s ``low_res_positions``.
    low_res_positions: str = "crop"

    def plan(self, schedule, height: int | None = None, width: int | None = None) -> Plan:
        """Check a request and lay out its stages (no compute); the transformer must be an
        SD3 one whose position table holds the full-size token grid."""
        plan = super().plan(schedule, height, width)
        height, width = plan.schedule.height, plan.schedule.width
        transformer = self.transformer
        sd3_tokens.check_sd3_transformer(transformer)
        config = transformer.config
        if config.patch_size != 2:
            raise ValueError(f"transformer patch_size={config.patch_size}: RALU's tokens are 2x2 latent patches. Fix: use an SD3 / SD3.5 transformer (patch_size 2)")
        if (config.out_channels or config.in_channels) != config.in_channels:
            raise ValueError(f"transformer in_channels={config.in_channels} but out_channels={config.out_channels}: a velocity must live in the latent space")
        size = transformer.pos_embed.pos_embed_max_size
        if max(2 * plan.grid[0], 2 * plan.grid[1]) > size:
            largest = size * config.patch_size * self.vae_scale_factor
            raise ValueError(f"{height}x{width} needs a {2 * plan.grid[0]}x{2 * plan.grid[1]} token grid but the transformer's position table is {size}x{size} (pos_embed_max_size). Fix: at most {largest} px a side")
        return plan

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def latents_to_canvas(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """SD3 latents are the latent image itself."""
        return latents

    def canvas_to_latents(self, canvas: torch.Tensor) -> torch.Tensor:
        return canvas

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature; never mutated)
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        *,
        schedule: str | os.PathLike | Schedule | dict | None = None,
        paper_compat: bool | list[str] | PaperCompat = False,
        low_res_positions: str | None = None,
    ) -> StableDiffusion3PipelineOutput | tuple:
        # 1. Check inputs: everything that can be wrong is refused before any compute.
        plan, compat = self.check_ralu_inputs(
            schedule, height, width, paper_compat, output_type,
            fixed={"num_inference_steps": num_inference_steps, "sigmas": sigmas, "mu": mu},
            unsupported={"ip_adapter_image": ip_adapter_image, "ip_adapter_image_embeds": ip_adapter_image_embeds},
        )
        height, width = plan.schedule.height, plan.schedule.width
        mode = check_position_mode(self.low_res_positions if low_res_positions is None else low_res_positions)
        if skip_guidance_layers is not None:
            layers = len(self.transformer.transformer_blocks)
            bad = [index for index in skip_guidance_layers if not 0 <= int(index) < layers]
            if bad:
                raise ValueError(f"skip_guidance_layers {bad} are not block indices of a {layers}-block transformer")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt,
            prompt_2,
            prompt_3,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        batch_size, num_images_per_prompt, images = count_images(prompt, prompt_embeds, num_images_per_prompt, generator)
        self.check_latents(latents, plan, images, generator)
        negative_given = any(value is not None for value in (negative_prompt, negative_prompt_2, negative_prompt_3, negative_prompt_embeds, negative_pooled_prompt_embeds))
        self.warn_ignored_negative(negative_given, guidance_scale > 1, "classifier-free guidance (guidance_scale > 1)", "pass guidance_scale > 1 (e.g. 7.0)")

        self.begin_call(plan, guidance_scale, joint_attention_kwargs)
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._clip_skip = clip_skip
        device = self._execution_device

        # 2. Text conditioning, as StableDiffusion3Pipeline does it.
        lora_scale = joint_attention_kwargs.get("scale", None) if joint_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=device,
            clip_skip=self.clip_skip,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        if num_images_per_prompt > 1 and prompt_embeds.shape[0] == batch_size:
            # encode_prompt repeats what it encodes, not embeddings passed in: repeat those
            # like it does (the copies of one prompt next to each other).
            def repeat(tensor):
                return None if tensor is None else tensor.repeat_interleave(num_images_per_prompt, dim=0)

            prompt_embeds, pooled_prompt_embeds = repeat(prompt_embeds), repeat(pooled_prompt_embeds)
            if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] == batch_size:
                negative_prompt_embeds, negative_pooled_prompt_embeds = repeat(negative_prompt_embeds), repeat(negative_pooled_prompt_embeds)
        cond_embeds, cond_pooled = prompt_embeds, pooled_prompt_embeds
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)
        dtype = prompt_embeds.dtype

        # 3. Initial noise: the full-size noise StableDiffusion3Pipeline draws (or is given).
        canvas = self.prepare_canvas(plan, latents, images, generator, device, dtype, compat)

        # 4. The stages.
        slg = None
        if skip_guidance_layers is not None and self.do_classifier_free_guidance:
            slg = _SkipLayerGuidance(
                [int(index) for index in skip_guidance_layers],
                skip_layer_guidance_scale,
                skip_layer_guidance_start,
                skip_layer_guidance_stop,
                plan.schedule.calibration.h0,
            )
        model = _SD3StageModel(self, plan, prompt_embeds, pooled_prompt_embeds, cond_embeds, cond_pooled, slg, mode, dtype, device)
        result = self.run_ralu_stages(plan, canvas, model, generator, compat, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 5. Output, as StableDiffusion3Pipeline gives it.
        return self.finish(result.canvas, output_type, dtype, return_dict, StableDiffusion3PipelineOutput)


class _SkipLayerGuidance:
    """SD3.5's skip-layer guidance window, placed by noise level (see the class docstring)."""

    def __init__(self, layers: list[int], scale: float, start: float, stop: float, h0: float):
        self.layers, self.scale, self.start, self.stop, self.h0 = layers, scale, start, stop, h0

    def active(self, sigma: float) -> bool:
        fraction = 1.0 - float(unshift_sigma(sigma, self.h0))
        return self.start + _SLG_EPS < fraction < self.stop - _SLG_EPS


class _SD3StageModel(RALUStageModel):
    """The SD3 side of :func:`ralu.runtime.sampler.run_stages`: positions, classifier-free and
    skip-layer guidance around ``pipe.transformer`` (its forward on native grids, the token
    path of :mod:`ralu.runtime.sd3_tokens` otherwise)."""

    def __init__(self, pipe, plan, prompt_embeds, pooled_prompt_embeds, cond_embeds, cond_pooled, slg, mode, dtype, device):
        super().__init__(pipe, plan, dtype, device)
        # The CFG batch [negative, positive] (what callbacks see), and the positive half
        # alone for skip-layer guidance.
        self.prompt_embeds, self.pooled_prompt_embeds = prompt_embeds, pooled_prompt_embeds
        self.cond_embeds, self.cond_pooled = cond_embeds, cond_pooled
        self.slg = slg
        self.mode = mode

    def transformer_output(self, patches, timestep, embeds, pooled, grid, positions, skip_layers=None, position_embeds=None) -> torch.Tensor:
        """One evaluation on token patches ``(B, N, C, 2, 2)``: the model's forward on a native
        ``grid`` (latent pixels), else the token path at table ``positions`` ``(B, N, 2)`` whose
        embeddings ``position_embeds`` ``(B, N, D)`` were computed beforehand (once per stage)."""
        if grid is not None:
            with section("gather_scatter"):
                latent = unpatchify(patches, *grid)
            out = self.transformer(
                hidden_states=latent,
                timestep=timestep,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                joint_attention_kwargs=self.pipe.joint_attention_kwargs,
                return_dict=False,
                skip_layers=skip_layers,
            )[0]
            with section("gather_scatter"):
                return patchify(out)
        return sd3_tokens.token_forward(
            self.transformer,
            patches,
            positions,
            embeds,
            pooled,
            timestep,
            joint_attention_kwargs=self.pipe.joint_attention_kwargs,
            skip_layers=skip_layers,
            position_embeds=position_embeds,
        )

    @contextmanager
    def stage(self, layout: TokenLayout, stage: StagePlan):
        cfg = self.pipe.do_classifier_free_guidance
        # Positions, their embeddings and the timesteps are made once per stage: every step of
        # a stage evaluates the same tokens.
        with section("positions"):
            native = _raster(layout) and (layout.role == "full" or self.mode == "crop")
            grid = positions = position_embeds = None
            model_positions = model_position_embeds = None
            if native:
                size = layout.latent_size
                grid = size if layout.role == "full" else (size[0] // 2, size[1] // 2)
            else:
                positions = table_positions(self.transformer, layout, self.mode).to(self.device)
                position_embeds = sd3_tokens.position_embedding(self.transformer, positions)
                # The CFG batch is [negative, positive]: both halves share the image's tokens.
                model_positions = torch.cat([positions, positions]) if cfg else positions
                model_position_embeds = torch.cat([position_embeds, position_embeds]) if cfg else position_embeds
        timesteps = timestep_table(stage, self.device)

        def velocity(patches: torch.Tensor, sigma: float) -> torch.Tensor:
            hidden = patches.to(self.dtype)
            model_input = torch.cat([hidden, hidden]) if cfg else hidden
            t = timesteps(sigma)
            # The CFG halves are one batch, as in StableDiffusion3Pipeline: one cache context.
            with cache_context(self.transformer, context_name(stage.index, "cond_uncond" if cfg else "cond")):
                out = self.transformer_output(model_input, t.expand(model_input.shape[0]), self.prompt_embeds, self.pooled_prompt_embeds, grid, model_positions, position_embeds=model_position_embeds)
            if not cfg:
                return out
            uncond, cond = out.chunk(2)
            v = uncond + self.pipe.guidance_scale * (cond - uncond)
            if self.slg is not None and self.slg.active(sigma):
                with cache_context(self.transformer, context_name(stage.index, "skip_layers")):
                    skipped = self.transformer_output(hidden, t.expand(hidden.shape[0]), self.cond_embeds, self.cond_pooled, grid, positions, self.slg.layers, position_embeds)
                v = v + (cond - skipped) * self.slg.scale
            return v

        # The step cache starts empty in every stage (nothing survives a token-count change).
        with self.stage_cache(stage):
            yield velocity
