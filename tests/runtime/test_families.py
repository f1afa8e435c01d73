"""The family interface (ralu.runtime.family) and the family registry (ralu.runtime.models.FAMILIES)."""

from __future__ import annotations

import importlib
import inspect

import pytest

import ralu.runtime
from ralu.runtime.family import FAMILY_PIPELINE_MEMBERS, FamilyPipeline
from ralu.runtime.models import FAMILIES, MODELS, get_family
from ralu.runtime.pipeline import RALUPipelineMixin


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_pipeline_is_exported_and_extends_its_diffusers_pipeline(name):
    spec = FAMILIES[name]
    cls = getattr(ralu.runtime, spec.pipeline)
    assert cls is getattr(importlib.import_module(f"ralu.runtime.{spec.module}"), spec.pipeline)
    assert spec.pipeline in ralu.runtime.__all__
    assert issubclass(cls, RALUPipelineMixin) and cls.family == name
    # The mixin comes first, so its methods (saving, checks) win over the base pipeline's.
    assert cls.__mro__.index(RALUPipelineMixin) < cls.__mro__.index(cls.diffusers_base())
    assert cls.diffusers_base().__name__ in spec.base_pipelines


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_pipeline_supplies_the_protocol(name):
    cls = getattr(ralu.runtime, FAMILIES[name].pipeline)
    for member in FAMILY_PIPELINE_MEMBERS:
        assert hasattr(cls, member), f"{cls.__name__} lacks {member}"
    # The latent layout is the family's own: the mixin's placeholders are overridden.
    for member in ("latent_channels", "latents_to_canvas", "canvas_to_latents"):
        assert inspect.getattr_static(cls, member) is not inspect.getattr_static(RALUPipelineMixin, member), f"{cls.__name__} does not define {member}"
    protocol_members = {name for name in vars(FamilyPipeline) if not name.startswith("_")} - {"family"}
    assert protocol_members | {"family"} == set(FAMILY_PIPELINE_MEMBERS)


def test_every_model_names_a_registered_family_and_every_family_has_a_model():
    assert {spec.family for spec in MODELS.values()} == set(FAMILIES)


def test_the_cli_loads_every_family_from_its_diffusers_folder_name():
    from ralu.runtime.cli import PIPELINES

    for spec in FAMILIES.values():
        for base in spec.base_pipelines:
            assert PIPELINES[base] == ("ralu.runtime", spec.pipeline, spec.name)


def test_unknown_family_is_one_line():
    with pytest.raises(ValueError, match=r"unknown pipeline family 'sdxl'\. Fix: use one of \["):
        get_family("sdxl")
