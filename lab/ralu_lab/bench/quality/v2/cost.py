"""What a v2 row costs: transformer FLOPs at the token counts really run, the decoder's FLOPs
at the latent sizes really decoded, and the linear FLOPs a cached run really executes.

Conventions (the report states them):

* **total**: per image, every transformer forward priced by ``count_flops`` on the meta device
  at its image-token count (batch 1; a forward over a batch of B rows costs B times that, so
  SD3's classifier-free guidance, both branches in one batch, costs twice per step), plus
  every decode priced the same way at its latent size (the final 64 px decode, and RALU's
  edge-selection decode of the half-size latent at 32 px).
* **linear**: the multiply-adds of the ``nn.Linear`` layers that really execute (forward
  hooks, ``ralu_lab.bench.cache.run.executed_linear_flops``: a cache's skipped blocks are
  not counted), plus the decodes' linear and convolution FLOPs.  Cached rows have only this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

from ralu.calibrate.flops.counting import count_flops, fit_quadratic
from ralu.calibrate.flops.pricing import Flops
from ralu_lab.bench.cache.run import executed_linear_flops
from ralu_lab.bench.quality.cost import TestbedCost
from ralu_lab.testbed.v2 import model as tb
from ralu_lab.testbed.v2.conditioning import TEXT_TOKENS

#: SD3 token counts (square grids of patches) its quadratic cost is fitted through.
_SD3_FIT_SIDES = (4, 8, 16)


class SD3Cost(TestbedCost):
    """FLOPs of one batch-1 SD3 forward at ``n`` image tokens.  The patch embedding takes a
    latent grid, and RALU's mixed stage runs token sets that are no grid, so the count is the
    quadratic in ``n`` through three square grids (exact: projections are linear in the tokens,
    attention quadratic in the joint sequence)."""

    def forward(self, image_tokens: int):
        image_tokens = int(image_tokens)
        if image_tokens not in self._cache:
            if self._model is None:
                with torch.device("meta"):
                    self._model = SD3Transformer2DModel.from_config(self.config)
                counts = [self._count(side) for side in _SD3_FIT_SIDES]
                xs = [side * side for side in _SD3_FIT_SIDES]
                self._fit = [fit_quadratic(xs, [getattr(c, part) for c in counts]) for part in ("total", "linear")]
            n = image_tokens
            self._cache[n] = Flops(*(float(c0 + c1 * n + c2 * n * n) for c0, c1, c2 in self._fit))
        return self._cache[image_tokens]

    def _count(self, side: int) -> Flops:
        c, meta, p = self.config, dict(device="meta"), self.config["patch_size"]
        return count_flops(
            self._model,
            hidden_states=torch.empty(1, c["in_channels"], side * p, side * p, **meta),
            encoder_hidden_states=torch.empty(1, self.text_tokens, c["joint_attention_dim"], **meta),
            pooled_projections=torch.empty(1, c["pooled_projection_dim"], **meta),
            timestep=torch.empty(1, **meta),
            return_dict=False,
        )


def transformer_cost(arch: str, transformer_config) -> TestbedCost:
    """The FLUX per-forward counter (:class:`~ralu_lab.bench.quality.cost.TestbedCost`) or its SD3 form (both at the testbed's text tokens)."""
    cls = TestbedCost if tb.check_arch(arch) == "flux" else SD3Cost
    return cls(transformer_config, TEXT_TOKENS)


class DecoderCost:
    """FLOPs of decoding one latent of side ``s`` with the testbed's autoencoder, on the meta device."""

    def __init__(self, autoencoder_config):
        config = {k: v for k, v in dict(autoencoder_config).items() if not k.startswith("_")}
        with torch.device("meta"):
            self._model = AutoencoderKL.from_config(config)
        self._cache: dict[int, Flops] = {}

    def decode(self, side: int) -> Flops:
        if side not in self._cache:
            latent = torch.empty(1, tb.LATENT_CHANNELS, side, side, device="meta")
            self._cache[side] = count_flops(self._model.decode, latent, return_dict=False)
        return self._cache[side]


@dataclass
class RunCost:
    """Per image: total and linear FLOPs (transformer, decoder), forwards and decodes as run."""

    transformer_total: float | None
    transformer_linear: float
    decoder_total: float
    decoder_linear: float
    forwards: float
    decodes: dict[str, float]

    @property
    def total(self) -> float | None:
        return None if self.transformer_total is None else self.transformer_total + self.decoder_total

    @property
    def linear(self) -> float:
        return self.transformer_linear + self.decoder_linear


class CostLog:
    """Everything a sampler runs within the block: the image-token count and batch of every
    forward of the first transformer block (it runs in every forward, also SD3's token path
    and a cache's skipped steps' head), the latent size and batch of every decode, and the
    executed linear FLOPs of the transformer."""

    def __init__(self, transformer, autoencoder):
        self.transformer, self.autoencoder = transformer, autoencoder
        self.forwards: list[tuple[int, int]] = []
        self.decodes: list[tuple[int, int]] = []
        self.counter: dict = {}

    def _forward(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.forwards.append((int(hidden.shape[1]), int(hidden.shape[0])))

    def _decode(self, module, args, kwargs):
        z = args[0] if args else kwargs["z"]
        self.decodes.append((int(z.shape[-1]), int(z.shape[0])))

    @contextmanager
    def record(self):
        with ExitStack() as stack:
            handles = [
                self.transformer.transformer_blocks[0].register_forward_pre_hook(self._forward, with_kwargs=True),
                self.autoencoder.decoder.register_forward_pre_hook(self._decode, with_kwargs=True),
            ]
            for handle in handles:
                stack.callback(handle.remove)
            self.counter = stack.enter_context(executed_linear_flops(self.transformer))
            yield self

    def cost(self, images: int, transformer: TestbedCost, decoder: DecoderCost, cached: bool) -> RunCost:
        """Per-image cost of what was recorded for ``images`` images (``cached``: the token
        log does not say what a cache skipped, so there is no total)."""
        forward_total = sum(b * transformer.forward(n).total for n, b in self.forwards) / images
        sides = sorted({s for s, _ in self.decodes})
        decodes = {f"{s * tb.VAE_SCALE_FACTOR} px": sum(b for t, b in self.decodes if t == s) / images for s in sides}
        return RunCost(
            transformer_total=None if cached else forward_total,
            transformer_linear=self.counter["flops"] / images,
            decoder_total=sum(b * decoder.decode(s).total for s, b in self.decodes) / images,
            decoder_linear=sum(b * decoder.decode(s).linear for s, b in self.decodes) / images,
            forwards=sum(b for _, b in self.forwards) / images,
            decodes=decodes,
        )


def planned_total(transformer: TestbedCost, forwards: Sequence[int], branches: int) -> float:
    """Transformer total FLOPs of one image through planned forwards (``branches``: 2 for CFG)."""
    return branches * transformer.of(forwards).total
