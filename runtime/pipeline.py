"""What the RALU pipelines of every model family share: :class:`RALUPipelineMixin`.

A family's pipeline (:mod:`ralu.runtime.flux`, :mod:`ralu.runtime.sd3`, ...) inherits from this
mixin and from its diffusers base pipeline, encodes the prompt as that base pipeline does and
supplies a stage model (:class:`RALUStageModel`); what it must supply is the protocol of
:mod:`ralu.runtime.family`.  The mixin does the rest of a call: the
plan and the checks every family makes, the initial noise, the stages with the
``callback_on_step_end`` hook and the progress bar, and the output.

A family says how its ``latents`` are laid out (FLUX packs 2x2 patches into tokens, SD3 keeps
the latent image) with :meth:`RALUPipelineMixin.latents_to_canvas` and
:meth:`RALUPipelineMixin.canvas_to_latents`; everything else works on the canvas
``(B, C, H, W)`` of :mod:`ralu.runtime.tokens`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from .cache import check_cache, schedule_cache, stage_cache
from .compat import PaperCompat
from .edges import CANNY_THRESHOLDS
from .models import pixel_size
from .plan import Plan, make_plan
from .profiling import section
from .sampler import Result, StageModel, StepInfo, run_stages
from .schedule import ScheduleError, load_schedule, shipped_schedules
from .tokens import TokenLayout, initial_canvas

#: ``output_type`` values of a call (the diffusers image processor's, and the latent).
OUTPUT_TYPES = ("pil", "np", "pt", "latent")

#: ``stacklevel`` of a call's warnings, so they point at the caller's line: the helper that
#: warns, ``__call__``, torch's ``no_grad`` wrapper, then the caller.
CALLER_STACKLEVEL = 4


def shipped_for(family: str, height: int | None = None, width: int | None = None) -> list[str]:
    """Names of the shipped schedules of ``family`` (and of ``height x width`` where given)."""
    names = []
    for name in shipped_schedules():
        schedule = load_schedule(name)
        if schedule.family != family:
            continue
        if (height is not None and schedule.height != height) or (width is not None and schedule.width != width):
            continue
        names.append(name)
    return names


def missing_schedule_message(family: str, height: int | None, width: int | None) -> str:
    """The error of a call without ``schedule=``: this family's shipped schedules (of the
    asked size, if any) and how to calibrate one for that size."""
    size = f"{height or 'H'}x{width or 'W'}"
    calibrate = f"ralu-calibrate --model {family} --height {height or 'H'} --width {width or 'W'} --speedup S --out FILE.json"
    names = shipped_for(family, height, width)
    if not names:
        return f"a schedule is required, and no shipped {family} schedule is made for {size}. Fix: run `{calibrate}` and pass schedule='FILE.json'"
    return (
        f"a schedule is required. Fix: pass schedule= one of the shipped {family} schedules {names}, a path to a schedule "
        f"JSON file or a Schedule; to make one for {size}, run `{calibrate}` and pass schedule='FILE.json'"
    )


def vae_decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """A latent ``(B, C, h, w)`` through ``vae`` (its scaling and shift undone): images
    ``(B, 3, 8h, 8w)`` in [-1, 1], in the VAE's dtype."""
    latent = latent / vae.config.scaling_factor + vae.config.shift_factor
    latent = latent.to(device=get_module_execution_device(vae), dtype=vae.dtype)
    return vae.decode(latent, return_dict=False)[0]


class RALUStageModel:
    """Base of a family's stage model (:class:`ralu.runtime.sampler.StageModel`): the
    pipeline it serves and the edge decode, which is the same for every family.

    The attributes named in the pipeline's ``_callback_tensor_inputs`` (other than
    ``latents``) are what ``callback_on_step_end`` sees and may replace: a subclass keeps its
    prompt embeddings under those names (``prompt_embeds``, ``pooled_prompt_embeds``).

    ``plan`` is the call's plan (:class:`ralu.runtime.plan.Plan`): a stage model serves one
    call, and :meth:`RALUPipelineMixin.run_ralu_stages` runs it on that plan only."""

    def __init__(self, pipe, plan: Plan, dtype: torch.dtype, device):
        self.pipe = pipe
        self.plan = plan
        self.transformer = pipe.transformer
        self.dtype, self.device = dtype, device

    def decode_for_edges(self, latent: torch.Tensor) -> torch.Tensor:
        return self.pipe.decode_canvas(latent).float()

    def stage_cache(self, stage):
        """Around one stage: the transformer's step cache emptied and given this stage's
        settings (:func:`ralu.runtime.cache.stage_cache`)."""
        first_step = sum(earlier.steps for earlier in self.plan.stages[: stage.index])
        return stage_cache(self.transformer, first_step, stage.steps)

    def forward_each_image(
        self,
        kwargs: dict,
        context: str,
        own: Callable[[int], dict] = lambda b: {},
        around: Callable[[int], AbstractContextManager] = lambda b: nullcontext(),
        shared: tuple[str, ...] = (),
    ) -> torch.Tensor:
        """The transformer's forward once per image of a batch whose images carry different
        token positions, in their own cache contexts (``context:b``), so that a step cache never
        hands one image's residual to another; the outputs stacked again.

        Tensors in ``kwargs`` are cut to image ``b`` (but those named in ``shared``, the same
        for every image); ``own(b)`` adds image ``b``'s own arguments (its position ids) and
        ``around(b)`` is entered around its forward (its rotary table)."""
        outputs = []
        for b in range(kwargs["hidden_states"].shape[0]):
            one = {key: (value[b : b + 1] if isinstance(value, torch.Tensor) and key not in shared else value) for key, value in kwargs.items()}
            with around(b), self.transformer.cache_context(f"{context}:{b}"):
                outputs.append(self.transformer(**one, **own(b))[0])
        return torch.cat(outputs, dim=0)


def check_returned_latents(returned: torch.Tensor, given: torch.Tensor, info: StepInfo) -> None:
    """``callback_on_step_end`` may replace the latents with finite ones of the same shape (a
    stage's token count is fixed by its layout), as a tensor."""
    where = f"at step {info.step} (stage {info.stage_index + 1}/{info.num_stages}, {info.role})"
    if not isinstance(returned, torch.Tensor):
        raise ValueError(f"callback_on_step_end returned latents of type {type(returned).__name__} {where}. Fix: return a torch.Tensor of the shape the callback received")
    if returned is not given and not bool(torch.isfinite(returned).all()):
        raise ValueError(f"callback_on_step_end returned latents with NaN or infinity {where}. Fix: return finite latents")
    if tuple(returned.shape) != tuple(given.shape):
        raise ValueError(
            f"callback_on_step_end returned latents of shape {tuple(returned.shape)} at step {info.step} "
            f"(stage {info.stage_index + 1}/{info.num_stages}, {info.role}); expected {tuple(given.shape)}, "
            "the shape it was given. Fix: return latents of the shape the callback received"
        )


class RALUPipelineMixin:
    """The family-independent part of a RALU pipeline's call.

    A pipeline lists the mixin before its diffusers base class (``class
    RALUFluxPipeline(RALUPipelineMixin, FluxPipeline)``), sets ``family`` (the schedule family
    it runs) and implements the latent-layout methods below.  Its ``__call__`` then reads as
    the algorithm: checks (:meth:`check_ralu_inputs`, the base's ``check_inputs``,
    :meth:`check_latents`), :meth:`begin_call`, text conditioning (the family's own),
    :meth:`prepare_canvas`, :meth:`run_ralu_stages` with the family's stage model, :meth:`finish`.

    What every RALU pipeline promises its caller:

    * ``latents``: only the full-size initial noise the base pipeline takes; RALU derives the
      low-res stage's noise from it.  Half-size noise is refused with a ValueError: it is also
      a valid latent of a smaller image, and ``latents`` keep their base-pipeline meaning.
      ``latents`` fix the initial noise only: the noise injected at each stage change is
      drawn from ``generator``, or from the global RNG without one (then the call warns that
      it is not reproducible).  With ``latents`` and the same ``generator`` seed a run is
      repeated exactly.
    * Without ``schedule=`` the error lists this family's shipped schedules (of the asked
      size) and the ``ralu-calibrate`` command that makes one for that size.
    * ``height`` / ``width`` may be integral floats (``256.0``).
    * ``save_pretrained`` records the diffusers base class as the folder's class, so the
      generic loaders (``DiffusionPipeline``, ``AutoPipelineForText2Image``) read the folder,
      and the RALU class's ``from_pretrained`` too.
    """

    family: str

    #: Canny hysteresis thresholds for the edge score (the paper's 100/200).
    canny_thresholds: tuple[float, float] = CANNY_THRESHOLDS

    #: During a call: the current stage (0-based) and step within it; None before the first step.
    stage_index: int | None = None
    stage_step: int | None = None
    #: After a call: the ``(B, k)`` low-res tokens upsampled early, or None.
    selected_tokens: torch.Tensor | None = None

    # -- saving: folders the generic diffusers loaders can read -------------------------

    @classmethod
    def diffusers_base(cls) -> type:
        """The diffusers pipeline class this RALU pipeline extends (FluxPipeline, ...)."""
        return next(base for base in cls.__mro__ if base.__module__.startswith("diffusers."))

    def to_json_string(self) -> str:
        """The config as diffusers writes it, but naming the diffusers base class as
        ``_class_name``: ``save_pretrained`` folders then load with ``DiffusionPipeline`` and
        the Auto pipelines (they build the base class, which holds the same components), and
        with the RALU class (``from_pretrained`` on a class builds that class)."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = self.diffusers_base().__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    # -- what a family supplies -----------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) latent image."""
        raise NotImplementedError

    def latents_to_canvas(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The family's ``latents`` layout -> a latent image ``(B, C, height, width)``."""
        raise NotImplementedError

    def canvas_to_latents(self, canvas: torch.Tensor) -> torch.Tensor:
        """A latent image ``(B, C, H, W)`` -> the family's ``latents`` layout."""
        raise NotImplementedError

    def decode_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        """A latent image ``(B, C, h, w)`` -> images ``(B, 3, 8h, 8w)`` in [-1, 1]: the final
        decode and the edge decode.  The default undoes the VAE's scaling and shift
        (:func:`vae_decode`); a family whose VAE normalises otherwise overrides it."""
        return vae_decode(self.vae, canvas)

    def latents_shape(self, images: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of the ``latents`` of ``images`` latent images of ``height x width`` pixels."""
        empty = torch.empty(images, self.latent_channels, height, width, device="meta")
        return tuple(self.canvas_to_latents(empty).shape)

    # -- checks (all before any compute) ----------------------------------------------------

    def plan(self, schedule, height: int | None = None, width: int | None = None) -> Plan:
        """Check a request and lay out its stages (no compute), the step cache it would run
        with included (:func:`ralu.runtime.cache.check_cache`).  ``height`` and ``width`` are
        whole pixel counts (an integral float such as 256.0 is taken as 256)."""
        height = None if height is None else pixel_size("height", height)
        width = None if width is None else pixel_size("width", width)
        if schedule is None:
            raise ScheduleError(missing_schedule_message(self.family, height, width))
        schedule = load_schedule(schedule)
        height = schedule.height if height is None else height
        width = schedule.width if width is None else width
        plan = make_plan(schedule, self.family, height, width, self.vae_scale_factor)
        check_cache(self.transformer, [stage.steps for stage in plan.stages], schedule.cache)
        return plan

    def check_ralu_inputs(
        self, schedule, height: int | None, width: int | None, paper_compat, output_type: str, fixed: dict, unsupported: dict
    ) -> tuple[Plan, PaperCompat]:
        """The checks every family makes; returns the call's plan and compat switches.

        Arguments the schedule fixes (``fixed``: name -> value) and features RALU does not
        support (``unsupported``) must be left unset; ``output_type`` must be known."""
        plan = self.plan(schedule, height, width)
        compat = PaperCompat.parse(paper_compat)
        for name, value in fixed.items():
            if value is not None:
                raise ValueError(f"{name} is fixed by the schedule ({plan.total_steps} steps in {len(plan.stages)} stages). Fix: leave {name} unset")
        for name, value in unsupported.items():
            if value is not None:
                raise ValueError(f"{name}: IP-Adapter is not supported by {type(self).__name__}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}")
        return plan, compat

    def check_latents(self, latents: torch.Tensor | None, plan: Plan, images: int, generator=None) -> None:
        """Given ``latents`` must be the full-size initial noise the base pipeline takes (the
        low-res first stage derives its noise from them, 2x2 block sums / 2).  Half-size noise
        is refused for every family: it is a valid latent of another resolution, so taking it
        as stage-1 noise would silently mean something else than in the base pipeline.

        ``latents`` fix only the initial noise: the noise injected at each stage change is
        drawn from ``generator`` (the global RNG without one), so a call with ``latents`` and
        no generator warns that it is not reproducible."""
        if latents is None:
            return
        if not isinstance(latents, torch.Tensor):
            raise ValueError(f"latents of type {type(latents).__name__}: expected a torch.Tensor. Fix: torch.as_tensor(latents), or leave latents unset")
        if latents.device.type == "meta":
            raise ValueError("latents on the meta device hold no values. Fix: pass latents on the CPU or the pipeline's device")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents hold NaN or infinity, which would make NaN images. Fix: pass finite noise, or leave latents unset")
        latent_h, latent_w = 4 * plan.grid[0], 4 * plan.grid[1]
        full = self.latents_shape(images, latent_h, latent_w)
        if tuple(latents.shape) != full:
            base = self.diffusers_base().__name__
            why = ""
            if plan.stages[0].role == "low" and tuple(latents.shape) == self.latents_shape(images, latent_h // 2, latent_w // 2):
                why = " (half-size noise is not accepted: it is the noise of a smaller image)"
            raise ValueError(
                f"latents of shape {tuple(latents.shape)}: expected {full}, the full-size initial noise {base} takes "
                f"for {images} image(s) of {plan.schedule.height}x{plan.schedule.width}{why}. "
                f"Fix: pass full-size noise of shape {full} (RALU derives the low-res stage's noise from it), or leave latents unset"
            )
        if len(plan.stages) > 1 and generator is None:
            warnings.warn(
                "latents= fixes only the initial noise: the noise added at each of the "
                f"{len(plan.stages) - 1} stage change(s) comes from the global RNG when no generator is given, "
                "so this call is not reproducible. Fix: pass generator=torch.Generator().manual_seed(...) as well",
                UserWarning,
                stacklevel=CALLER_STACKLEVEL,
            )

    def warn_ignored_negative(self, negative_given: bool, guidance_on: bool, guidance: str, fix: str, helpers: int = 0) -> None:
        """Warn (as the diffusers pipelines do: never refuse) when a negative prompt is given
        but the ``guidance`` that would use it is off; ``fix`` says how to turn it on.
        ``helpers``: functions between ``__call__`` and this one (the warning names the caller's line)."""
        if negative_given and not guidance_on:
            warnings.warn(
                f"the negative prompt is ignored: {type(self).__name__} uses it only with {guidance}. "
                f"Fix: {fix}, or drop the negative prompt",
                UserWarning,
                stacklevel=CALLER_STACKLEVEL + helpers,
            )

    def begin_call(self, plan: Plan, guidance_scale: float, joint_attention_kwargs: dict | None) -> None:
        """Set the per-call state (after the checks passed)."""
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        self._num_timesteps = plan.total_steps
        self.stage_index = self.stage_step = None
        self.selected_tokens = None

    # -- noise, stages, output --------------------------------------------------------------

    def prepare_canvas(self, plan: Plan, latents: torch.Tensor | None, images: int, generator, device, dtype, compat: PaperCompat) -> torch.Tensor:
        """The first stage's canvas: from the full-size noise the base pipeline draws (from
        the caller's generator, in ``dtype``) or from the given full-size ``latents``."""
        latent_h, latent_w = 4 * plan.grid[0], 4 * plan.grid[1]
        if latents is None:
            noise = randn_tensor((images, self.latent_channels, latent_h, latent_w), generator=generator, device=device, dtype=dtype)
        with section("noise"):
            if latents is None:
                return initial_canvas(noise.float(), plan.stages[0].role, compat)
            return initial_canvas(self.latents_to_canvas(latents.to(device).float(), latent_h, latent_w), plan.stages[0].role, compat)

    def run_ralu_stages(
        self,
        plan: Plan,
        canvas: torch.Tensor,
        model: StageModel,
        generator,
        compat: PaperCompat,
        callback_on_step_end: Callable[..., dict] | None,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> Result:
        """Every stage of ``plan`` under the progress bar, with ``callback_on_step_end`` after
        every step; keeps ``stage_index``, ``stage_step`` and ``selected_tokens``."""

        def step_end(info: StepInfo, patches: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
            self.stage_index, self.stage_step = info.stage_index, info.stage_step
            if callback_on_step_end is None:
                return patches
            latents = patches.flatten(2)
            tensors = {name: latents if name == "latents" else getattr(model, name) for name in self._callback_tensor_inputs}
            callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
            callback_kwargs["stage_index"], callback_kwargs["stage_step"] = info.stage_index, info.stage_step
            outputs = callback_on_step_end(self, info.step, torch.tensor(info.sigma * 1000.0), callback_kwargs) or {}
            if not isinstance(outputs, dict):
                raise ValueError(f"callback_on_step_end returned {type(outputs).__name__}, not a dict. Fix: return callback_kwargs (or a dict of the tensors it replaces)")
            for name in tensors:
                if name != "latents":
                    setattr(model, name, outputs.pop(name, tensors[name]))
            returned = outputs.pop("latents", latents)
            check_returned_latents(returned, latents, info)
            return returned.reshape(patches.shape)

        if getattr(model, "plan", plan) is not plan:
            raise ValueError("the stage model was built for another plan than the one run_ralu_stages runs. Fix: build the stage model with this call's plan")
        with self.progress_bar(total=plan.total_steps) as progress, schedule_cache(self.transformer, plan.schedule.cache):
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
        self._current_timestep = None
        self.selected_tokens = result.selected
        return result

    def finish(self, canvas: torch.Tensor, output_type: str, dtype: torch.dtype, return_dict: bool, output_class):
        """The final canvas as the base pipeline returns it: latents in ``dtype``, or decoded
        images; ``output_class(images=...)`` or a 1-tuple."""
        if output_type == "latent":
            image = self.canvas_to_latents(canvas).to(dtype)
        else:
            image = self.image_processor.postprocess(self.decode_canvas(canvas), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return output_class(images=image)
