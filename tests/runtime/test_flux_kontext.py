"""RALUFluxKontextPipeline on tiny real-class FLUX.1 Kontext pipelines (float32, CPU).

The tiny transformer, VAE and scheduler are conftest's FLUX ones: FluxKontextPipeline runs
FluxTransformer2DModel, AutoencoderKL and FLUX.1-dev's scheduler, so only the pipeline differs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ralu.runtime import RALUFluxKontextPipeline
from ralu.runtime.flux_kontext import _KontextStageModel, reference_ids_in
from ralu.runtime.flux_rotary import per_sample_positions
from ralu.runtime.models import get_model
from ralu.runtime.tokens import TokenLayout

MODEL = "flux-kontext-dev"
SIZE = 128  # pixels: latent 16x16, M = 64 full-res tokens, 16 low-res tokens
THREE_STAGES = [(2, 0.3, 3.0), (2, 0.45, 2.5), (3, 1.0, 2.2)]
K = math.floor(0.3 * 16)


def reference_image(seed: int = 0, height: int = SIZE, width: int = SIZE) -> Image.Image:
    """A small RGB reference with blocks of colour (edges for the VAE to see)."""
    rng = np.random.RandomState(seed)
    blocks = rng.randint(0, 256, size=(height // 16, width // 16, 3)).astype(np.uint8)
    return Image.fromarray(blocks.repeat(16, axis=0).repeat(16, axis=1))


def generators(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def repeat_embeds(embeds: dict, times: int) -> dict:
    return {key: value.repeat(times, *[1] * (value.ndim - 1)) for key, value in embeds.items()}


def count_calls(transformer):
    """Record (batch, tokens) of the hidden states of every transformer forward."""
    calls = []
    handle = transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(tuple(kwargs["hidden_states"].shape[:2])), with_kwargs=True)
    return calls, handle


@pytest.fixture
def kontext_pipe(flux_models):
    """A FluxKontextPipeline without text encoders (call it with prompt_embeds)."""
    from conftest import tiny_flux_scheduler
    from diffusers import FluxKontextPipeline

    transformer, vae = flux_models
    pipe = FluxKontextPipeline(scheduler=tiny_flux_scheduler(), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def ralu(kontext_pipe):
    pipe = RALUFluxKontextPipeline.from_pipe(kontext_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def three_stage(make_schedule):
    return make_schedule(THREE_STAGES, c=0.04, up_ratio=0.3, height=SIZE, width=SIZE, model=MODEL)


def one_stage(make_schedule, steps: int, size: int):
    """One full-resolution stage on FluxKontextPipeline's own sigma grid (its shift at this
    size; the base pipeline's sigmas are stage_sigmas(steps, 0, 1, h0))."""
    return make_schedule([(steps, 1.0, get_model(MODEL).base_shift(size, size, steps))], height=size, width=size, model=MODEL)


# ----------------------------------------------------------------------------------------
# (a) One full-resolution stage at the base shift is FluxKontextPipeline.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_cfg", [False, True])
def test_single_stage_reproduces_flux_kontext_pipeline(kontext_pipe, ralu, flux_embeds, make_schedule, true_cfg):
    steps, size = 4, 64
    schedule = one_stage(make_schedule, steps, size)
    kwargs = dict(flux_embeds(2, seed=1), image=reference_image(3, 64, 96), _auto_resize=False)
    if true_cfg:
        kwargs.update(flux_embeds(2, seed=2, prefix="negative_"), true_cfg_scale=2.5)
    calls, handle = count_calls(ralu.transformer)
    try:
        for output_type in ("latent", "np"):
            want = kontext_pipe(**kwargs, height=size, width=size, max_area=size * size, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type=output_type).images
            got = ralu(**kwargs, schedule=schedule, generator=torch.Generator().manual_seed(7), output_type=output_type).images
            assert got.shape == want.shape
            assert np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max() <= 1e-5
    finally:
        handle.remove()
    # Both ran with the reference's 4x6 tokens after the 4x4 generated ones.
    assert set(calls) == {(2, 16 + 24)}


def test_single_stage_reproduces_the_auto_resized_reference_and_text_to_image(kontext_pipe, ralu, flux_embeds, make_schedule):
    steps, size = 2, 64
    schedule = one_stage(make_schedule, steps, size)
    embeds = flux_embeds(1, seed=4)
    # A 64x96 image goes to the nearest preferred Kontext resolution (832x1248: 52x78 tokens).
    for image in (reference_image(5, 64, 96), None):
        calls, handle = count_calls(ralu.transformer)
        try:
            want = kontext_pipe(image=image, **embeds, height=size, width=size, max_area=size * size, num_inference_steps=steps, generator=torch.Generator().manual_seed(2), output_type="latent").images
            got = ralu(image=image, **embeds, schedule=schedule, generator=torch.Generator().manual_seed(2), output_type="latent").images
        finally:
            handle.remove()
        assert (got - want).abs().max() <= 1e-5
        assert set(calls) == {(1, 16 + (52 * 78 if image is not None else 0))}


def test_reference_given_as_latents(kontext_pipe, ralu, flux_embeds, make_schedule):
    steps, size = 2, 64
    schedule = one_stage(make_schedule, steps, size)
    latents = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(9))
    embeds = flux_embeds(1, seed=6)
    want = kontext_pipe(image=latents, **embeds, height=size, width=size, max_area=size * size, num_inference_steps=steps, generator=torch.Generator().manual_seed(1), output_type="latent").images
    got = ralu(image=latents, **embeds, schedule=schedule, generator=torch.Generator().manual_seed(1), output_type="latent").images
    assert (got - want).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------
# (b), (c) The token path and its positions.
# ----------------------------------------------------------------------------------------


def stage_model(pipe, embeds, image, images: int):
    """The Kontext stage model of a call, built as ``__call__`` builds it."""
    reference = pipe.preprocess_reference(image, auto_resize=False)
    _, packed, _, ids = pipe.prepare_latents(reference, images, 16, SIZE, SIZE, torch.float32, "cpu", None, latents=torch.empty(0))
    embeds_out, pooled, text_ids = pipe.encode_prompt(prompt=None, prompt_2=None, prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"], device="cpu")
    plan = _Plan()
    pipe.begin_call(plan, 3.5, {})
    guidance = torch.full((images,), 3.5)
    return _KontextStageModel(pipe, plan, embeds_out, pooled, text_ids, None, 1.0, guidance, torch.float32, "cpu", packed, ids), packed, ids


class _Plan:
    """What begin_call reads of a plan."""

    total_steps = 1


def test_full_token_set_through_the_mixed_stage_path_equals_the_plain_forward(ralu, flux_embeds):
    images = 2
    embeds = flux_embeds(images, seed=3)
    model, reference, reference_ids = stage_model(ralu, embeds, [reference_image(1), reference_image(2)], images)
    canvas = torch.randn(images, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    layout = TokenLayout.full(images, (SIZE // 32, SIZE // 32))
    patches = layout.gather(canvas)
    timestep = torch.full((images,), 0.6)
    # The mixed stage's path: per-image ids (generated + reference) through the rotary hook,
    # the reference appended by the stage model, its output dropped.
    ids = model.token_ids(layout)
    assert ids.shape == (images, 64 + 64, 3)
    with torch.no_grad(), per_sample_positions(ralu.transformer, [model.text_ids], ids):
        mixed_path = model._forward(patches.flatten(2), timestep, model.prompt_embeds, model.pooled_prompt_embeds, model.text_ids, ids[0], "test")
    # FluxKontextPipeline's own forward: packed latents + reference, its latent ids.
    latent_ids = torch.cat([ralu._prepare_latent_image_ids(images, SIZE // 16, SIZE // 16, "cpu", torch.float32), reference_ids], dim=0)
    packed = ralu._pack_latents(canvas, images, 16, SIZE // 8, SIZE // 8)
    with torch.no_grad():
        plain = ralu.transformer(
            hidden_states=torch.cat([packed, reference], dim=1),
            timestep=timestep,
            guidance=model.guidance,
            pooled_projections=model.pooled_prompt_embeds,
            encoder_hidden_states=model.prompt_embeds,
            txt_ids=model.text_ids,
            img_ids=latent_ids,
            return_dict=False,
        )[0][:, :64]
    assert mixed_path.shape == plain.shape == (images, 64, 64)
    torch.testing.assert_close(mixed_path, plain, atol=1e-5, rtol=0)


def test_mixed_stage_positions_are_the_full_grids_at_the_selected_tokens(ralu, flux_embeds):
    images, grid = 2, (SIZE // 32, SIZE // 32)
    model, _, reference_ids = stage_model(ralu, flux_embeds(images), reference_image(0), images)
    selected = torch.tensor([[0, 5, 6, 15], [3, 4, 9, 10]])
    mixed = TokenLayout.from_selection(selected, grid)
    full = TokenLayout.full(images, grid)
    low = TokenLayout.low(images, grid)
    mixed_ids, full_ids, low_ids = model.token_ids(mixed), model.token_ids(full), model.token_ids(low)
    generated = mixed.num_tokens
    assert mixed_ids.dtype == torch.float32 and mixed_ids.shape == (images, generated + 64, 3)
    for b in range(images):
        children = mixed_ids[b, mixed.num_low : generated]
        at_full = full_ids[b, mixed.full_index[b]]  # the full grid's ids of the same tokens
        torch.testing.assert_close(children[:, 0], at_full[:, 0], atol=0, rtol=0)
        torch.testing.assert_close(2 * children[:, 1:], at_full[:, 1:], atol=0, rtol=0)
        # A low-res token sits where its top-left child does.
        low_tokens = mixed_ids[b, : mixed.num_low, 1:]
        gw = grid[1]
        rows, cols = mixed.low_index[b] // gw, mixed.low_index[b] % gw
        torch.testing.assert_close(2 * low_tokens, full_ids[b, (2 * rows) * (2 * gw) + 2 * cols, 1:], atol=0, rtol=0)
    # The reference: FluxKontextPipeline's ids (channel 0 = 1) in the full stage, the same grid
    # in low-res units in the low and mixed stages.
    torch.testing.assert_close(full_ids[:, 64:], reference_ids[None].expand(images, -1, -1), atol=0, rtol=0)
    assert bool((reference_ids[:, 0] == 1).all())
    for ids in (mixed_ids, low_ids):
        torch.testing.assert_close(ids[:, -64:, 0], full_ids[:, 64:, 0], atol=0, rtol=0)
        torch.testing.assert_close(2 * ids[:, -64:, 1:], full_ids[:, 64:, 1:], atol=0, rtol=0)
    # So a generated token and the reference content at the same place share coordinates in
    # every stage: low-res token (i, j) and reference token (2i, 2j) (same-size reference).
    reference_grid = low_ids[0, 16:, 1:].reshape(2 * grid[0], 2 * grid[1], 2)
    torch.testing.assert_close(low_ids[0, :16, 1:].reshape(*grid, 2), reference_grid[::2, ::2], atol=0, rtol=0)


def test_rotary_tables_of_the_mixed_stage_are_the_full_grids_at_half_positions(ralu, flux_embeds):
    """The rotary values a mixed-stage token gets equal those of the full grid's id of the
    same token, measured in the stage's units (the transformer's own pos_embed)."""
    images, grid = 1, (SIZE // 32, SIZE // 32)
    model, _, _ = stage_model(ralu, flux_embeds(images), reference_image(0), images)
    mixed = TokenLayout.from_selection(torch.tensor([[1, 2, 7]]), grid)
    full_ids = model.token_ids(TokenLayout.full(images, grid))[0]
    mixed_ids = model.token_ids(mixed)[0]
    wanted = torch.cat([full_ids[mixed.full_index[0]], full_ids[64:]])
    wanted[:, 1:] = wanted[:, 1:] / 2
    got = torch.cat([mixed_ids[mixed.num_low : mixed.num_tokens], mixed_ids[mixed.num_tokens :]])
    for table_got, table_want in zip(ralu.transformer.pos_embed(got), ralu.transformer.pos_embed(wanted)):
        torch.testing.assert_close(table_got, table_want, atol=0, rtol=0)


def test_reference_ids_in_stage_units():
    ids = torch.tensor([[1.0, 3.0, 5.0]], dtype=torch.bfloat16)
    assert reference_ids_in(ids, "full").tolist() == [[1.0, 3.0, 5.0]]
    for role in ("low", "mixed"):
        halved = reference_ids_in(ids, role)
        assert halved.dtype == torch.float32 and halved.tolist() == [[1.0, 1.5, 2.5]]
    assert ids.tolist() == [[1.0, 3.0, 5.0]]  # not modified in place


# ----------------------------------------------------------------------------------------
# (d) Batches, (g) end to end with the callback.
# ----------------------------------------------------------------------------------------


def test_batch_equals_each_image_alone(ralu, flux_embeds, three_stage):
    embeds = flux_embeds(3)
    references = [reference_image(i) for i in range(3)]
    batched = {t: ralu(image=references, **embeds, schedule=three_stage, generator=generators(3), output_type=t, _auto_resize=False).images for t in ("latent", "np")}
    selected = ralu.selected_tokens
    assert len({tuple(row.tolist()) for row in selected}) > 1, "the test needs images that select different tokens"
    for i in range(3):
        one = {key: value[i : i + 1] for key, value in embeds.items()}
        for output_type, images in batched.items():
            alone = ralu(image=references[i], **one, schedule=three_stage, generator=generators(1, offset=i), output_type=output_type, _auto_resize=False).images
            assert np.abs(np.asarray(images[i]) - np.asarray(alone[0])).max() <= 1e-4
        assert torch.equal(ralu.selected_tokens[0], selected[i])


def test_the_reference_changes_the_result(ralu, flux_embeds, three_stage):
    run = lambda image: ralu(image=image, **flux_embeds(1), schedule=three_stage, generator=generators(1), output_type="latent", _auto_resize=False).images
    first, second, none = run(reference_image(0)), run(reference_image(1)), run(None)
    assert (first - second).abs().max() > 1e-3 and (first - none).abs().max() > 1e-3


def test_three_stages_end_to_end_with_callback(ralu, flux_embeds, three_stage):
    seen = []

    def callback(pipe, step, timestep, callback_kwargs):
        seen.append((step, callback_kwargs["stage_index"], tuple(callback_kwargs["latents"].shape), tuple(callback_kwargs["prompt_embeds"].shape)))
        return {}

    calls, handle = count_calls(ralu.transformer)
    try:
        out = ralu(
            image=reference_image(0),
            **flux_embeds(2),
            schedule=three_stage,
            generator=generators(2),
            output_type="np",
            _auto_resize=False,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        ).images
    finally:
        handle.remove()
    assert out.shape == (2, SIZE, SIZE, 3) and np.isfinite(out).all()
    # Generated tokens per stage (M/4, M/4 + 3k, M), the reference's 64 tokens in every forward;
    # the callback sees the generated tokens only.
    generated = [16] * 2 + [16 + 3 * K] * 2 + [64] * 3
    assert calls == [(2, n + 64) for n in generated]
    assert [s[0] for s in seen] == list(range(7)) and [s[1] for s in seen] == [0, 0, 1, 1, 2, 2, 2]
    assert [s[2] for s in seen] == [(2, n, 64) for n in generated] and seen[0][3] == (2, 8, 32)
    assert ralu.selected_tokens.shape == (2, K)


def test_edges_are_chosen_on_the_generated_image_only(ralu, flux_embeds, three_stage, monkeypatch):
    decoded = []
    decode = ralu.decode_canvas
    monkeypatch.setattr(ralu, "decode_canvas", lambda canvas: decoded.append(tuple(canvas.shape)) or decode(canvas))
    ralu(image=reference_image(0, SIZE, 2 * SIZE), **flux_embeds(1), schedule=three_stage, generator=generators(1), output_type="latent", _auto_resize=False)
    # The half-size generated latent (8x8), never the 16x32 reference.
    assert decoded == [(1, 16, 8, 8)]


def test_num_images_per_prompt_repeats_the_reference(ralu, flux_embeds, three_stage):
    embeds = flux_embeds(1)
    image = reference_image(0)
    twice = ralu(image=image, **embeds, num_images_per_prompt=2, schedule=three_stage, generator=generators(2), output_type="latent", _auto_resize=False).images
    want = ralu(image=[image, image], **repeat_embeds(embeds, 2), schedule=three_stage, generator=generators(2), output_type="latent", _auto_resize=False).images
    assert twice.shape == (2, 64, 64) and torch.allclose(twice, want, atol=1e-6)


# ----------------------------------------------------------------------------------------
# (e) Guidance: embedded guidance and true CFG.
# ----------------------------------------------------------------------------------------


def test_true_cfg_calls_twice_per_step_and_changes_the_result(ralu, flux_embeds, three_stage):
    kwargs = dict(image=reference_image(0), **flux_embeds(1), schedule=three_stage, output_type="latent", _auto_resize=False)
    negative = flux_embeds(1, seed=5, prefix="negative_")
    calls, handle = count_calls(ralu.transformer)
    try:
        cfg = ralu(**kwargs, **negative, true_cfg_scale=3.0, generator=generators(1)).images
    finally:
        handle.remove()
    assert len(calls) == 2 * three_stage.total_steps
    with pytest.warns(UserWarning, match="the negative prompt is ignored"):
        ignored = ralu(**kwargs, **negative, true_cfg_scale=1.0, generator=generators(1)).images
    plain = ralu(**kwargs, generator=generators(1)).images
    assert (cfg - plain).abs().max() > 1e-3
    assert torch.equal(ignored, plain)
    # true_cfg_scale > 1 without a negative prompt: no CFG, as in FluxKontextPipeline.
    assert torch.equal(ralu(**kwargs, true_cfg_scale=3.0, generator=generators(1)).images, plain)


def test_embedded_guidance_scale_reaches_the_transformer(ralu, flux_embeds, three_stage):
    seen = []
    handle = ralu.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["guidance"].clone()), with_kwargs=True)
    try:
        kwargs = dict(image=reference_image(0), **flux_embeds(2), schedule=three_stage, output_type="latent", _auto_resize=False)
        low = ralu(**kwargs, guidance_scale=1.5, generator=generators(2)).images
        high = ralu(**kwargs, guidance_scale=4.0, generator=generators(2)).images
    finally:
        handle.remove()
    assert seen[0].tolist() == [1.5, 1.5] and seen[-1].tolist() == [4.0, 4.0]
    assert (low - high).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------
# (f) Saving and loading.
# ----------------------------------------------------------------------------------------


@pytest.fixture
def saved_kontext_pipeline(tmp_path_factory, flux_models):
    """A complete tiny FluxKontextPipeline (conftest's tiny CLIP + T5 text stack), saved."""
    from conftest import tiny_flux_scheduler, tiny_text_stack
    from diffusers import FluxKontextPipeline

    transformer, vae = flux_models
    pipe = FluxKontextPipeline(scheduler=tiny_flux_scheduler(), vae=vae, transformer=transformer, **tiny_text_stack())
    folder = tmp_path_factory.mktemp("tiny-kontext")
    pipe.save_pretrained(folder)
    return folder


def test_saved_folder_loads_back_through_diffusers_and_the_ralu_class(ralu, tmp_path, three_stage, saved_kontext_pipeline):
    from conftest import tiny_text_stack
    from diffusers import DiffusionPipeline, FluxKontextPipeline

    full = RALUFluxKontextPipeline.from_pipe(ralu, **tiny_text_stack())
    full.save_pretrained(tmp_path)
    generic = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(generic) is FluxKontextPipeline
    loaded = RALUFluxKontextPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is RALUFluxKontextPipeline and loaded.latent_channels == 16
    kwargs = dict(image=reference_image(0), prompt="a red cat", schedule=three_stage, output_type="latent", _auto_resize=False)
    full.set_progress_bar_config(disable=True)
    want = full(**kwargs, generator=generators(1)).images
    torch.testing.assert_close(loaded(**kwargs, generator=generators(1)).images, want, atol=1e-6, rtol=0)
    # A folder saved by FluxKontextPipeline itself loads into the RALU class too.
    from_base = RALUFluxKontextPipeline.from_pretrained(saved_kontext_pipeline)
    from_base.set_progress_bar_config(disable=True)
    assert np.isfinite(from_base(**kwargs, generator=generators(1)).images.numpy()).all()


# ----------------------------------------------------------------------------------------
# Bad inputs: clear errors before any compute.
# ----------------------------------------------------------------------------------------


def test_bad_call_arguments_fail_before_compute(ralu, flux_embeds, three_stage, make_schedule, monkeypatch):
    calls, handle = count_calls(ralu.transformer)
    encodes = []
    monkeypatch.setattr(ralu.vae, "encode", lambda *a, **k: encodes.append(1))
    try:
        embeds = flux_embeds(2)
        with pytest.raises(ValueError, match=r"max_area is fixed by the schedule.*Fix: leave max_area unset"):
            ralu(image=reference_image(0), **embeds, schedule=three_stage, max_area=SIZE * SIZE)
        with pytest.raises(ValueError, match=r"3 reference images for 2 images.*Fix:"):
            ralu(image=[reference_image(i) for i in range(3)], **embeds, schedule=three_stage, _auto_resize=False)
        with pytest.raises(ValueError, match="fixed by the schedule"):
            ralu(image=reference_image(0), **embeds, schedule=three_stage, num_inference_steps=28)
        with pytest.raises(ValueError, match="family 'flux'"):
            ralu(image=reference_image(0), **embeds, schedule=make_schedule(THREE_STAGES, height=SIZE, width=SIZE))
    finally:
        handle.remove()
    assert calls == [] and encodes == []


def test_registry_record_and_cost_count_the_reference():
    from ralu.calibrate.flops.pricing import transformer_forward_flops

    spec = get_model("kontext")
    assert spec.name == MODEL and spec.family == "flux-kontext" and spec.base_steps == 28 and not spec.cfg
    assert spec.architecture == get_model("flux-dev").architecture and spec.scheduler == get_model("flux-dev").scheduler
    # A Kontext forward with n generated tokens is a FLUX.1-dev forward with n + 4096 image tokens.
    for tokens in (1024, 1330, 4096):
        kontext, flux = transformer_forward_flops(MODEL, tokens), transformer_forward_flops("flux-dev", tokens + spec.reference_tokens)
        assert kontext.total == pytest.approx(flux.total, rel=1e-12) and kontext.linear == pytest.approx(flux.linear, rel=1e-12)


# ----------------------------------------------------------------------------------------
# ralu-generate: the folder's model_index.json picks the Kontext pipeline.
# ----------------------------------------------------------------------------------------


def test_ralu_generate_runs_a_saved_kontext_folder(saved_kontext_pipeline, make_schedule, tmp_path, capsys):
    """Without --image a Kontext folder runs text-to-image, as FluxKontextPipeline does."""
    from ralu.runtime.cli import main, pipeline_class
    from ralu.runtime.schedule import save_schedule

    cls, family = pipeline_class(saved_kontext_pipeline)
    assert cls is RALUFluxKontextPipeline and family == "flux-kontext"
    schedule = save_schedule(make_schedule(THREE_STAGES, c=0.04, up_ratio=0.3, height=64, width=64, model=MODEL), tmp_path / "kontext-3x.json")
    out = tmp_path / "out"
    argv = ["--model", str(saved_kontext_pipeline), "--schedule", str(schedule), "--prompt", "a red cat", "--seed", "3", "--device", "cpu", "--out", str(out)]
    assert main(argv + ["--negative-prompt", "blue dog", "--true-cfg-scale", "2.0"]) == 0
    (image,) = sorted(out.glob("*.png"))
    with Image.open(image) as png:
        assert png.size == (64, 64) and png.text["seed"] == "3" and png.text["negative_prompt"] == "blue dog"
        parameters = png.text["parameters"]
    assert '"guidance_scale": 3.5' in parameters and '"true_cfg_scale": 2.0' in parameters
    assert "s/image" in capsys.readouterr().out


def test_ralu_generate_edits_the_image_given_with_image(saved_kontext_pipeline, make_schedule, tmp_path, capsys):
    import hashlib
    import json

    from ralu.runtime.cli import main
    from ralu.runtime.schedule import save_schedule

    schedule = save_schedule(make_schedule(THREE_STAGES, c=0.04, up_ratio=0.3, height=64, width=64, model=MODEL), tmp_path / "kontext-3x.json")
    reference = tmp_path / "reference.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(reference)
    argv = ["--model", str(saved_kontext_pipeline), "--schedule", str(schedule), "--prompt", "a red cat", "--seed", "3", "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path / "plain")]) == 0
    assert main(argv + ["--image", str(reference), "--out", str(tmp_path / "edit")]) == 0
    (plain,), (edit,) = sorted((tmp_path / "plain").glob("*.png")), sorted((tmp_path / "edit").glob("*.png"))
    with Image.open(edit) as png:
        recorded = json.loads(png.text["parameters"])["image"]
        edited = np.asarray(png.convert("RGB"))
    assert recorded == {"file": "reference.png", "sha256": hashlib.sha256(reference.read_bytes()).hexdigest()}
    with Image.open(plain) as png:
        assert "image" not in json.loads(png.text["parameters"])
        assert not np.array_equal(np.asarray(png.convert("RGB")), edited)  # the reference reached the transformer

    # A file that is not an image, and --image for a family without a reference, are one line.
    capsys.readouterr()
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(argv + ["--image", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ralu-generate: error: --image") and "is not a readable image" in error and error.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_ralu_generate_refuses_image_for_a_text_only_family(saved_flux_pipeline, make_schedule, tmp_path, capsys):
    from ralu.runtime.cli import main
    from ralu.runtime.schedule import save_schedule

    schedule = save_schedule(make_schedule(THREE_STAGES, c=0.04, up_ratio=0.3, height=64, width=64), tmp_path / "flux-3x.json")
    reference = tmp_path / "reference.png"
    Image.new("RGB", (64, 64)).save(reference)
    argv = ["--model", str(saved_flux_pipeline), "--schedule", str(schedule), "--prompt", "a cat", "--image", str(reference), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "--image: FLUX.1 generates from text only" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# Step caches (the transformer has diffusers' CacheMixin): contexts per stage and branch.
# ----------------------------------------------------------------------------------------


def test_first_block_cache_runs_in_stage_contexts_and_keeps_batch_equal_to_alone(flux_models, flux_embeds, three_stage):
    from conftest import tiny_flux_scheduler, tiny_flux_transformer
    from diffusers.hooks import FirstBlockCacheConfig

    from ralu.runtime.cache import disable_cache, enable_cache

    pipe = RALUFluxKontextPipeline(tiny_flux_scheduler(), flux_models[1], None, None, None, None, tiny_flux_transformer())
    pipe.set_progress_bar_config(disable=True)
    embeds = {**flux_embeds(2), **flux_embeds(2, seed=4, prefix="negative_")}
    references = [reference_image(0), reference_image(1)]

    def run(config, images=(0, 1)):
        contexts = []
        original = pipe.transformer.cache_context

        def record(name):
            contexts.append(name)
            return original(name)

        inputs = {key: value[list(images)] for key, value in embeds.items()}
        if config is not None:
            enable_cache(pipe.transformer, config)
        pipe.transformer.cache_context = record
        try:
            out = pipe(
                image=[references[i] for i in images],
                **inputs,
                true_cfg_scale=2.0,
                schedule=three_stage,
                generator=[torch.Generator().manual_seed(10 + i) for i in images],
                output_type="latent",
                _auto_resize=False,
            ).images
        finally:
            del pipe.transformer.cache_context
            if config is not None:
                disable_cache(pipe.transformer)
        return out, contexts

    plain, contexts = run(None)
    never, _ = run(FirstBlockCacheConfig(threshold=0.0))
    assert torch.equal(never, plain)
    steps = [stage.steps for stage in three_stage.stages]
    assert contexts == [f"stage{stage}-{branch}" for stage, n in zip((1, 2, 3), steps) for _ in range(n) for branch in ("cond", "uncond")]
    skipping, _ = run(FirstBlockCacheConfig(threshold=1e9))
    assert not torch.allclose(skipping, plain, atol=1e-6), "the cache must skip work for this test to mean anything"
    for i in (0, 1):
        alone, _ = run(FirstBlockCacheConfig(threshold=1e9), images=(i,))
        assert torch.allclose(skipping[i], alone[0], atol=1e-5)
