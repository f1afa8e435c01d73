"""Train testbed v2's autoencoder (``diffusers.AutoencoderKL``, factor 2, 4 latent channels).

    python -m ralu_lab.testbed.v2.train_autoencoder --out lab/testbed-weights/v2/autoencoder

Every step reconstructs a batch of 64 px scenes and a batch of 32 px ones (the same kind
of scenes 2x2 average-pooled: the half-size images the generators' low-resolution training
and RALU's edge decode go through).  Loss: L1 in pixels, plus a spectral term (L1 between
the log magnitudes of the images' 2-D FFTs) that keeps the fine periodic structure a pure
pixel loss would blur, plus SD's tiny KL weight (1e-6) so the posterior stays a sensible
Gaussian.  The latent is sampled from the posterior (the caller's generator) in training.

At the end the command measures ``scaling_factor`` and ``shift_factor`` on 1024 fresh
scenes (:func:`ralu_lab.testbed.v2.model.latent_statistics`: the latent's mean and
1 / standard deviation), writes them into the autoencoder's config, saves it in diffusers
format and records PSNR of reconstructions of fresh scenes in ``training.json``.
"""

from __future__ import annotations

import argparse

import torch

from . import data, training
from . import model as tb
from .location import AUTOENCODER, default_out

PROG = "ralu_lab.testbed.v2.train_autoencoder"


def spectral_l1(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L1 between ``log(1 + |FFT|)`` of two image batches (per channel)."""
    a = torch.fft.rfft2(reconstruction.float(), norm="ortho").abs()
    b = torch.fft.rfft2(images.float(), norm="ortho").abs()
    return (torch.log1p(a) - torch.log1p(b)).abs().mean()


def reconstruction_loss(autoencoder, images: torch.Tensor, generator: torch.Generator, spectral_weight: float, kl_weight: float) -> tuple[torch.Tensor, dict]:
    posterior = autoencoder.encode(images).latent_dist
    latent = posterior.sample(generator=generator)
    reconstruction = autoencoder.decode(latent).sample
    l1 = (reconstruction - images).abs().mean()
    spectral = spectral_l1(reconstruction, images)
    kl = posterior.kl().mean() / images[0].numel()
    loss = l1 + spectral_weight * spectral + kl_weight * kl
    return loss, {"l1": l1.item(), "spectral": spectral.item()}


@torch.no_grad()
def reconstruction_psnr(autoencoder, n: int = 256, seed: int = 5_000_000_003) -> dict[str, float]:
    """Mean PSNR (dB, images in [0, 1]) of posterior-mode reconstructions of fresh scenes,
    at full and half size."""
    images, _ = data.make_batch(seed, n)
    out = {}
    for name, x in (("psnr_64px", images), ("psnr_32px", data.downsample(images))):
        y = autoencoder.decode(tb.encode_mode(autoencoder, x)).sample.clamp(-1, 1)
        mse = ((y - x) / 2).pow(2).flatten(1).mean(1)
        out[name] = round((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item(), 2)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    training.add_common_arguments(p, default_out(AUTOENCODER), steps=6000, lr=1e-3, warmup=100)
    p.add_argument("--batch", type=training.positive_int, default=32, help="64 px scenes per step")
    p.add_argument("--half-batch", type=training.non_negative_int, default=32, help="32 px scenes per step")
    p.add_argument("--spectral-weight", type=float, default=0.1)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--stats-n", type=training.positive_int, default=1024, help="scenes for scaling_factor / shift_factor")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    command = training.command_line(PROG, argv)
    autoencoder = tb.build_autoencoder(args.seed).train()
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    state = training.TrainState(autoencoder, optimizer, torch.Generator().manual_seed(args.seed))

    def step(s: int) -> dict[str, float]:
        loss = torch.zeros(())
        logged = {}
        for part, n in enumerate((args.batch, args.half_batch)):
            if n <= 0:
                continue
            images, _ = data.make_batch(training.step_seed(args.seed, s, part), n)
            if part:
                images = data.downsample(images)
            part_loss, values = reconstruction_loss(autoencoder, images, state.generator, args.spectral_weight, args.kl_weight)
            loss = loss + part_loss
            logged.update({f"{k}_{'32' if part else '64'}": v for k, v in values.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), 1.0)
        optimizer.step()
        return logged

    extra: dict = {"autoencoder_config": {k: list(v) if isinstance(v, tuple) else v for k, v in tb.AUTOENCODER_CONFIG.items()}}

    def save(out):
        autoencoder.eval()
        stats = tb.latent_statistics(autoencoder, n=args.stats_n)
        autoencoder.register_to_config(**stats)
        extra.update(latent_statistics=stats, reconstruction=reconstruction_psnr(autoencoder, n=min(256, args.stats_n)))
        print(f"latent statistics {stats}; reconstruction {extra['reconstruction']}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        autoencoder.save_pretrained(out, safe_serialization=True)

    return training.run(args, state, step, save, command, extra, "autoencoder")


if __name__ == "__main__":
    raise SystemExit(training.main_guard(main))
