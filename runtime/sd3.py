"""RALU for Stable Diffusion 3 / 3.5: :class:`RALUStableDiffusion3Pipeline`.

The family-independent parts (stage plan, canvas and token layouts, NT-DM noise injection,
edge selection, the Euler loop) live in :mod:`ralu.runtime.plan`, :mod:`~ralu.runtime.tokens`,
:mod:`~ralu.runtime.noise`, :mod:`~ralu.runtime.edges` and :mod:`~ralu.runtime.sampler`.  This
module supplies the SD3 side: prompt encoding and classifier-free guidance as
``StableDiffusion3Pipeline`` does them, skip-layer guidance, and the transformer evaluation on
each stage's token set.

SD3 latents are not packed: the transformer cuts ``(B, 16, H/8, W/8)`` into 2x2 patches itself
and adds a sin-cos position table (a centre crop of a ``pos_embed_max_size`` square).  A token is
therefore exactly one 2x2 latent-pixel patch, the layout of :mod:`ralu.runtime.tokens`.  Stages
whose tokens form a native grid run the model's own ``forward``; the mixed stage (and, with
``low_res_positions="stretch"``, the low-res stage) runs :func:`ralu.runtime.sd3_tokens.token_forward`,
the same model on an arbitrary per-image (patch, position) set.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from . import sd3_tokens
from .compat import PaperCompat
from .edges import CANNY_THRESHOLDS
from .plan import Plan, StagePlan, count_images, make_plan
from .profiling import section
from .sampler import StepInfo, decode_canvas, run_stages, timestep_table
from .schedule import Schedule, load_schedule, unshift_sigma
from .tokens import TokenLayout, initial_canvas, patchify, unpatchify, upsample_nearest

__all__ = ["POSITION_MODES", "RALUStableDiffusion3Pipeline", "table_positions"]

_OUTPUT_TYPES = ("pil", "np", "pt", "latent")

#: Where low-res tokens sit in the transformer's position table (see the class docstring).
POSITION_MODES = ("crop", "stretch")

#: Tolerance of the skip-layer-guidance window test (step fractions are exact fractions i/N).
_SLG_EPS = 1e-9


def table_positions(transformer, layout: TokenLayout, mode: str = "crop") -> torch.Tensor:
    """Table coordinates ``(B, N, 2)`` (row, col) of a layout's tokens.

    ``layout.positions()`` is in low-res token units for the roles ``low`` and ``mixed`` (a
    child (dy, dx) of low-res token (i, j) at (i + dy/2, j + dx/2)) and in full-res units for
    ``full``.  ``"crop"`` puts low-res units on the centre crop a native half-size image uses
    (so stage 1 is exactly a half-size generation); ``"stretch"`` doubles them onto the centre
    crop of the full-size image (the low-res grid is the full-size table at double step).
    Role ``full`` is always the native full-size crop.
    """
    if mode not in POSITION_MODES:
        raise ValueError(f"low_res_positions={mode!r} is unknown. Fix: use one of {POSITION_MODES}")
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


class RALUStableDiffusion3Pipeline(StableDiffusion3Pipeline):
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
    nearest-upsampled in latent-pixel space and re-noised exactly (METHOD.md 3,
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
    and ``pipe.stage_step`` hold the same.  After a call ``pipe.selected_tokens`` is the
    ``(B, k)`` tensor of low-res tokens upsampled early (raster order of the low-res grid), or
    None.  The state is kept in float32 whatever the model dtype.  IP-Adapter is not supported.
    """

    #: Canny hysteresis thresholds for the edge score (the paper's 100/200).
    canny_thresholds: tuple[float, float] = CANNY_THRESHOLDS
    #: Default of ``__call__``'s ``low_res_positions``.
    low_res_positions: str = "crop"

    stage_index: int | None = None
    stage_step: int | None = None
    selected_tokens: torch.Tensor | None = None

    def plan(self, schedule, height: int | None = None, width: int | None = None) -> Plan:
        """Check a request and lay out its stages (no compute)."""
        schedule = load_schedule(schedule)
        height = schedule.height if height is None else height
        width = schedule.width if width is None else width
        plan = make_plan(schedule, "sd3", height, width, self.vae_scale_factor)
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
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        *,
        schedule: "str | os.PathLike | Schedule | dict | None" = None,
        paper_compat: "bool | list[str] | PaperCompat" = False,
        low_res_positions: str | None = None,
    ) -> StableDiffusion3PipelineOutput | tuple:
        # 1. Everything that can be wrong is checked before any compute.
        plan = self.plan(schedule, height, width)
        height, width = plan.schedule.height, plan.schedule.width
        compat = PaperCompat.parse(paper_compat)
        mode = self.low_res_positions if low_res_positions is None else low_res_positions
        if mode not in POSITION_MODES:
            raise ValueError(f"low_res_positions={mode!r} is unknown. Fix: use one of {POSITION_MODES}")
        for name, value in (("num_inference_steps", num_inference_steps), ("sigmas", sigmas), ("mu", mu)):
            if value is not None:
                raise ValueError(f"{name} is fixed by the schedule ({plan.total_steps} steps in {len(plan.stages)} stages). Fix: leave {name} unset")
        for name, value in (("ip_adapter_image", ip_adapter_image), ("ip_adapter_image_embeds", ip_adapter_image_embeds)):
            if value is not None:
                raise ValueError(f"{name}: IP-Adapter is not supported by RALUStableDiffusion3Pipeline")
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {_OUTPUT_TYPES}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if skip_guidance_layers is not None:
            layers = len(self.transformer.transformer_blocks)
            bad = [index for index in skip_guidance_layers if not 0 <= int(index) < layers]
            if bad:
                raise ValueError(f"skip_guidance_layers {bad} are not block indices of a {layers}-block transformer")
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
        batch_size, num_images_per_prompt, images_total = count_images(prompt, prompt_embeds, num_images_per_prompt, generator)
        channels = self.transformer.config.in_channels
        latent_h, latent_w = 4 * plan.grid[0], 4 * plan.grid[1]
        first_role = plan.stages[0].role
        if latents is not None:
            full_shape = (images_total, channels, latent_h, latent_w)
            half_shape = (images_total, channels, latent_h // 2, latent_w // 2)
            if tuple(latents.shape) != full_shape and (first_role == "full" or tuple(latents.shape) != half_shape):
                raise ValueError(
                    f"latents of shape {tuple(latents.shape)}: expected {full_shape} (full-size noise, as StableDiffusion3Pipeline takes)"
                    + (f" or {half_shape} (the half-size first stage's noise)" if first_role != "full" else "")
                )

        self._guidance_scale = guidance_scale
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        self._num_timesteps = plan.total_steps
        self.stage_index = self.stage_step = None
        self.selected_tokens = None
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
        if latents is None:
            noise = randn_tensor((images_total, channels, latent_h, latent_w), generator=generator, device=device, dtype=dtype)
        with section("noise"):
            if latents is None:
                canvas = initial_canvas(noise.float(), first_role, compat)
            elif latents.shape[-1] == latent_w:
                canvas = initial_canvas(latents.to(device).float(), first_role, compat)
            else:
                canvas = upsample_nearest(latents.to(device).float())

        slg = None
        if skip_guidance_layers is not None and self.do_classifier_free_guidance:
            slg = _SkipLayerGuidance(
                [int(index) for index in skip_guidance_layers],
                skip_layer_guidance_scale,
                skip_layer_guidance_start,
                skip_layer_guidance_stop,
                plan.schedule.calibration.h0,
            )
        model = _SD3StageModel(self, prompt_embeds, pooled_prompt_embeds, cond_embeds, cond_pooled, slg, mode, dtype, device)

        def step_end(info: StepInfo, patches: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
            self.stage_index, self.stage_step = info.stage_index, info.stage_step
            if callback_on_step_end is None:
                return patches
            tensors = {"latents": patches.flatten(2), "prompt_embeds": model.prompt_embeds, "pooled_prompt_embeds": model.pooled}
            callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
            callback_kwargs["stage_index"], callback_kwargs["stage_step"] = info.stage_index, info.stage_step
            outputs = callback_on_step_end(self, info.step, torch.tensor(info.sigma * 1000.0), callback_kwargs) or {}
            model.prompt_embeds = outputs.pop("prompt_embeds", model.prompt_embeds)
            model.pooled = outputs.pop("pooled_prompt_embeds", model.pooled)
            returned = outputs.pop("latents", tensors["latents"])
            if returned.numel() != patches.numel():
                raise ValueError(f"callback_on_step_end returned latents of shape {tuple(returned.shape)}; stage {info.stage_index + 1} carries {tuple(tensors['latents'].shape)}")
            return returned.reshape(patches.shape)

        # 4. The stages.
        with self.progress_bar(total=plan.total_steps) as progress:
            result = run_stages(
                plan,
                canvas,
                model,
                generator=generator,
                compat=compat,
                canny_thresholds=tuple(self.canny_thresholds),
                step_end=step_end,
                progress=progress,
                should_stop=lambda: self.interrupt,
            )
        self.selected_tokens = result.selected

        # 5. Output, as StableDiffusion3Pipeline gives it.
        if output_type == "latent":
            image = result.canvas.to(dtype)
        else:
            image = decode_canvas(self, result.canvas, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusion3PipelineOutput(images=image)


class _SkipLayerGuidance:
    """SD3.5's skip-layer guidance window, placed by noise level (see the class docstring)."""

    def __init__(self, layers: list[int], scale: float, start: float, stop: float, h0: float):
        self.layers, self.scale, self.start, self.stop, self.h0 = layers, scale, start, stop, h0

    def active(self, sigma: float) -> bool:
        fraction = 1.0 - float(unshift_sigma(sigma, self.h0))
        return self.start + _SLG_EPS < fraction < self.stop - _SLG_EPS


class _SD3StageModel:
    """The SD3 side of :func:`ralu.runtime.sampler.run_stages`: positions, classifier-free and
    skip-layer guidance around ``pipe.transformer`` (its forward on native grids, the token
    path of :mod:`ralu.runtime.sd3_tokens` otherwise)."""

    def __init__(self, pipe, prompt_embeds, pooled, cond_embeds, cond_pooled, slg, mode, dtype, device):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.prompt_embeds, self.pooled = prompt_embeds, pooled
        self.cond_embeds, self.cond_pooled = cond_embeds, cond_pooled
        self.slg = slg
        self.mode = mode
        self.dtype, self.device = dtype, device

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
            out = self.transformer_output(model_input, t.expand(model_input.shape[0]), self.prompt_embeds, self.pooled, grid, model_positions, position_embeds=model_position_embeds)
            if not cfg:
                return out
            uncond, cond = out.chunk(2)
            v = uncond + self.pipe.guidance_scale * (cond - uncond)
            if self.slg is not None and self.slg.active(sigma):
                skipped = self.transformer_output(hidden, t.expand(hidden.shape[0]), self.cond_embeds, self.cond_pooled, grid, positions, self.slg.layers, position_embeds)
                v = v + (cond - skipped) * self.slg.scale
            return v

        yield velocity

    def decode_for_edges(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latent = latent / vae.config.scaling_factor + vae.config.shift_factor
        latent = latent.to(device=get_module_execution_device(vae), dtype=vae.dtype)
        return vae.decode(latent, return_dict=False)[0].float()
