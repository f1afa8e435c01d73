"""Train the testbed's rectified-flow FLUX transformer on procedural images.

    python -m ralu.calibrate.testbed.train --out testbed-weights/transformer

Rectified flow in FLUX's convention (sigma = 1 is noise)::

    x_sigma = (1 - sigma) * x0 + sigma * noise,     target velocity v = noise - x0

which is what FluxPipeline's Euler step ``x <- x + v * (sigma_next - sigma)`` integrates
(sigma decreasing, so the step moves towards x0).  The model gets ``timestep = sigma``
(it multiplies by 1000 itself, as in FluxPipeline).

Every step trains on a full-size batch (32 px, 256 tokens) and a half-size batch (16 px,
64 tokens: the same kind of scenes 2x2 average-pooled, at native half-size positions), so
the low-resolution stage of RALU sees images of the kind the model was trained on.
sigma is logit-normal, shifted with the scheduler's own shift at that token count
(exp(mu): 3.158 at 256 tokens, 1.649 at 64), with a quarter of the draws uniform so that
every noise level is covered.  The squared error is weighted per pixel, 1 + 4 on the
shape and its 1-pixel rim (the renderer knows where the shape is): a per-pixel weight does
not move the minimiser (the conditional mean of the velocity, pixel by pixel), it only
spends more of the gradient on the part of the image the conditioning decides.  Conditioning is dropped to the null prompt 10 % of the
time; the (uninformative) guidance input is uniform in [1, 5].  Transformer blocks start as
the identity (adaLN-zero), matmuls run in bfloat16 autocast, weights and an EMA stay in
float32; the EMA weights are saved (diffusers format, safetensors) with a
``training.json`` holding the exact command line, arguments, versions and wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import conditioning, data
from . import model as tb
from .location import REPOSITORY_FOLDER, TRANSFORMER

#: Relative to the working directory: the repository's folder when run from its root.
DEFAULT_OUT = Path(REPOSITORY_FOLDER) / TRANSFORMER


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sample_sigmas(n: int, tokens: int, generator: torch.Generator, uniform_fraction: float = 0.25) -> torch.Tensor:
    logit_normal = torch.sigmoid(torch.randn(n, generator=generator))
    shifted = shift_sigmas(logit_normal, tb.scheduler_shift(tokens))
    uniform = torch.rand(n, generator=generator)
    pick = torch.rand(n, generator=generator) < uniform_fraction
    return torch.where(pick, uniform, shifted).clamp(1e-4, 1.0)


def adaln_zero(transformer: torch.nn.Module) -> None:
    """DiT's adaLN-zero: every block starts as the identity and the output as zero."""
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and (name.endswith("norm1.linear") or name.endswith("norm1_context.linear") or name.endswith("norm.linear")):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    torch.nn.init.zeros_(transformer.norm_out.linear.weight)
    torch.nn.init.zeros_(transformer.norm_out.linear.bias)
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)


def step_seed(seed: int, step: int, part: int) -> int:
    """Data seed of one training batch (disjoint from small evaluation seeds)."""
    return 1_000_000_007 * (seed + 1) + 4 * step + part


def training_batch(seed: int, step: int, n: int, half: bool, generator: torch.Generator, drop: float, shape_weight: float):
    """Latents (unpacked, normalised), per-pixel loss weights, and conditioning of one batch."""
    images, labels, geometry = data.make_batch(step_seed(seed, step, int(half)), n, data.IMAGE_SIZE, return_geometry=True)
    near_shape = F.max_pool2d(geometry.mask[:, None].float(), 3, stride=1, padding=1)  # the shape and its edge
    weights = (1.0 + shape_weight * near_shape).expand(-1, 3, -1, -1)
    if half:
        images, weights = data.downsample(images), data.downsample(weights)
    cond = conditioning.encode_labels(labels)
    null = conditioning.null_embeds(n)
    keep = torch.rand(n, generator=generator) >= drop
    cond = {key: torch.where(keep.view(-1, *[1] * (value.ndim - 1)), value, null[key]) for key, value in cond.items()}
    return tb.images_to_latents(images), weights, cond


def flow_loss(transformer, latents, weights, cond, generator, autocast: bool, txt_ids) -> torch.Tensor:
    b, _, h, w = latents.shape
    tokens = (h // 2) * (w // 2)
    sigma = sample_sigmas(b, tokens, generator)
    noise = torch.randn(latents.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    target = tb.pack(noise - latents)
    guidance = tb.GUIDANCE_RANGE[0] + (tb.GUIDANCE_RANGE[1] - tb.GUIDANCE_RANGE[0]) * torch.rand(b, generator=generator)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        prediction = transformer(
            hidden_states=tb.pack(noisy),
            timestep=sigma,
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=txt_ids,
            img_ids=tb.image_ids(h, w),
            return_dict=False,
        )[0]
    weights = tb.pack(weights)
    return (weights * (prediction.float() - target).pow(2)).sum() / weights.sum()


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def save(ema: torch.nn.Module, out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ralu.calibrate.testbed.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (diffusers format + training.json)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64, help="full-size (32 px) images per step")
    parser.add_argument("--half-batch", type=int, default=64, help="half-size (16 px) images per step")
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--drop", type=float, default=0.1, help="fraction of conditioning replaced by the null prompt")
    parser.add_argument("--shape-weight", type=float, default=4.0, help="extra loss weight on the shape's pixels and their edge (1 + w)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="no bfloat16 autocast")
    parser.add_argument("--save-every", type=int, default=250, help="also save the EMA weights every N steps")
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    transformer = tb.build_transformer(args.seed)
    adaln_zero(transformer)
    transformer.train()
    ema = tb.build_transformer(args.seed)
    ema.load_state_dict(transformer.state_dict())
    ema.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    txt_ids = torch.zeros(conditioning.TEXT_TOKENS, 3)
    params = sum(p.numel() for p in transformer.parameters())
    command = "python -m ralu.calibrate.testbed.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"{command}\ntransformer: {params / 1e6:.2f}M parameters; {args.steps} steps of {args.batch} x 32 px + {args.half_batch} x 16 px", flush=True)

    def record(step: int, elapsed: float, losses: dict) -> dict:
        return {
            "command": command,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "steps_done": step,
            "wall_seconds": round(elapsed, 1),
            # CPU time of this process: / threads estimates the wall time on idle cores
            # (the wall time above includes waiting for other processes on a shared machine).
            "cpu_seconds": round(time.process_time() - cpu_start, 1),
            "final_losses": losses,
            "parameters": params,
            "transformer_config": tb.TRANSFORMER_CONFIG,
            "scheduler_config": tb.SCHEDULER_CONFIG,
            "pixel_vae": {"scaling_factor": tb.PIXEL_SCALE, "shift_factor": tb.PIXEL_SHIFT},
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
            "machine": {"platform": platform.platform(), "threads": args.threads},
            "weights": "EMA",
        }

    start, cpu_start = time.time(), time.process_time()
    running = {"full": 0.0, "half": 0.0}
    count = 0
    losses = {}
    for step in range(args.steps):
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = torch.zeros(())
        for half, n in ((False, args.batch), (True, args.half_batch)):
            if n <= 0:
                continue
            latents, weights, cond = training_batch(args.seed, step, n, half, generator, args.drop, args.shape_weight)
            part = flow_loss(transformer, latents, weights, cond, generator, not args.fp32, txt_ids)
            running["half" if half else "full"] += part.item()
            loss = loss + part
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        decay = min(args.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), transformer.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        count += 1
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = time.time() - start
            losses = {k: round(v / count, 5) for k, v in running.items()}
            eta = elapsed / done * (args.steps - done)
            cpu = (time.process_time() - cpu_start) / 60
            print(
                f"step {done}/{args.steps} loss full {losses['full']:.4f} half {losses['half']:.4f} lr {lr:.2e} "
                f"{elapsed / 60:.1f} min (cpu {cpu:.1f} min, eta {eta / 60:.1f} min)",
                flush=True,
            )
            running = {"full": 0.0, "half": 0.0}
            count = 0
        if done % args.save_every == 0 and done != args.steps:
            save(ema, args.out, record(done, time.time() - start, losses))
    elapsed = time.time() - start
    save(ema, args.out, record(args.steps, elapsed, losses))
    print(f"saved EMA weights to {args.out} after {elapsed / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
