"""Habits of diffusers users that RALU pipelines must honour, on both families (tiny models).

Saved folders load with the generic loaders; what ``latents=`` fixes; calls without
``schedule=``; float sizes; ignored negative prompts; the FLUX per-image fallback with a
cache; ``ralu-generate`` on incomplete or corrupt folders.  (A callback returning latents of
the wrong shape: tests/runtime/test_pipeline.py.)
"""

from __future__ import annotations

import json
import re
import shlex
import warnings

import pytest
import torch

SIZE = 64  # latent 8x8: 2x2 low-res tokens, 4 per image in the first stage
STAGES = [(1, 0.3, 3.0), (1, 0.5, 2.5), (1, 1.0, 2.0)]
FAMILY_MODEL = {"flux": "flux-dev", "sd3": "sd3-medium"}


def make_pipe(family: str, flux_pipe=None):
    if family == "flux":
        from ralu.runtime import RALUFluxPipeline

        pipe = RALUFluxPipeline.from_pipe(flux_pipe)
    else:
        from sd3_models import pipeline_components

        from ralu.runtime import RALUStableDiffusion3Pipeline

        pipe = RALUStableDiffusion3Pipeline(**pipeline_components("sd3"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text(family: str, flux_embeds, negative: bool | None = None) -> dict:
    """Prompt embeddings of one image, and negative ones if asked (by default: for SD3, whose
    classifier-free guidance needs them without text encoders, not for FLUX)."""
    if family == "flux":
        inputs = flux_embeds(1)
        if negative:
            inputs.update(flux_embeds(1, seed=5, prefix="negative_"))
        return inputs
    from sd3_models import text_inputs

    return text_inputs(1, negative=True if negative is None else negative)


@pytest.fixture(params=["flux", "sd3"])
def family(request):
    return request.param


@pytest.fixture
def pipe(family, flux_pipe):
    return make_pipe(family, flux_pipe)


@pytest.fixture
def schedule(family, make_schedule):
    return make_schedule(STAGES, up_ratio=0.5, height=SIZE, width=SIZE, model=FAMILY_MODEL[family])


def full_noise(pipe, seed: int = 0) -> torch.Tensor:
    """Full-size initial noise in the family's ``latents`` layout."""
    canvas = torch.randn(1, pipe.latent_channels, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))
    return pipe.canvas_to_latents(canvas)


def latents_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "latents=" in str(w.message)]


# ----------------------------------------------------------------------------------------
# save_pretrained -> generic loaders
# ----------------------------------------------------------------------------------------


def complete_pipe(family: str, flux_models):
    """A RALU pipeline with its (tiny) text encoders: what save_pretrained users save."""
    if family == "flux":
        from conftest import tiny_flux_scheduler, tiny_text_stack

        from ralu.runtime import RALUFluxPipeline

        transformer, vae = flux_models
        pipe = RALUFluxPipeline(scheduler=tiny_flux_scheduler(), vae=vae, transformer=transformer, **tiny_text_stack())
    else:
        from sd3_models import pipeline_components, tiny_sd3_text_stack

        from ralu.runtime import RALUStableDiffusion3Pipeline

        pipe = RALUStableDiffusion3Pipeline(**{**pipeline_components("sd3"), **tiny_sd3_text_stack()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_saved_folder_loads_with_generic_loaders_and_the_ralu_class(family, flux_models, tmp_path, flux_embeds, schedule):
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

    base = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}[family]
    pipe = complete_pipe(family, flux_models)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == base.__name__
    assert type(DiffusionPipeline.from_pretrained(tmp_path)) is base
    assert type(AutoPipelineForText2Image.from_pretrained(tmp_path)) is base
    loaded = type(pipe).from_pretrained(tmp_path)
    assert type(loaded) is type(pipe)
    loaded.set_progress_bar_config(disable=True)
    call = dict(**text(family, flux_embeds), schedule=schedule, output_type="latent")
    want = pipe(**call, generator=torch.Generator().manual_seed(3)).images
    got = loaded(**call, generator=torch.Generator().manual_seed(3)).images
    assert torch.allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------------------
# latents=
# ----------------------------------------------------------------------------------------


def test_latents_with_a_generator_repeat_a_run_exactly_and_do_not_warn(pipe, family, flux_embeds, schedule):
    call = dict(**text(family, flux_embeds), schedule=schedule, output_type="latent")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = pipe(**call, latents=full_noise(pipe), generator=torch.Generator().manual_seed(1)).images
        second = pipe(**call, latents=full_noise(pipe), generator=torch.Generator().manual_seed(1)).images
    assert torch.equal(first, second)
    assert latents_warnings(record) == []


def test_latents_without_a_generator_warn_once_per_call(pipe, family, flux_embeds, schedule):
    call = dict(**text(family, flux_embeds), schedule=schedule, output_type="latent")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = pipe(**call, latents=full_noise(pipe)).images
        second = pipe(**call, latents=full_noise(pipe)).images
    messages = latents_warnings(record)
    assert len(messages) == 2  # one per call, not one per step or stage
    assert "not reproducible" in messages[0] and "Fix: pass generator=" in messages[0]
    assert {w.filename for w in record if "latents=" in str(w.message)} == {__file__}
    # The warning is honest: the transition noise came from the global RNG.
    assert not torch.equal(first, second)


def test_latents_of_a_one_stage_schedule_need_no_generator(pipe, family, flux_embeds, make_schedule):
    one_stage = make_schedule([(2, 1.0, 2.0)], height=SIZE, width=SIZE, model=FAMILY_MODEL[family])
    call = dict(**text(family, flux_embeds), schedule=one_stage, output_type="latent")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = pipe(**call, latents=full_noise(pipe)).images
        second = pipe(**call, latents=full_noise(pipe)).images
    assert torch.equal(first, second) and latents_warnings(record) == []


def test_half_size_latents_are_refused_in_both_families(pipe, family, flux_embeds, schedule):
    canvas = torch.randn(1, pipe.latent_channels, SIZE // 16, SIZE // 16)
    half = pipe.canvas_to_latents(canvas)
    full = tuple(full_noise(pipe).shape)
    with pytest.raises(ValueError, match="half-size noise is not accepted") as error:
        pipe(**text(family, flux_embeds), schedule=schedule, latents=half, generator=torch.Generator().manual_seed(0))
    assert f"Fix: pass full-size noise of shape {full}" in str(error.value) and "\n" not in str(error.value)


def test_docstrings_say_what_latents_fix(pipe):
    from ralu.runtime.pipeline import RALUPipelineMixin

    shared = " ".join(RALUPipelineMixin.__doc__.split())
    assert "``latents`` fix the initial noise only" in shared and "global RNG" in shared and "Half-size noise is refused" in shared
    assert "RALUPipelineMixin" in type(pipe).__doc__  # each pipeline points at the shared promise


# ----------------------------------------------------------------------------------------
# schedule= missing
# ----------------------------------------------------------------------------------------


def test_missing_schedule_lists_only_this_familys_schedules(pipe, family, flux_embeds):
    from ralu.runtime import ScheduleError, shipped_schedules

    other = {"flux": "sd3", "sd3": "flux"}[family]
    with pytest.raises(ScheduleError, match="a schedule is required") as error:
        pipe(**text(family, flux_embeds))
    message = str(error.value)
    ours = [name for name in shipped_schedules() if name.startswith(FAMILY_MODEL[family])]
    assert ours and all(name in message for name in ours)
    assert not any(name in message for name in shipped_schedules() if name.startswith(other))


def test_missing_schedule_for_a_size_names_the_calibrate_command(pipe, family, flux_embeds):
    from ralu.calibrate.cli import build_parser
    from ralu.runtime import ScheduleError

    with pytest.raises(ScheduleError) as error:
        pipe(**text(family, flux_embeds), height=SIZE, width=SIZE)
    message = str(error.value)
    assert f"no shipped {family} schedule is made for {SIZE}x{SIZE}" in message
    command = re.search(r"`ralu-calibrate ([^`]*)`", message).group(1)
    # The command is a real ralu-calibrate call (the placeholders filled in).
    args = build_parser().parse_args(shlex.split(command.replace(" S ", " 4 ")))
    assert (args.height, args.width, args.speedup, str(args.out)) == (SIZE, SIZE, 4.0, "FILE.json")
    with pytest.raises(ScheduleError) as error:
        pipe(**text(family, flux_embeds), height=1024, width=1024)
    assert all(name in str(error.value) for name in ("-2x" if family == "sd3" else "-7x", "-3x" if family == "sd3" else "-4x"))


# ----------------------------------------------------------------------------------------
# height / width as floats
# ----------------------------------------------------------------------------------------


def test_integral_float_sizes_are_accepted(pipe, family, flux_embeds, schedule):
    call = dict(**text(family, flux_embeds), schedule=schedule, output_type="latent")
    as_float = pipe(**call, height=float(SIZE), width=float(SIZE), generator=torch.Generator().manual_seed(2)).images
    as_int = pipe(**call, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(2)).images
    assert torch.equal(as_float, as_int)
    with pytest.raises(ValueError, match=re.escape(f"height={SIZE + 0.5} must be an integer number of pixels")):
        pipe(**call, height=SIZE + 0.5)
    with pytest.raises(ValueError, match="width=True must be an integer"):
        pipe(**call, width=True)


def test_pixel_size():
    import numpy as np

    from ralu.runtime.models import check_resolution, pixel_size

    assert pixel_size("height", 256.0) == 256 and type(pixel_size("height", np.float32(256.0))) is int
    for bad in (256.5, "256", None, False):
        with pytest.raises(ValueError, match="must be an integer number of pixels"):
            pixel_size("height", bad)
    check_resolution(256.0, 512)
    with pytest.raises(ValueError, match="height=80 must be a positive multiple of 32"):
        check_resolution(80.0, 512)


# ----------------------------------------------------------------------------------------
# negative prompts without the guidance that uses them
# ----------------------------------------------------------------------------------------


def guidance_off(family: str) -> dict:
    return {"true_cfg_scale": 1.0} if family == "flux" else {"guidance_scale": 1.0}


def guidance_on(family: str) -> dict:
    return {"true_cfg_scale": 3.0} if family == "flux" else {"guidance_scale": 5.0}


def test_ignored_negative_prompt_warns_in_both_families(pipe, family, flux_embeds, schedule):
    call = dict(schedule=schedule, output_type="latent", **guidance_off(family))
    with pytest.warns(UserWarning, match="the negative prompt is ignored") as record:
        with_negative = pipe(**text(family, flux_embeds, negative=True), **call, generator=torch.Generator().manual_seed(4)).images
    warning = next(w for w in record if "negative prompt" in str(w.message))
    message = str(warning.message)
    assert warning.filename == __file__  # points at the caller's line
    assert "Fix: pass " + ("true_cfg_scale" if family == "flux" else "guidance_scale") + " > 1" in message
    without = pipe(**text(family, flux_embeds, negative=False), **call, generator=torch.Generator().manual_seed(4)).images
    assert torch.equal(with_negative, without)  # ignored, as the diffusers base pipeline does


def test_used_negative_prompt_does_not_warn(pipe, family, flux_embeds, schedule):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pipe(**text(family, flux_embeds, negative=True), schedule=schedule, output_type="latent", generator=torch.Generator().manual_seed(4), **guidance_on(family))
    assert not [w for w in record if "negative prompt" in str(w.message)]


def test_cli_refuses_an_ignored_sd3_negative_prompt_like_flux(tmp_path, make_schedule, capsys):
    from ralu.runtime.schedule import save_schedule

    folder = tmp_path / "sd3"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    schedule = save_schedule(make_schedule(STAGES, height=SIZE, width=SIZE, model="sd3-medium"), tmp_path / "s.json")
    argv = ["--model", str(folder), "--schedule", str(schedule), "--prompt", "x", "--negative-prompt", "y", "--guidance", "1.0", "--out", str(tmp_path / "out")]
    assert "ignores a negative prompt without classifier-free guidance" in one_line_error(capsys, argv)


# ----------------------------------------------------------------------------------------
# FLUX: per-image fallback with FirstBlockCache
# ----------------------------------------------------------------------------------------


def test_flux_fallback_with_first_block_cache_keeps_images_independent(flux_models, flux_embeds, make_schedule):
    from conftest import tiny_flux_scheduler, tiny_flux_transformer
    from diffusers import FirstBlockCacheConfig
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from ralu.runtime import RALUFluxPipeline
    from ralu.runtime.flux_rotary import supports_per_sample_positions

    class Custom(FluxAttnProcessor):
        pass

    transformer = tiny_flux_transformer()
    transformer.set_attn_processor(Custom())
    assert not supports_per_sample_positions(transformer)
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    pipe = RALUFluxPipeline(tiny_flux_scheduler(), flux_models[1], None, None, None, None, transformer)
    pipe.set_progress_bar_config(disable=True)
    # One step in stages 1 and 3 (a cache's first step in a stage always computes); the
    # mixed stage, where the images carry different tokens, takes the per-image fallback.
    schedule = make_schedule([(1, 0.3, 3.0), (4, 0.6, 2.5), (1, 1.0, 2.0)], up_ratio=0.3, height=128, width=128)
    embeds = flux_embeds(2)

    def run(inputs, seeds):
        stage2 = []

        def keep(pipe, step, timestep, callback_kwargs):
            if callback_kwargs["stage_index"] == 1:
                stage2.append(callback_kwargs["latents"].clone())
            return {}

        images = pipe(**inputs, schedule=schedule, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent", callback_on_step_end=keep).images
        return stage2[-1], images

    stage2, images = run(embeds, [0, 1])
    assert pipe.selected_tokens[0].tolist() != pipe.selected_tokens[1].tolist()  # the fallback ran
    for i in range(2):
        alone_stage2, alone = run({k: v[i : i + 1] for k, v in embeds.items()}, [i])
        assert torch.allclose(stage2[i], alone_stage2[0], atol=1e-5)
        assert torch.allclose(images[i], alone[0], atol=1e-5)


# ----------------------------------------------------------------------------------------
# ralu-generate on incomplete or corrupt folders
# ----------------------------------------------------------------------------------------


@pytest.fixture
def flux_schedule_file(tmp_path, make_schedule):
    from ralu.runtime.schedule import save_schedule

    return str(save_schedule(make_schedule(STAGES, height=SIZE, width=SIZE), tmp_path / "s.json"))


def one_line_error(capsys, argv) -> str:
    from ralu.runtime.cli import main

    assert main(argv) == 2  # in process, an uncaught exception would escape main() instead
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ralu-generate: error:")]
    assert len(lines) == 1
    return lines[0]


def test_cli_folder_without_text_encoders(flux_pipe, flux_schedule_file, tmp_path, capsys):
    folder = tmp_path / "no-text"
    flux_pipe.save_pretrained(folder)  # text encoders None: model_index lists [null, null]
    common = ["--schedule", flux_schedule_file, "--prompt", "x", "--device", "cpu", "--out", str(tmp_path / "out")]
    line = one_line_error(capsys, ["--model", str(folder)] + common)
    assert "lacks text_encoder/tokenizer/text_encoder_2/tokenizer_2" in line and "Fix: pass a complete pipeline folder" in line
    assert "network" not in line
    assert not (tmp_path / "out").exists()


def test_cli_folder_with_a_deleted_text_encoder(saved_flux_pipeline, flux_schedule_file, tmp_path, capsys):
    import shutil

    folder = tmp_path / "partial"
    shutil.copytree(saved_flux_pipeline, folder)
    shutil.rmtree(folder / "tokenizer_2")
    line = one_line_error(capsys, ["--model", str(folder), "--schedule", flux_schedule_file, "--prompt", "x", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert "lacks tokenizer_2" in line


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)), b"\x89PNG\r\n\x1a\n" + bytes(64), b'{"_class_name": ["custom", "Pipe"]}', b"[1, 2]", b"{truncated"],
    ids=["binary", "png", "list-class-name", "not-an-object", "truncated"],
)
def test_cli_corrupt_model_index(content, flux_schedule_file, tmp_path, capsys):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "model_index.json").write_bytes(content)
    line = one_line_error(capsys, ["--model", str(folder), "--schedule", flux_schedule_file, "--prompt", "x", "--out", str(tmp_path / "out")])
    assert "model_index.json" in line and "Fix:" in line
