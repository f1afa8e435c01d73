"""ralu_lab.testbed.v2: a quality testbed in RALU's regime (latent space, fine detail).

The retired testbed v1 sampled pixels and labelled only shape, colour and position; v2 has
what a low-resolution stage can lose:

* :mod:`.data`: 64 px scenes whose label also names the background's texture, orientation
  and period and thin marks (lines, dots), rendered anti-aliased and reproducible;
* :mod:`.conditioning`: fixed label embeddings (the "text" inputs of both generators);
* :mod:`.model`: a factor-2 ``AutoencoderKL`` (4 x 32 x 32 latents, 256 tokens), a
  ``FluxTransformer2DModel`` and an ``SD3Transformer2DModel`` on those latents, served by
  ``FluxPipeline`` / ``StableDiffusion3Pipeline`` (and the RALU pipelines via ``from_pipe``);
* :mod:`.classifier`: reads all seven attributes back and gives the features of the
  Frechet distance;
* :mod:`.metrics`: FD, spectral distance, PSNR / SSIM, blocking, per-attribute accuracy,
  bootstrap intervals and paired comparisons;
* :mod:`.train_autoencoder`, :mod:`.train_generator`, :mod:`.classifier` (``main``): resumable
  training commands that record themselves beside the weights (:mod:`.training`);
* :mod:`.evaluate`: the regime check (does the 50-step baseline draw the fine structure, do
  few steps visibly lose it).

Weights live in the repository's ``lab/testbed-weights/v2/`` (:mod:`.location`); the design and
the training plan are in ``docs/testbed-v2.md``.
"""

_LAZY = {
    "make_batch": ".data",
    "balanced_labels": ".data",
    "ATTRIBUTES": ".data",
    "encode_labels": ".conditioning",
    "null_embeds": ".conditioning",
    "load_pipeline": ".model",
    "make_pipeline": ".model",
    "call_inputs": ".model",
    "testbed_schedule": ".model",
    "load_autoencoder": ".model",
    "load_classifier": ".classifier",
    "regime_check": ".evaluate",
    "generate": ".evaluate",
}


def __getattr__(name):
    # Lazy: importing the package does not load diffusers, scipy or torchmetrics.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
