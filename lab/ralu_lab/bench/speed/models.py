"""The models and pipelines measured: random-weight transformers and VAEs, plain and RALU pipelines."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ralu import runtime as ralu_runtime
from ralu.runtime import load_schedule
from ralu.runtime.schedule import Schedule
from ralu_lab.bench.speed.config import BenchConfig, FamilyConfig


@dataclass
class FamilyRun:
    """Everything one family's measurements need."""

    config: FamilyConfig
    base: Any
    ralu: Any
    inputs: dict
    #: (name, schedule at the benchmark size, shipped schedule) per schedule of this family.
    schedules: list = field(default_factory=list)
    #: Arguments only the base pipeline takes (FluxKontextPipeline's ``max_area``: the output size).
    base_inputs: dict = field(default_factory=dict)


def torch_dtype(name: str):
    return getattr(torch, name)


def fill_silent_parameters(module, std: float = 0.02) -> None:
    """Random init leaves some layers (adaLN, output projections) exactly zero: give them
    values so the sampled latents, and hence the edge maps, carry signal."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.numel() and not bool(parameter.any()):
                parameter.normal_(0.0, std)


def build_transformer(family: FamilyConfig, device=None, dtype=None):
    """The benchmarked transformer (random weights; ``device`` None or meta: on the meta
    device), built directly in ``dtype`` (default float32) so that a real-size model never
    needs its float32 copy on the device."""
    cls = getattr(diffusers, family.transformer_class or family.adapter.transformer_class)
    if device is None or torch.device(device).type == "meta":
        with torch.device("meta"):
            return cls(**family.transformer)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device):
            model = cls(**family.transformer)
    finally:
        torch.set_default_dtype(previous)
    fill_silent_parameters(model)
    return model.eval()


def build_vae(config: BenchConfig, family: str, device=None):
    """The benchmarked VAE of ``family`` (its class and constructor arguments, latent scaling
    included: :func:`.config.family_vae`)."""
    spec = config.family(family)
    with torch.device(device or "meta"):
        vae = getattr(diffusers, spec.vae_class)(**spec.vae)
    return vae.eval()


def vae_latent(family: FamilyConfig, latent):
    """A ``(B, C, h, w)`` latent as the family's VAE decodes it (Qwen-Image's 3-D VAE: one frame)."""
    return latent[:, :, None] if family.vae_class == "AutoencoderKLQwenImage" else latent


def base_pipeline(family: FamilyConfig, scheduler, vae, transformer):
    """The family's diffusers pipeline without text encoders (the calls pass prompt embeddings):
    every other required component None."""
    cls = getattr(diffusers, family.base_pipeline or family.adapter.base_pipeline)
    parameters = inspect.signature(cls.__init__).parameters
    given = {"scheduler": scheduler, "vae": vae, "transformer": transformer, **family.adapter.base_kwargs}
    absent = {name: None for name, p in parameters.items() if name not in given and name != "self" and p.default is inspect.Parameter.empty}
    return cls(**given, **absent)


def prompt_inputs(family: FamilyConfig, embeds, device, dtype) -> dict:
    """The prompt tensors of one call (and of the negative branch when the baseline runs CFG)."""
    bench = family.adapter
    inputs = {}
    for prefix in ("", "negative_") if family.cfg else ("",):
        inputs[f"{prefix}prompt_embeds"] = embeds(1, family.text_tokens, family.text_dim)
        if bench.pooled:
            inputs[f"{prefix}pooled_prompt_embeds"] = embeds(1, family.pooled_dim)
        if bench.mask:
            # Every text token valid: the mask's cost does not depend on its values.
            mask_dtype = dtype if bench.mask_dtype == "float" else getattr(torch, bench.mask_dtype)
            inputs[f"{prefix}{bench.mask}"] = torch.ones(1, family.text_tokens, device=device, dtype=mask_dtype)
    return inputs


def rescaled(schedule, size: int):
    """The schedule at ``size x size`` (``--quick``: same stages, smaller image)."""
    if (schedule.height, schedule.width) == (size, size):
        return schedule
    return Schedule.model_validate({**schedule.model_dump(), "height": size, "width": size})


def one_step_per_stage(schedule):
    """The same stages with one step each: the shapes and code path of the schedule (warm-up,
    memory) at a fraction of the cost."""
    data = schedule.model_dump()
    for stage in data["stages"]:
        stage["steps"] = 1
    return Schedule.model_validate(data)


def build_family(config: BenchConfig, family: FamilyConfig) -> FamilyRun:
    device, dtype = torch.device(config.device), torch_dtype(config.dtype)
    torch.manual_seed(config.seed)
    transformer = build_transformer(family, device, dtype)
    torch.manual_seed(config.seed + 1)
    vae = build_vae(config, family.family, device)
    if dtype != torch.float32:
        transformer, vae = transformer.to(dtype), vae.to(dtype)
    generator = torch.Generator("cpu").manual_seed(config.seed + 2)

    def embeds(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    scheduler = FlowMatchEulerDiscreteScheduler(**family.spec.scheduler.config())
    base = base_pipeline(family, scheduler, vae, transformer)
    ralu = getattr(ralu_runtime, family.ralu_pipeline or family.adapter.ralu_pipeline).from_pipe(base, dtype=dtype)  # from_pipe casts to float32 unless told
    inputs = prompt_inputs(family, embeds, device, dtype)
    base_inputs = {}
    if family.reference_tokens:
        # The reference image as latents (both pipelines take them as they are): the same
        # reference in every call, no encode in either.
        side = config.size // family.spec.vae_scale_factor
        inputs["image"] = embeds(1, family.spec.latent_channels, side, side)
        base_inputs["max_area"] = config.size * config.size  # FluxKontextPipeline keeps height x width with it
    for pipe in (base, ralu):
        pipe.set_progress_bar_config(disable=True)
    if family.guidance_scale is not None:
        inputs["guidance_scale"] = family.guidance_scale
    if family.true_cfg_scale is not None:
        inputs["true_cfg_scale"] = family.true_cfg_scale
    inputs.update(height=config.size, width=config.size, output_type=config.output_type)
    run = FamilyRun(family, base, ralu, inputs, base_inputs=base_inputs)
    for name in config.schedules:
        shipped = load_schedule(name)
        if shipped.family == family.family:
            run.schedules.append((name, rescaled(shipped, config.size), shipped))
    return run


def seeded_generator(config: BenchConfig):
    return torch.Generator(config.device).manual_seed(config.seed)


def call_baseline(config: BenchConfig, run: FamilyRun, steps: int):
    return run.base(**run.inputs, **run.base_inputs, num_inference_steps=steps, generator=seeded_generator(config)).images


def call_ralu(config: BenchConfig, run: FamilyRun, schedule):
    return run.ralu(**run.inputs, schedule=schedule, generator=seeded_generator(config)).images
