"""Golden values: fixed-seed latents of tiny three-stage FLUX and SD3 runs must not move.

``tests/golden/runtime_latents.pt`` was written by this module's ``golden_runs`` from the
code before the pipelines shared their sampling glue; any refactor of the runtime must keep
the latents (and the edge-selected tokens) it produces.  A deliberate change of the
sampler's numbers regenerates the file with
``python tests/runtime/test_golden.py --write`` and says why in its commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "runtime_latents.pt"
SIZE = 64  # latent 8x8: 2x2 low-res tokens, k = 2 upsampled early per image
STAGES = [(2, 0.3, 5.0), (2, 0.5, 2.5), (3, 1.0, 2.0)]
SEEDS = (5, 6)  # one generator per image; with these the two images upsample different tokens
#: float32 latents of order 1: torch's CPU kernels pick SIMD paths by CPU, and two CPUs have
#: been seen to differ by up to 2.3e-6 here (a changed algorithm moves them by far more).
TOLERANCE = 1e-5


def _generators():
    return [torch.Generator().manual_seed(seed) for seed in SEEDS]


def _flux_runs() -> dict[str, torch.Tensor]:
    from conftest import build_schedule, tiny_flux_scheduler, tiny_flux_transformer, tiny_flux_vae

    from ralu.runtime import RALUFluxPipeline

    schedule = build_schedule(STAGES, c=0.05, up_ratio=0.5, height=SIZE, width=SIZE)
    pipe = RALUFluxPipeline(
        scheduler=tiny_flux_scheduler(),
        vae=tiny_flux_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_flux_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(2, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g)}
    latents = pipe(**embeds, schedule=schedule, generator=_generators(), output_type="latent").images
    return {"flux": latents, "flux_selected": pipe.selected_tokens}


def _sd3_runs() -> dict[str, torch.Tensor]:
    from conftest import build_schedule
    from sd3_models import pipeline_components, text_inputs

    from ralu.runtime import RALUStableDiffusion3Pipeline

    schedule = build_schedule(STAGES, c=0.05, up_ratio=0.5, height=SIZE, width=SIZE, model="sd3-medium")
    pipe = RALUStableDiffusion3Pipeline(**pipeline_components("sd3"))
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for mode in ("crop", "stretch"):
        out[f"sd3_{mode}"] = pipe(**text_inputs(2), schedule=schedule, generator=_generators(), output_type="latent", low_res_positions=mode).images
        out[f"sd3_{mode}_selected"] = pipe.selected_tokens
    return out


def golden_runs() -> dict[str, torch.Tensor]:
    """Every golden tensor, computed by the current code."""
    return {**_flux_runs(), **_sd3_runs()}


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_latents_match_the_golden_values(expected, family):
    runs = _flux_runs() if family == "flux" else _sd3_runs()
    assert set(runs) == {name for name in expected if name.startswith(family)}
    for name, value in runs.items():
        golden = expected[name]
        assert value.shape == golden.shape and value.dtype == golden.dtype, name
        if value.dtype == torch.long:
            assert torch.equal(value, golden), name
        else:
            torch.testing.assert_close(value, golden, rtol=TOLERANCE, atol=TOLERANCE, msg=lambda text, name=name: f"{name}: {text}")


def test_golden_runs_are_not_trivial(expected):
    # The golden values must be worth guarding: finite, not all alike, and the two images of
    # a batch not copies of each other, and their mixed stages on different tokens (the
    # per-image token paths are covered).
    for name, value in expected.items():
        if value.dtype == torch.long:
            assert not torch.equal(value[0], value[1]), name
        else:
            assert torch.isfinite(value).all() and value.std() > 0.1, name
            assert not torch.allclose(value[0], value[1]), name


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/runtime/test_golden.py --write  (regenerates tests/golden/runtime_latents.pt)")
    sys.path.insert(0, str(GOLDEN.parents[1]))
    torch.set_num_threads(1)
    runs = golden_runs()
    torch.save(runs, GOLDEN)
    for key, tensor in runs.items():
        print(key, tuple(tensor.shape), tensor.dtype)
