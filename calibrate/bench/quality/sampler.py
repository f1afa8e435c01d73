"""Images of every method from the same labels and noise; the peers' staged Euler sampler."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.utils.torch_utils import randn_tensor

from ralu.calibrate.bench.quality.cost import ForwardLog
from ralu.calibrate.bench.quality.methods import Method
from ralu.calibrate.testbed.conditioning import encode_labels
from ralu.calibrate.testbed.evaluate import generate, image_generators
from ralu.calibrate.testbed.model import image_ids, latents_to_images, pack
from ralu.runtime import RALUFluxPipeline
from ralu.runtime.noise import clear_global_noise
from ralu.runtime.tokens import block_sum, upsample_nearest


class TestbedSampler:
    """Generates the images of every method from the same labels and per-image noise.

    Pipelines (baseline, fewer steps, RALU) go through
    :func:`ralu.calibrate.testbed.evaluate.generate`; the staged peers (Bottleneck Sampling,
    naive upsampling) through :meth:`staged`, plain Euler on the same transformer with
    FluxPipeline's conventions (packing, positions, timestep = sigma, guidance input).
    """

    __test__ = False  # not a pytest class

    def __init__(self, pipe, batch_size: int, guidance_scale: float, size: int):
        self.pipe = pipe
        self.size = size
        self.ralu = RALUFluxPipeline.from_pipe(pipe, vae=pipe.vae)
        self.ralu.set_progress_bar_config(disable=True)
        self.batch_size = batch_size
        self.guidance_scale = guidance_scale

    @property
    def transformer(self):
        return self.pipe.transformer

    def generate(self, method: Method, labels, seed: int):
        """Images ``(n, 3, H, W)`` in [-1, 1] and the token counts of every forward (one image)."""

        with ForwardLog(self.transformer) as log:
            if method.kind == "pipeline":
                images = generate(self.pipe, labels, seed=seed, num_inference_steps=method.steps, guidance_scale=self.guidance_scale, batch_size=self.batch_size)
            elif method.kind == "ralu":
                if method.paper_compat:
                    # The published script's correlated draw comes from the global RNG once per
                    # process; seeding it per (method, seed) keeps every run reproducible.
                    clear_global_noise()
                    torch.manual_seed(seed)
                images = generate(self.ralu, labels, seed=seed, num_inference_steps=None, guidance_scale=self.guidance_scale,
                                  batch_size=self.batch_size, schedule=method.schedule, paper_compat=method.paper_compat)
            elif method.kind == "staged":
                images = self.staged(method, labels, seed)
            else:
                raise ValueError(f"unknown method kind {method.kind!r}")
        batches = -(-labels.shape[0] // self.batch_size)
        per_image = log.tokens[: len(log.tokens) // batches]
        return images, per_image

    # -- the harness's own staged Euler sampler ----------------------------------------------

    def _velocity(self, x, sigma: float, cond: dict, guidance):
        b, _, h, w = x.shape
        dtype = self.transformer.dtype
        t = torch.tensor(float(sigma) * 1000.0, dtype=torch.float32)
        v = self.transformer(
            hidden_states=pack(x).to(dtype),
            timestep=(t.expand(b) / 1000.0).to(dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
            img_ids=image_ids(h, w),
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(v, h, w, 1).float()

    # The testbed's conventions, which another testbed's sampler overrides: the per-image
    # noise generators, the label conditioning and the decode to images in [-1, 1].
    def _generators(self, n: int, seed: int):
        return image_generators(n, seed)

    def _condition(self, labels):
        return encode_labels(labels, dtype=self.transformer.dtype)

    def _to_images(self, latent):
        return latents_to_images(latent, self.pipe.vae)

    def _decode(self, latent):
        image = self._to_images(latent)
        return ((image / 2.0 + 0.5).clamp(0.0, 1.0)) * 2.0 - 1.0

    def staged(self, method: Method, labels, seed: int):
        generators = self._generators(labels.shape[0], seed)
        out = []
        for start in range(0, labels.shape[0], self.batch_size):
            chunk = labels[start : start + self.batch_size]
            gens = generators[start : start + chunk.shape[0]]
            cond = self._condition(chunk)
            guidance = None
            if self.transformer.config.guidance_embeds:
                guidance = torch.full([1], self.guidance_scale, dtype=torch.float32).expand(chunk.shape[0])
            with torch.no_grad():
                latent = self._run_stages(method, gens, cond, guidance)
                out.append(self._decode(latent))
        return torch.cat(out)

    def _noise(self, gens, shape):
        """Full-size N(0, I) draw, one per image from its generator (as FluxPipeline draws)."""
        return randn_tensor(tuple(shape), generator=gens, dtype=torch.float32)

    def _run_stages(self, method: Method, gens, cond, guidance):
        channels = self.transformer.config.in_channels // 4
        shape = (len(gens), channels, self.size, self.size)
        x = self._noise(gens, shape)
        role = "full"
        velocity = None
        sigma_now = 1.0
        for index, (stage_role, sigmas) in enumerate(method.stages):
            if index == 0:
                if stage_role == "half":
                    x = block_sum(x) / 2.0  # exactly N(0, I), as RALU's first stage
            else:
                if method.transition == "renoise":
                    x0 = x - sigma_now * velocity
                    if stage_role == "half" and role == "full":
                        x0 = F.avg_pool2d(x0, 2)
                    elif stage_role == "full" and role == "half":
                        x0 = upsample_nearest(x0)
                    eps = self._noise(gens, shape)
                    if stage_role == "half":
                        eps = block_sum(eps) / 2.0
                    restart = float(sigmas[0])
                    x = (1.0 - restart) * x0 + restart * eps
                elif method.transition == "continue":
                    if stage_role == "full" and role == "half":
                        x = upsample_nearest(x)
                    elif stage_role != role:
                        raise ValueError("naive continuation only upsamples")
                else:
                    raise ValueError(f"unknown transition {method.transition!r}")
            role = stage_role
            for i in range(len(sigmas) - 1):
                velocity = self._velocity(x, float(sigmas[i]), cond, guidance)
                x = x + velocity * float(sigmas[i + 1] - sigmas[i])
            sigma_now = float(sigmas[-1])
        return x
