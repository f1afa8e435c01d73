"""Train a testbed v2 generator (FLUX or SD3 architecture) on the autoencoder's latents.

    python -m ralu_lab.testbed.v2.train_generator --arch flux --out lab/testbed-weights/v2/flux
    python -m ralu_lab.testbed.v2.train_generator --arch sd3 --out lab/testbed-weights/v2/sd3

Rectified flow in the diffusers convention (sigma = 1 is noise): ``x = (1 - sigma) x0 +
sigma noise`` with target velocity ``noise - x0``, what both pipelines' Euler steps
integrate.  ``x0`` is the normalised latent of a scene (``(mode - shift_factor) *
scaling_factor`` of the frozen autoencoder, :func:`ralu_lab.testbed.v2.model.images_to_latents`).

Every step trains on a full-size batch (64 px scenes: 32 x 32 latents, 256 tokens) and a
half-size batch (the scenes 2x2 average-pooled to 32 px and encoded: 16 x 16 latents, 64
tokens), so RALU's low-resolution stage sees latents of the kind the model knows, as the
real models are trained at several resolutions.  sigma is logit-normal shifted with the
scheduler's shift at that token count (FLUX: exp(mu), 3.158 at 256 tokens, 1.649 at 64;
SD3: 3 at both), with a quarter of the draws uniform.  Conditioning is replaced by the empty
prompt 10 % of the time (classifier-free guidance); FLUX's guidance input is uniform in
[1, 5] and carries no information.  Blocks start as the identity (adaLN-zero); an EMA of
the weights is what is saved (diffusers format, safetensors), with ``training.json``.

``--device cuda`` runs the networks on a GPU with the same recipe: scenes, noise levels,
noise and dropout are drawn on the CPU in the CPU run's order and moved, and the next step's
scenes are rendered on a thread while the GPU trains.  A checkpoint may change device (and
folder) on ``--resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from . import conditioning, data, training
from . import model as tb
from .location import AUTOENCODER, FLUX, SD3, default_out

PROG = "ralu_lab.testbed.v2.train_generator"


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def token_shift(arch: str, tokens: int) -> float:
    """The scheduler's shift at ``tokens`` image tokens (what sampling at that size uses)."""
    if arch == "sd3":
        return tb.SD3_SCHEDULER_CONFIG["shift"]
    c = tb.FLUX_SCHEDULER_CONFIG
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return math.exp(c["base_shift"] + slope * (tokens - c["base_image_seq_len"]))


def sample_sigmas(n: int, shift: float, generator: torch.Generator, uniform_fraction: float = 0.25) -> torch.Tensor:
    shifted = shift_sigmas(torch.sigmoid(torch.randn(n, generator=generator)), shift)
    uniform = torch.rand(n, generator=generator)
    pick = torch.rand(n, generator=generator) < uniform_fraction
    return torch.where(pick, uniform, shifted).clamp(1e-4, 1.0)


def adaln_zero(transformer: torch.nn.Module) -> None:
    """DiT's adaLN-zero for both architectures: modulations and the output start at zero."""
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "proj_out")):
            torch.nn.init.zeros_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def velocity(arch: str, transformer, noisy: torch.Tensor, sigma: torch.Tensor, cond: dict, generator: torch.Generator) -> torch.Tensor:
    """The model's velocity for unpacked latents ``(B, C, H, W)``, as its pipeline calls it."""
    b, c, h, w = noisy.shape
    if arch == "sd3":
        return transformer(
            hidden_states=noisy, timestep=sigma * 1000.0, encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"], return_dict=False,
        )[0]
    from diffusers import FluxPipeline

    low, high = tb.FLUX_GUIDANCE_RANGE
    guidance = (low + (high - low) * torch.rand(b, generator=generator)).to(noisy.device)
    out = transformer(
        hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
        timestep=sigma,  # FLUX multiplies by 1000 itself
        guidance=guidance,
        pooled_projections=cond["pooled_prompt_embeds"],
        encoder_hidden_states=cond["prompt_embeds"],
        txt_ids=torch.zeros(conditioning.TEXT_TOKENS, 3, device=noisy.device),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, torch.float32),
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, h * tb.VAE_SCALE_FACTOR, w * tb.VAE_SCALE_FACTOR, tb.VAE_SCALE_FACTOR)


def flow_loss(arch: str, transformer, latents: torch.Tensor, cond: dict, generator: torch.Generator, autocast: bool, shift: float | None = None) -> torch.Tensor:
    """Mean squared velocity error on ``latents`` (on the model's device); noise levels and
    noise are drawn on the CPU from ``generator`` and moved, so every device draws the same."""
    b, _, h, w = latents.shape
    shift = token_shift(arch, (h // 2) * (w // 2)) if shift is None else shift
    sigma = sample_sigmas(b, shift, generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    context = torch.autocast(latents.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        prediction = velocity(arch, transformer, noisy, sigma, cond, generator)
    return (prediction.float() - (noise - latents)).pow(2).mean()


def step_scenes(seed: int, step: int, sizes: tuple[int, int]) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """The scenes of one step: ``(images, labels)`` of the full-size batch and of the
    half-size batch (rendered at 64 px, pooled to 32 px), ``(None, None)`` for an empty one."""
    out = []
    for part, n in enumerate(sizes):
        if n <= 0:
            out.append((None, None))
            continue
        images, labels = data.make_batch(training.step_seed(seed, step, part), n)
        out.append((data.downsample(images) if part else images, labels))
    return out


class SceneStream:
    """:func:`step_scenes` of consecutive steps.  With ``prefetch`` the next step's scenes
    are rendered on a CPU thread while the device trains on this one (on a GPU the rendering
    would otherwise be most of the step); they depend on the step alone, so the stream is
    the same either way."""

    def __init__(self, seed: int, sizes: tuple[int, int], prefetch: bool):
        self.seed, self.sizes = seed, sizes
        self.pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
        self.pending: dict[int, Future] = {}

    def take(self, step: int):
        if self.pool is None:
            return step_scenes(self.seed, step, self.sizes)
        future = self.pending.pop(step, None) or self.pool.submit(step_scenes, self.seed, step, self.sizes)
        self.pending = {step + 1: self.pool.submit(step_scenes, self.seed, step + 1, self.sizes)}
        return future.result()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=tb.ARCHITECTURES, required=True)
    training.add_common_arguments(p, None, steps=3000, lr=6e-4, warmup=100)
    p.add_argument("--autoencoder", default=None, help="the trained autoencoder's folder (default: the repository's)")
    p.add_argument("--batch", type=training.positive_int, default=48, help="full-size scenes per step")
    p.add_argument("--half-batch", type=training.non_negative_int, default=48, help="half-size scenes per step")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--drop", type=float, default=0.1, help="fraction of conditioning replaced by the empty prompt")
    p.add_argument(
        "--sigma-shift", type=float, default=None,
        help="shift of the logit-normal noise levels (default: the scheduler's at each size; 1 spends more of the training on low noise, where fine structure is drawn)",
    )
    p.add_argument("--fp32", action="store_true", help="no bfloat16 autocast")
    p.add_argument(
        "--device", default="cpu",
        help="where the networks run (cpu, cuda). Data and random numbers stay on the CPU, so a GPU run follows the same recipe as the CPU command",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.out is None:
        args.out = default_out(FLUX if args.arch == "flux" else SD3)
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise training.TrainingError(f"--device {args.device} cannot be used here ({str(error).splitlines()[0]}). Fix: pass --device cpu") from None
    try:
        autoencoder = tb.load_autoencoder(args.autoencoder, device).requires_grad_(False)
    except FileNotFoundError as error:
        raise training.TrainingError(str(error)) from None
    generator = torch.Generator().manual_seed(args.seed)
    # Built on the CPU (the same initial weights everywhere), then moved.
    transformer = tb.build_transformer(args.arch, args.seed)
    adaln_zero(transformer)
    transformer.to(device).train()
    ema = tb.build_transformer(args.arch, args.seed).to(device)
    ema.load_state_dict(transformer.state_dict())
    ema.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    state = training.TrainState(transformer, optimizer, generator, ema=ema)

    scenes = SceneStream(args.seed, (args.batch, args.half_batch), prefetch=device.type != "cpu")

    def step(s: int) -> dict[str, float]:
        loss, logged = torch.zeros((), device=device), {}
        for part, (images, labels) in enumerate(scenes.take(s)):
            if images is None:
                continue
            n = labels.shape[0]
            with torch.no_grad():
                latents = tb.images_to_latents(autoencoder, images.to(device))
            keep = torch.rand(n, generator=generator) >= args.drop
            cond = conditioning.drop_conditioning(conditioning.encode_labels(labels), keep)
            cond = {key: value.to(device) for key, value in cond.items()}
            part_loss = flow_loss(args.arch, transformer, latents, cond, generator, not args.fp32, args.sigma_shift)
            logged["half" if part else "full"] = part_loss.item()
            loss = loss + part_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        training.update_ema(ema, transformer, s, args.ema_decay)
        return logged

    config = tb.FLUX_CONFIG if args.arch == "flux" else tb.SD3_CONFIG
    extra = {
        "arch": args.arch,
        "transformer_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "scheduler_config": tb.FLUX_SCHEDULER_CONFIG if args.arch == "flux" else tb.SD3_SCHEDULER_CONFIG,
        "autoencoder": args.autoencoder or f"{default_out(AUTOENCODER)} (repository)",
        "latent_statistics": {"scaling_factor": autoencoder.config.scaling_factor, "shift_factor": autoencoder.config.shift_factor},
    }

    def save(out):
        out.mkdir(parents=True, exist_ok=True)
        ema.save_pretrained(out, safe_serialization=True)

    return training.run(args, state, step, save, training.command_line(PROG, argv), extra, f"{args.arch} generator")


if __name__ == "__main__":
    raise SystemExit(training.main_guard(main))
