"""ralu.calibrate.testbed: a quality testbed that needs no real weights.

A procedurally generated dataset with checkable conditioning (:mod:`.data`), fixed "text"
embeddings for its labels (:mod:`.conditioning`), a small rectified-flow model of the real
``FluxTransformer2DModel`` class served through a real ``diffusers.FluxPipeline``
(:mod:`.model`, trained by :mod:`.train`), a classifier that checks samples
(:mod:`.classifier`) and sample-accuracy evaluation (:mod:`.evaluate`).  The trained weights,
with the commands that produced them, are repository data in ``testbed-weights/``, not part
of the installed package (:mod:`.location` says how they are found).
"""

_LAZY = {
    "make_batch": ".data",
    "render": ".data",
    "all_labels": ".data",
    "describe": ".data",
    "encode_labels": ".conditioning",
    "encode_prompts": ".conditioning",
    "null_embeds": ".conditioning",
    "load_pipeline": ".model",
    "load_transformer": ".model",
    "PixelVAE": ".model",
    "testbed_schedule": ".model",
    "load_classifier": ".classifier",
    "sample_accuracy": ".evaluate",
    "generate": ".evaluate",
    "balanced_labels": ".evaluate",
    "frechet_distance": ".evaluate",
    "weights_dir": ".location",
    "transformer_dir": ".location",
    "classifier_dir": ".location",
    "WeightsNotFound": ".location",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
