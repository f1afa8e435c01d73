"""The family interface: what a model family supplies so that RALU runs its models.

RALU's algorithm (plan, noise, edge selection, re-noising, the Euler loop) is the same for
every flow-matching transformer; what differs between FLUX.1, SD3, Chroma, FLUX.2,
Qwen-Image and Kontext is how a latent becomes tokens, where a token sits, how the
transformer is called and how a latent is decoded.  A family declares exactly that, in three
places, each declared once:

1. **The registry** (:mod:`ralu.runtime.models`, standard library only): a
   :class:`~ralu.runtime.models.FamilySpec` (the RALU pipeline class, the diffusers pipelines
   it loads, its guidance argument and the text components ``--prompt`` needs) and one
   :class:`~ralu.runtime.models.ModelSpec` per model (baseline steps, CFG, text tokens, the
   scheduler and its shift rule, the real architecture configs the cost model counts on the
   ``meta`` device).
2. **The pipeline** (:class:`FamilyPipeline`): a class that lists
   :class:`~ralu.runtime.pipeline.RALUPipelineMixin` before its diffusers base pipeline,
   encodes prompts with the base pipeline's own ``encode_prompt`` and supplies the latent
   layout and the decode below.
3. **The stage model** (:class:`ralu.runtime.sampler.StageModel`): per stage, the per-token
   positions of an arbitrary token set and the velocity call; and the edge decode.

Adding a family is one runtime module (the pipeline and its stage model), one record in
each registry table and its tests: see ``docs/families.md``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .sampler import StageModel, Velocity

__all__ = ["FAMILY_PIPELINE_MEMBERS", "FamilyPipeline", "StageModel", "Velocity"]


@runtime_checkable
class FamilyPipeline(Protocol):
    """What a family's RALU pipeline supplies to :class:`~ralu.runtime.pipeline.RALUPipelineMixin`.

    The canvas is the family-independent latent image ``(B, C, H, W)`` of
    :mod:`ralu.runtime.tokens` (tokens are its 2x2 patches); ``latents`` are the family's own
    layout of it, as its diffusers pipeline takes and returns them.
    """

    #: Key of :data:`ralu.runtime.models.FAMILIES`; schedules of this family only run here.
    family: str

    @property
    def latent_channels(self) -> int:
        """Channels of the canvas (the unpacked latent image)."""

    def latents_to_canvas(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The family's ``latents`` -> the canvas ``(B, C, height, width)`` (token unpacking)."""

    def canvas_to_latents(self, canvas: torch.Tensor) -> torch.Tensor:
        """The canvas -> the family's ``latents`` (token packing); inverse of the above."""

    def decode_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        """Canvas -> images in [-1, 1] (the final decode and, on the half-size Tweedie
        estimate, the edge decode)."""

    def encode_prompt(self, *args, **kwargs):
        """The base pipeline's prompt encoding, used as it is."""


#: The members a family's pipeline class must define (checked for every registered family).
FAMILY_PIPELINE_MEMBERS = ("family", "latent_channels", "latents_to_canvas", "canvas_to_latents", "decode_canvas", "encode_prompt")
