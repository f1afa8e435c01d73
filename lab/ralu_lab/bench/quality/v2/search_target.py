"""Testbed v2 as a target of the product's quality search (lab code).

The quality search (:func:`ralu.calibrate.quality_search.search`) takes its pipeline,
prompts, reference key, feature metric and cost as arguments and imports nothing of the
testbed; this module supplies them for testbed v2's generators:

* :func:`testbed_target`: the ``testbed`` quality target of
  ``ralu-calibrate --objective quality --pipeline testbed`` (and ``--magcache``), registered
  in the entry-point group ``ralu.quality_targets`` (:mod:`ralu.calibrate.plugins`);
* :func:`search_testbed_v2`: the search on testbed v2's balanced prompts, as
  ``python -m ralu_lab.bench.quality_testbed`` runs it;
* :func:`fd_on_testbed_v2` (the metric ``testbed-v2-fd``) and :func:`speedup_on_testbed_v2`.
"""

from __future__ import annotations

import itertools

import torch

from ralu.calibrate.plugins import QualityTarget
from ralu.calibrate.quality_search import SearchResult, layout_speedup, search, weights_id
from ralu_lab.testbed.v2 import data
from ralu_lab.testbed.v2 import model as tb
from ralu_lab.testbed.v2.evaluate import frechet_distance, image_generators

#: The metric name the quality search's ``metric=`` takes on the testbed (besides callables).
METRIC = "testbed-v2-fd"


def fd_on_testbed_v2(classifier_path=None):
    """Set-level Frechet distance in testbed v2's classifier features (the features of its
    harness's FD, which read the fine structure: texture, orientation, period, marks)."""
    from ralu_lab.testbed.v2.classifier import load_classifier

    classifier = load_classifier(classifier_path)

    def metric(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            a, b = classifier.features(images * 2.0 - 1.0), classifier.features(references * 2.0 - 1.0)
        return torch.tensor(frechet_distance(a.double().numpy(), b.double().numpy()), dtype=torch.float64)

    metric.set_level = True
    return metric


def resolve_metric(metric):
    """``"testbed-v2-fd"`` as :func:`fd_on_testbed_v2`; anything else as the search takes it."""
    return fd_on_testbed_v2() if metric == METRIC else metric


def speedup_on_testbed_v2(pipe, arch: str):
    """Total-FLOPs speed-up on testbed v2's ``arch`` transformer (how its harness matches budgets)."""
    from ralu_lab.bench.quality.v2.cost import transformer_cost

    return layout_speedup(transformer_cost(arch, pipe.transformer.config), tb.FULL_TOKENS, tb.BASE_STEPS[arch])


def labels_of_prompts(prompts) -> torch.Tensor:
    """``(n, 7)`` labels of testbed v2 prompts (:func:`ralu_lab.testbed.v2.data.describe`'s
    words exactly); a one-line ValueError for a prompt the testbed cannot draw."""
    table = _prompt_table()
    unknown = [p for p in prompts if p not in table]
    if unknown:
        example = data.describe(torch.zeros(1, len(data.ATTRIBUTES), dtype=torch.long))[0]
        raise ValueError(f"prompt {unknown[0]!r} is not one the testbed draws. Fix: write testbed v2 prompts, e.g. {example!r}")
    return torch.tensor([table[p] for p in prompts], dtype=torch.long)


_TABLE: dict[str, list[int]] = {}


def _prompt_table() -> dict[str, list[int]]:
    if not _TABLE:
        labels = torch.tensor(list(itertools.product(*(range(k) for k in data.NUM_VALUES))), dtype=torch.long)
        _TABLE.update(zip(data.describe(labels), labels.tolist()))
    return _TABLE


def _encoder(arch: str, pipe, labels_of):
    placed = ("height", "width", "guidance_scale")  # the search passes these itself

    def encode(batch: list[str]) -> dict:
        call = tb.call_inputs(arch, labels_of(batch), dtype=pipe.transformer.dtype)
        return {k: v for k, v in call.items() if k not in placed}

    return encode


def _options(arch: str, pipe, encode, metric) -> dict:
    return dict(model="flux-dev" if arch == "flux" else "sd3-medium", height=data.IMAGE_SIZE, width=data.IMAGE_SIZE, h0=tb.base_shift(arch),
                base_steps=tb.BASE_STEPS[arch], encode=encode, speedup_of=speedup_on_testbed_v2(pipe, arch),
                pipeline_id=f"testbed-v2:{arch}:{weights_id(pipe.transformer)}:{weights_id(pipe.vae)}",  # new weights, new references
                metric=resolve_metric(metric))


def testbed_target(model: str = "flux-dev", metric=None, device: str = "cpu", pipe=None) -> QualityTarget:
    """The ``testbed`` quality target: testbed v2's generator of ``model``'s family (FLUX.1 ->
    its FLUX generator, SD3 -> its SD3 generator) at 64 x 64 with its base shift and steps,
    prompts read as testbed v2 labels, FD in its classifier's features by default and its
    transformer's FLOPs as the cost; schedules move to its size with
    :func:`ralu_lab.testbed.v2.model.testbed_schedule`."""
    from ralu.runtime.models import get_model

    family = get_model(model).family
    if family not in tb.ARCHITECTURES:
        raise ValueError(f"the testbed has a FLUX.1 and an SD3 generator, not a {family} one. Fix: --model flux or --model sd3")
    arch = family
    pipe = tb.load_pipeline(arch, device=device) if pipe is None else pipe
    pipe.set_progress_bar_config(disable=True)
    options = _options(arch, pipe, _encoder(arch, pipe, labels_of_prompts), METRIC if metric is None else metric)
    options["guidance_scale"] = tb.GUIDANCE_SCALE[arch]
    return QualityTarget(pipe=pipe, options=options, adapt_schedule=lambda schedule: tb.testbed_schedule(schedule, arch))


def search_testbed_v2(arch: str, speedup: float, *, images: int = 32, image_seed: int = 100, pipe=None, **options) -> SearchResult:
    """:func:`ralu.calibrate.quality_search.search` on testbed v2's ``arch`` generator ("flux"
    or "sd3") in its real pipeline: balanced prompts of seed ``image_seed`` (disjoint from the
    harness's seeds), the testbed's guided calls (:func:`ralu_lab.testbed.v2.model.call_inputs`),
    FD in its classifier's features (times the search's spectral term, ``spectral_weight``)
    and its transformer's FLOPs (both guidance branches alike)."""
    pipe = tb.load_pipeline(arch) if pipe is None else pipe
    pipe.set_progress_bar_config(disable=True)
    labels = data.balanced_labels(images, image_seed)
    prompts = data.describe(labels)
    by_prompt = dict(zip(prompts, labels))
    seeds = [int(g.initial_seed()) for g in image_generators(images, image_seed)]  # the harness's noise rule
    metric = options.pop("metric", METRIC)
    fixed = _options(arch, pipe, _encoder(arch, pipe, lambda batch: torch.stack([by_prompt[p] for p in batch])), metric)
    for key in ("speedup_of", "pipeline_id"):
        if key in options:
            fixed[key] = options.pop(key)
    return search(pipe, prompts, speedup, seeds=seeds, guidance_scale=tb.GUIDANCE_SCALE[arch], **fixed, **options)
