"""Compatibility re-export: the model registry lives in :mod:`ralu.runtime.models`.

Only ``calibrate/bench`` still imports from here; once it imports ``ralu.runtime.models``
this module can go.
"""

from ralu.runtime.models import ALIASES, MODELS, ModelSpec, check_resolution, get_model, stage_image_tokens

__all__ = ["ALIASES", "MODELS", "ModelSpec", "check_resolution", "get_model", "stage_image_tokens"]
