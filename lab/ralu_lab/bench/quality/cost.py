"""FLOPs of a testbed FLUX transformer, counted on the meta device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from ralu.calibrate.flops.counting import count_flops
from ralu.calibrate.flops.pricing import Flops


class TestbedCost:
    """FLOPs of one batch-1 forward of a testbed transformer (its own config) at ``n`` image
    tokens plus ``text_tokens``, counted on the meta device and cached."""

    __test__ = False  # not a pytest class

    def __init__(self, transformer_config: dict, text_tokens: int):
        self.config = {k: v for k, v in dict(transformer_config).items() if not k.startswith("_")}
        self.text_tokens = int(text_tokens)
        self._cache: dict[int, Any] = {}
        self._model = None

    def forward(self, image_tokens: int):
        image_tokens = int(image_tokens)
        if image_tokens not in self._cache:
            if self._model is None:
                with torch.device("meta"):
                    self._model = FluxTransformer2DModel.from_config(self.config)
            c = self.config
            meta = dict(device="meta")
            inputs = dict(
                hidden_states=torch.empty(1, image_tokens, c["in_channels"], **meta),
                encoder_hidden_states=torch.empty(1, self.text_tokens, c["joint_attention_dim"], **meta),
                pooled_projections=torch.empty(1, c["pooled_projection_dim"], **meta),
                timestep=torch.empty(1, **meta),
                img_ids=torch.empty(image_tokens, 3, **meta),
                txt_ids=torch.empty(self.text_tokens, 3, **meta),
                guidance=torch.empty(1, **meta) if c.get("guidance_embeds") else None,
                return_dict=False,
            )
            self._cache[image_tokens] = count_flops(self._model, **inputs)
        return self._cache[image_tokens]

    def of(self, token_counts: Sequence[int]):
        """Total FLOPs of one image through forwards at these token counts."""
        return sum((self.forward(n) for n in token_counts), Flops(0.0, 0.0))

