"""The models and pipelines measured: random-weight transformers and VAEs, plain and RALU pipelines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
)

from ralu.calibrate.bench.speed.config import BenchConfig, FamilyConfig, latent_scaling
from ralu.runtime import RALUFluxPipeline, RALUStableDiffusion3Pipeline, load_schedule
from ralu.runtime.schedule import Schedule


@dataclass
class FamilyRun:
    """Everything one family's measurements need."""

    config: FamilyConfig
    base: Any
    ralu: Any
    inputs: dict
    #: (name, schedule at the benchmark size, shipped schedule) per schedule of this family.
    schedules: list = field(default_factory=list)


def torch_dtype(name: str):
    return getattr(torch, name)


def fill_silent_parameters(module, std: float = 0.02) -> None:
    """Random init leaves some layers (adaLN, output projections) exactly zero: give them
    values so the sampled latents, and hence the edge maps, carry signal."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.numel() and not bool(parameter.any()):
                parameter.normal_(0.0, std)


def build_transformer(family: FamilyConfig, device=None):
    cls = diffusers.FluxTransformer2DModel if family.family == "flux" else diffusers.SD3Transformer2DModel
    if device is None or torch.device(device).type == "meta":
        with torch.device("meta"):
            return cls(**family.transformer)
    with torch.device(device):
        model = cls(**family.transformer)
    fill_silent_parameters(model)
    return model.eval()


def build_vae(config: BenchConfig, family: str, device=None):
    """The benchmarked VAE with the latent scaling of ``family``'s real model."""
    with torch.device(device or "meta"):
        vae = AutoencoderKL(**{**config.vae, **latent_scaling(config.family(family).model)})
    return vae.eval()


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
    transformer = build_transformer(family, device)
    torch.manual_seed(config.seed + 1)
    vae = build_vae(config, family.family, device)
    if dtype != torch.float32:
        transformer, vae = transformer.to(dtype), vae.to(dtype)
    generator = torch.Generator("cpu").manual_seed(config.seed + 2)

    def embeds(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    scheduler = FlowMatchEulerDiscreteScheduler(**family.spec.scheduler.config())
    if family.family == "flux":
        base = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
        ralu = RALUFluxPipeline.from_pipe(base, dtype=dtype)  # from_pipe casts to float32 unless told
        inputs = dict(prompt_embeds=embeds(1, family.text_tokens, family.text_dim), pooled_prompt_embeds=embeds(1, family.pooled_dim))
    else:
        base = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        )
        ralu = RALUStableDiffusion3Pipeline.from_pipe(base, dtype=dtype)  # from_pipe casts to float32 unless told
        inputs = dict(
            prompt_embeds=embeds(1, family.text_tokens, family.text_dim), pooled_prompt_embeds=embeds(1, family.pooled_dim),
            negative_prompt_embeds=embeds(1, family.text_tokens, family.text_dim), negative_pooled_prompt_embeds=embeds(1, family.pooled_dim),
        )
    for pipe in (base, ralu):
        pipe.set_progress_bar_config(disable=True)
    inputs.update(guidance_scale=family.guidance_scale, height=config.size, width=config.size, output_type=config.output_type)
    run = FamilyRun(family, base, ralu, inputs)
    for name in config.schedules:
        shipped = load_schedule(name)
        if shipped.family == family.family:
            run.schedules.append((name, rescaled(shipped, config.size), shipped))
    return run


def seeded_generator(config: BenchConfig):
    return torch.Generator(config.device).manual_seed(config.seed)


def call_baseline(config: BenchConfig, run: FamilyRun, steps: int):
    return run.base(**run.inputs, num_inference_steps=steps, generator=seeded_generator(config)).images


def call_ralu(config: BenchConfig, run: FamilyRun, schedule):
    return run.ralu(**run.inputs, schedule=schedule, generator=seeded_generator(config)).images
