"""The peers' staged Euler sampler (Bottleneck Sampling, naive upsampling): plain Euler on a
FLUX transformer with FluxPipeline's conventions (packing, positions, timestep = sigma,
guidance input), stages at full or half size joined by re-noising or by continuing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.utils.torch_utils import randn_tensor

from ralu.runtime.tokens import block_sum, upsample_nearest
from ralu_lab.bench.quality.methods import Method


class StagedSampler:
    """Images of a ``"staged"`` :class:`~ralu_lab.bench.quality.methods.Method` from
    per-image noise (:meth:`staged`).  A subclass sets ``pipe``, ``size`` (the full-size
    latent side), ``batch_size`` and ``guidance_scale`` and gives the testbed's noise
    generators, conditioning and decoder (testbed v2:
    :class:`ralu_lab.bench.quality.v2.sampler.V2Sampler`)."""

    __test__ = False  # not a pytest class

    @property
    def transformer(self):
        return self.pipe.transformer

    # -- the harness's own staged Euler sampler ----------------------------------------------

    def _velocity(self, x, sigma: float, cond: dict, guidance):
        b, _, h, w = x.shape
        dtype = self.transformer.dtype
        t = torch.tensor(float(sigma) * 1000.0, dtype=torch.float32)
        v = self.transformer(
            hidden_states=FluxPipeline._pack_latents(x, b, x.shape[1], h, w).to(dtype),
            timestep=(t.expand(b) / 1000.0).to(dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, None, torch.float32),
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(v, h, w, 1).float()

    # The testbed's conventions, which a subclass gives: the per-image noise generators, the
    # label conditioning and the decode of a latent to images.
    def _generators(self, n: int, seed: int):
        raise NotImplementedError

    def _condition(self, labels):
        raise NotImplementedError

    def _to_images(self, latent):
        raise NotImplementedError

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
