"""RALUFlux2Pipeline and RALUFlux2KleinPipeline on tiny real-class FLUX.2 models (float32, CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flux2_models import TEXT_DIM, dev_pipe, embeds, klein_pipe, tiny_transformer

from ralu.runtime import RALUFlux2KleinPipeline, RALUFlux2Pipeline, ScheduleError
from ralu.runtime.flux2 import _Flux2StageModel, image_ids, patch_channels, unpatch_channels
from ralu.runtime.models import get_model
from ralu.runtime.plan import make_plan
from ralu.runtime.tokens import TokenLayout, patchify

SIZE = 128  # pixels: latent 16x16, M = 64 full-res tokens, 16 low-res tokens
THREE_STAGES = [(2, 0.3, 3.0), (2, 0.45, 2.5), (3, 1.0, 2.2)]
KLEIN = "flux2-klein-base-4b"


def generators(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def count_calls(transformer):
    calls = []
    handle = transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(tuple(kwargs["hidden_states"].shape[:2])), with_kwargs=True)
    return calls, handle


@pytest.fixture(scope="module")
def dev_base():
    return dev_pipe()


@pytest.fixture(scope="module")
def klein_base():
    return klein_pipe()


@pytest.fixture
def dev(dev_base):
    pipe = RALUFlux2Pipeline.from_pipe(dev_base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def klein(klein_base):
    pipe = RALUFlux2KleinPipeline.from_pipe(klein_base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def three_stage(model="flux2-dev", size=SIZE, up_ratio=0.3):
    from conftest import build_schedule

    return build_schedule(THREE_STAGES, c=0.04, up_ratio=up_ratio, height=size, width=size, model=model)


# ----------------------------------------------------------------------------------------
# The shift rule: h0 is compute_empirical_mu's exp(mu) at the baseline's step count.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (512, 768), (1024, 1024), (2048, 1536)])
@pytest.mark.parametrize("steps", [4, 28, 50, 200])
def test_base_shift_is_compute_empirical_mu(size, steps):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    height, width = size
    tokens = (height // 16) * (width // 16)
    for model in ("flux2-dev", KLEIN):
        spec = get_model(model)
        assert spec.base_shift(height, width, steps) == pytest.approx(math.exp(compute_empirical_mu(tokens, steps)), rel=1e-14)
    assert get_model("flux2").base_shift(height, width) == get_model("flux2").base_shift(height, width, 50)


def test_base_shift_needs_steps():
    with pytest.raises(ValueError, match=r"depends on the step count\. Fix: pass steps"):
        get_model("flux2-dev").scheduler.base_shift(4096)


def test_calibrator_h0_follows_the_baseline_step_count():
    from ralu.calibrate.calibration import _base_shift

    spec = get_model("flux2-dev")
    assert _base_shift(spec, 1024, 1024, None, 28) == spec.base_shift(1024, 1024, 28) != spec.base_shift(1024, 1024, 50)


# ----------------------------------------------------------------------------------------
# (a) One full-resolution stage at the base shift is the base pipeline.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_single_stage_reproduces_flux2_pipeline(dev_base, dev, make_schedule, guidance):
    steps, size = 5, 64
    schedule = make_schedule([(steps, 1.0, get_model("flux2-dev").base_shift(size, size, steps))], height=size, width=size, model="flux2-dev")
    kwargs = dict(embeds(2, seed=1), guidance_scale=guidance)
    for output_type in ("latent", "np"):
        want = dev_base(**kwargs, height=size, width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type=output_type).images
        got = dev(**kwargs, schedule=schedule, generator=torch.Generator().manual_seed(7), output_type=output_type).images
        assert got.shape == want.shape
        assert np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max() <= 1e-5


@pytest.mark.parametrize("cfg", [None, "empty", "embeds"])
def test_single_stage_reproduces_flux2_klein_pipeline(klein_base, klein, make_schedule, cfg):
    steps, size = 5, 64
    schedule = make_schedule([(steps, 1.0, get_model(KLEIN).base_shift(size, size, steps))], height=size, width=size, model=KLEIN)
    kwargs = dict(embeds(2, seed=1), guidance_scale=1.0 if cfg is None else 4.0)
    if cfg == "embeds":
        kwargs.update(embeds(2, seed=3, prefix="negative_"))
    elif cfg == "empty":  # the base encodes "" for the negative branch; give it as embeddings
        kwargs.update(negative_prompt_embeds=torch.zeros(2, 6, TEXT_DIM))
    for output_type in ("latent", "np"):
        want = klein_base(**kwargs, height=size, width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type=output_type).images
        got = klein(**kwargs, schedule=schedule, generator=torch.Generator().manual_seed(7), output_type=output_type).images
        assert got.shape == want.shape
        assert np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max() <= 1e-5


# ----------------------------------------------------------------------------------------
# (b) The token path on a full-resolution token set is the plain forward; (c) positions.
# ----------------------------------------------------------------------------------------


def test_full_token_set_through_the_stage_model_equals_the_plain_forward(dev):
    size = SIZE
    plan = make_plan(three_stage(), "flux2", size, size, 8)
    full = plan.stages[-1]
    g = torch.Generator().manual_seed(0)
    canvas = torch.randn(2, 32, size // 8, size // 8, generator=g)
    prompt = embeds(2, seed=4)["prompt_embeds"]
    text_ids = dev._prepare_text_ids(prompt)
    guidance = torch.full((2,), 3.5)
    model = _Flux2StageModel(dev, plan, prompt, text_ids, None, 1.0, guidance, torch.float32, torch.device("cpu"))
    dev.begin_call(plan, 3.5, None)
    dev._attention_kwargs = None
    packed = dev._pack_latents(patch_channels(canvas))  # Flux2Pipeline's token order
    ids = dev._prepare_latent_ids(patch_channels(canvas))
    sigma = float(full.sigmas[1])
    with torch.no_grad():
        plain = dev.transformer(hidden_states=packed, timestep=torch.full((2,), sigma), guidance=guidance, encoder_hidden_states=prompt, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        layout = TokenLayout.full(2, plan.grid)
        with model.stage(layout, full) as velocity:
            shared = velocity(layout.gather(canvas), sigma)
        # The per-image path (ids differ per image: here both equal the full grid's).
        model_ids = image_ids(layout)
        per_image = model._forward(packed, torch.full((2,), sigma), prompt, text_ids, model_ids, "test")
    assert torch.allclose(shared.flatten(2), plain, atol=1e-5)
    assert torch.allclose(per_image, plain, atol=1e-5)
    assert not torch.equal(plain[0], plain[1])


def test_mixed_stage_positions_equal_the_full_grids_at_the_selected_tokens(dev):
    grid = (4, 4)
    selected = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 12]])
    layout = TokenLayout.from_selection(selected, grid, "mixed")
    ids = image_ids(layout)
    full_grid = dev._prepare_latent_ids(torch.zeros(1, 128, 8, 8))[0].float()  # native (t, h, w, l), full size
    half_grid = dev._prepare_latent_ids(torch.zeros(1, 128, 4, 4))[0].float()  # native, half size
    pos_embed = dev.transformer.pos_embed
    for b in range(2):
        low, full = ids[b, : layout.num_low], ids[b, layout.num_low :]
        # Full-res children: the full grid's ids at their tokens, in low-res units (halved).
        want_full = full_grid[layout.full_index[b]].clone()
        want_full[:, 1:3] /= 2
        assert torch.equal(full, want_full)
        assert torch.equal(low, half_grid[layout.low_index[b]])
        # And the rotary tables: those of the full grid (halved units) at the selected tokens.
        cos, sin = pos_embed(ids[b])
        halved = full_grid.clone()
        halved[:, 1:3] /= 2
        cos_grid, sin_grid = pos_embed(halved)
        assert torch.equal(cos[layout.num_low :], cos_grid[layout.full_index[b]])
        assert torch.equal(sin[layout.num_low :], sin_grid[layout.full_index[b]])
    assert ids.dtype == torch.float32 and bool(((ids[..., 1:3] % 1) == 0.5).any())
    # Stage 3: native full-size ids, in raster order.
    assert torch.equal(image_ids(TokenLayout.full(1, grid))[0], full_grid)


def test_canvas_layout_round_trips_and_matches_diffusers(dev):
    g = torch.Generator().manual_seed(0)
    canvas = torch.randn(2, 32, 8, 12, generator=g)
    assert torch.equal(unpatch_channels(patch_channels(canvas)), canvas)
    assert torch.equal(patch_channels(canvas), dev._patchify_latents(canvas))
    assert torch.equal(unpatch_channels(patch_channels(canvas)), dev._unpatchify_latents(dev._patchify_latents(canvas)))
    # The packed tokens Flux2Pipeline denoises are the canvas's 2x2 patches, flattened (c, dy, dx).
    assert torch.equal(dev._pack_latents(patch_channels(canvas)), patchify(canvas).flatten(2))


# ----------------------------------------------------------------------------------------
# (d) Batches; (g) three stages end to end with callback_on_step_end.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["dev", "klein"])
def test_batch_equals_each_image_alone(request, family):
    pipe = request.getfixturevalue(family)
    schedule = three_stage("flux2-dev" if family == "dev" else KLEIN)
    inputs = embeds(3) if family == "dev" else {**embeds(3), **embeds(3, seed=8, prefix="negative_")}  # klein: with CFG
    batched = pipe(**inputs, schedule=schedule, generator=generators(3), output_type="latent").images
    selected = pipe.selected_tokens
    assert len({tuple(row.tolist()) for row in selected}) > 1, "the test needs images that select different tokens"
    for i in range(3):
        one = {key: value[i : i + 1] for key, value in inputs.items()}
        alone = pipe(**one, schedule=schedule, generator=generators(1, offset=i), output_type="latent").images
        assert (batched[i] - alone[0]).abs().max() <= 1e-4
        assert torch.equal(pipe.selected_tokens[0], selected[i])


def test_three_stages_end_to_end_with_callback(dev):
    schedule = three_stage()
    seen = []

    def callback(pipe, step, timestep, callback_kwargs):
        seen.append((step, callback_kwargs["stage_index"], tuple(callback_kwargs["latents"].shape), tuple(callback_kwargs["prompt_embeds"].shape)))
        return {}

    calls, handle = count_calls(dev.transformer)
    try:
        out = dev(**embeds(2), schedule=schedule, generator=generators(2), output_type="np", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images
    finally:
        handle.remove()
    assert out.shape == (2, SIZE, SIZE, 3) and np.isfinite(out).all()
    k = math.floor(0.3 * 16)
    assert [s[0] for s in seen] == list(range(7)) and [s[1] for s in seen] == [0, 0, 1, 1, 2, 2, 2]
    assert [s[2] for s in seen] == [(2, 16, 128)] * 2 + [(2, 16 + 3 * k, 128)] * 2 + [(2, 64, 128)] * 3
    assert dev.selected_tokens.shape == (2, k)
    # Stage 2 with different selections runs one forward per image; the others one per step.
    assert calls == [(2, 16)] * 2 + [(1, 16 + 3 * k)] * 4 + [(2, 64)] * 3
    latent = dev(**embeds(2), schedule=schedule, generator=generators(2), output_type="latent").images
    assert latent.shape == (2, 64, 128) and torch.isfinite(latent).all()

    def zero_at_end(pipe, step, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step == 6 else {}

    zeros = dev(**embeds(1), schedule=schedule, generator=generators(1), output_type="latent", callback_on_step_end=zero_at_end).images
    assert zeros.abs().max() == 0


def test_klein_latent_output_is_the_denormalised_vae_latent(klein):
    schedule = three_stage(KLEIN)
    out = klein(**embeds(1), guidance_scale=1.0, schedule=schedule, generator=generators(1), output_type="latent").images
    assert out.shape == (1, 32, 16, 16)
    mean = klein.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(klein.vae.bn.running_var.view(1, -1, 1, 1) + klein.vae.config.batch_norm_eps)
    normalised = unpatch_channels((patch_channels(out) - mean) / std)
    assert normalised.abs().mean() < out.abs().mean()  # the statistics were undone (means up to 1.5)


def test_latents_argument_is_the_patchified_noise(dev):
    schedule = three_stage()
    gen = generators(1)
    noise = torch.randn(1, 128, 8, 8, generator=gen[0])
    gen = generators(1)
    drawn = dev(**embeds(1), schedule=schedule, generator=gen, output_type="latent").images
    gen = generators(1)
    gen[0].manual_seed(0)
    torch.randn(1, 128, 8, 8, generator=gen[0])  # the generator continues after the noise draw
    given = dev(**embeds(1), schedule=schedule, latents=noise, generator=gen, output_type="latent").images
    assert torch.allclose(given, drawn, atol=1e-6)
    with pytest.raises(ValueError, match=r"half-size noise is not accepted.*Fix: pass full-size noise of shape \(1, 128, 8, 8\)"):
        dev(**embeds(1), schedule=schedule, latents=torch.zeros(1, 128, 4, 4), generator=generators(1), output_type="latent")


# ----------------------------------------------------------------------------------------
# (e) Guidance branches.
# ----------------------------------------------------------------------------------------


def test_dev_true_cfg_calls_twice_and_changes_the_result(dev):
    schedule = three_stage()
    kwargs = dict(embeds(1), schedule=schedule, output_type="latent")
    negative = embeds(1, seed=5, prefix="negative_")
    calls, handle = count_calls(dev.transformer)
    try:
        cfg = dev(**kwargs, **negative, true_cfg_scale=3.0, generator=generators(1)).images
    finally:
        handle.remove()
    assert len(calls) == 2 * schedule.total_steps
    with pytest.warns(UserWarning, match="the negative prompt is ignored"):
        plain = dev(**kwargs, **negative, generator=generators(1)).images
    assert (cfg - plain).abs().max() > 1e-3
    calls, handle = count_calls(dev.transformer)
    try:
        again = dev(**kwargs, generator=generators(1)).images
    finally:
        handle.remove()
    assert len(calls) == schedule.total_steps and torch.equal(again, plain)
    stronger = dev(**kwargs, guidance_scale=8.0, generator=generators(1)).images  # embedded guidance acts
    assert (stronger - plain).abs().max() > 1e-4


def test_klein_cfg_branches(klein):
    schedule = three_stage(KLEIN)
    kwargs = dict(embeds(1), schedule=schedule, output_type="latent")
    calls, handle = count_calls(klein.transformer)
    try:
        off = klein(**kwargs, guidance_scale=1.0, generator=generators(1)).images
        assert len(calls) == schedule.total_steps
        calls.clear()
        on = klein(**kwargs, guidance_scale=4.0, negative_prompt_embeds=torch.zeros(1, 6, TEXT_DIM), generator=generators(1)).images
        assert len(calls) == 2 * schedule.total_steps
    finally:
        handle.remove()
    other = klein(**kwargs, guidance_scale=4.0, **embeds(1, seed=9, prefix="negative_"), generator=generators(1)).images
    assert (on - off).abs().max() > 1e-3 and (other - on).abs().max() > 1e-3
    with pytest.warns(UserWarning, match="the negative prompt is ignored"):
        klein(**kwargs, guidance_scale=1.0, **embeds(1, seed=9, prefix="negative_"), generator=generators(1))


def test_klein_text_prompts_and_negative_prompt():
    pipe = RALUFlux2KleinPipeline.from_pipe(klein_pipe(text=True))
    pipe.set_progress_bar_config(disable=True)
    schedule = three_stage(KLEIN)
    run = lambda **kw: pipe(prompt=["a red cat", "a blue dog"], schedule=schedule, generator=generators(2), output_type="latent", **kw).images
    default = run()
    assert torch.allclose(run(negative_prompt=""), default, atol=1e-6)  # the base's negative is ""
    assert (run(negative_prompt="photo of a dog") - default).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------
# (f) Saving and loading; call conventions; refusals.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["dev", "klein"])
def test_saved_folder_loads_back(request, family, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = RALUFlux2Pipeline.from_pipe(dev_pipe()) if family == "dev" else RALUFlux2KleinPipeline.from_pipe(klein_pipe(text=True))
    pipe.save_pretrained(tmp_path)
    base = type(pipe).diffusers_base()
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == base.__name__
    # The tiny dev pipeline has no text encoder (a tiny Mistral 3 and Pixtral processor are not
    # built offline here): the missing components are passed as None, as diffusers asks.
    missing = {"text_encoder": None, "tokenizer": None} if family == "dev" else {}
    generic = DiffusionPipeline.from_pretrained(tmp_path, **missing)
    assert type(generic) is base
    loaded = type(pipe).from_pretrained(tmp_path, **missing)
    loaded.set_progress_bar_config(disable=True)
    schedule = three_stage("flux2-dev" if family == "dev" else KLEIN)
    a = pipe(**embeds(1), schedule=schedule, generator=generators(1), output_type="latent").images
    b = loaded(**embeds(1), schedule=schedule, generator=generators(1), output_type="latent").images
    assert torch.equal(a, b)


def test_refusals_before_any_compute(dev, make_schedule):
    calls, handle = count_calls(dev.transformer)
    try:
        with pytest.raises(ValueError, match=r"image: reference-image editing is not supported.*Fix: leave image unset"):
            dev(image=object(), **embeds(1), schedule=three_stage())
        with pytest.raises(ValueError, match="fixed by the schedule"):
            dev(**embeds(1), schedule=three_stage(), num_inference_steps=28)
        with pytest.raises(ScheduleError, match="family 'flux2-klein'"):
            dev(**embeds(1), schedule=three_stage(KLEIN))
        with pytest.raises(ScheduleError, match="family 'flux'"):
            dev(**embeds(1), schedule=make_schedule(THREE_STAGES, height=SIZE, width=SIZE))
        with pytest.raises(ScheduleError, match="required"):
            dev(**embeds(1))
    finally:
        handle.remove()
    assert calls == []


def test_distilled_klein_is_refused():
    pipe = RALUFlux2KleinPipeline.from_pipe(klein_pipe(is_distilled=True))
    with pytest.raises(ValueError, match=r"step-distilled FLUX\.2 \[klein\].*Fix: use an undistilled klein base model"):
        pipe(**embeds(1), schedule=three_stage(KLEIN))


def test_bfloat16_model_keeps_float32_positions():
    pipe = RALUFlux2Pipeline.from_pipe(dev_pipe(transformer=tiny_transformer(True))).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    ids = []
    handle = pipe.transformer.pos_embed.register_forward_pre_hook(lambda module, args: ids.append(args[0]))
    try:
        image = pipe(**{k: v.bfloat16() for k, v in embeds(1).items()}, schedule=three_stage(), generator=generators(1), output_type="np").images
    finally:
        handle.remove()
    assert np.isfinite(image).all()
    mixed = ids[4]  # first step of the mixed stage: (img, txt) per forward, batch of one (shared ids)
    assert mixed.dtype == torch.float32 and bool(((mixed[:, 1:3] % 1) == 0.5).any())


# ----------------------------------------------------------------------------------------
# ralu-generate: the family from model_index.json.
# ----------------------------------------------------------------------------------------


def test_ralu_generate_runs_a_saved_klein_folder(tmp_path, capsys):
    from PIL import Image

    from ralu.runtime.cli import main
    from ralu.runtime.schedule import save_schedule

    folder = tmp_path / "tiny-klein"
    klein_pipe(text=True).save_pretrained(folder)
    schedule = save_schedule(three_stage(KLEIN, size=64), tmp_path / "klein-3x.json")
    out = tmp_path / "out"
    status = main([
        "--model", str(folder), "--schedule", str(schedule), "--prompt", "a red cat", "--negative-prompt", "blue dog",
        "--seed", "3", "--device", "cpu", "--out", str(out),
    ])
    assert status == 0, capsys.readouterr().err
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["000-klein-3x-seed3.png"]
    with Image.open(files[0]) as image:
        assert image.size == (64, 64)
        assert image.text["negative_prompt"] == "blue dog" and json.loads(image.text["parameters"])["guidance_scale"] == 4.0


def test_ralu_generate_recognises_a_flux2_dev_folder(tmp_path, capsys):
    # A tiny Mistral 3 text encoder with a Pixtral processor is not built offline here, so the
    # full dev run is not tested: the folder is recognised as flux2, and without its text
    # encoder it is refused before loading.
    from ralu.runtime.cli import main, pipeline_class

    folder = tmp_path / "tiny-dev"
    dev_pipe().save_pretrained(folder)
    assert pipeline_class(folder) == (RALUFlux2Pipeline, "flux2")
    schedule = three_stage(size=64)
    from ralu.runtime.schedule import save_schedule

    path = save_schedule(schedule, tmp_path / "dev-3x.json")
    status = main(["--model", str(folder), "--schedule", str(path), "--prompt", "a cat", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert status == 2 and "lacks text_encoder/tokenizer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# Step caches (Flux2Transformer2DModel has diffusers' CacheMixin).
# ----------------------------------------------------------------------------------------


def test_step_caches(dev):
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    from ralu.runtime.cache import disable_cache, enable_cache, mag_cache_config

    schedule = three_stage()
    run = lambda: dev(**embeds(2), schedule=schedule, generator=generators(2), output_type="latent").images
    plain = run()
    contexts = []
    original = dev.transformer.cache_context
    dev.transformer.cache_context = lambda name: contexts.append(name) or original(name)
    try:
        never_skip = (
            TaylorSeerCacheConfig(disable_cache_before_step=100, taylor_factors_dtype=torch.float32),
            mag_cache_config([[1.1] * 2, [1.1] * 2, [1.1] * 3], threshold=0.0, retention_ratio=0.0),
        )
        for config in never_skip:
            enable_cache(dev.transformer, config)
            try:
                contexts.clear()
                assert torch.equal(run(), plain)  # a cache set never to skip changes nothing
            finally:
                disable_cache(dev.transformer)
            assert "stage1-cond" in contexts and "stage3-cond" in contexts and "stage2-cond:1" in contexts
        # Skipping: TaylorSeer decides from the step number, so image i of a batch is image i alone.
        enable_cache(dev.transformer, TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32))
        try:
            batch = run()
            alone = dev(**{k: v[1:] for k, v in embeds(2).items()}, schedule=schedule, generator=generators(1, offset=1), output_type="latent").images
        finally:
            disable_cache(dev.transformer)
        assert not torch.allclose(batch, plain, atol=1e-6) and torch.allclose(batch[1], alone[0], atol=1e-5)
        with pytest.raises(ValueError, match=r"FirstBlockCache does not run on Flux2Transformer2DModel.*Fix: use TaylorSeerCacheConfig"):
            enable_cache(dev.transformer, FirstBlockCacheConfig(threshold=0.1))
    finally:
        del dev.transformer.cache_context
