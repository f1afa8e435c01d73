"""RALUFluxPipeline on tiny real-class FLUX models (float32, CPU)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from ralu.runtime import RALUFluxPipeline, ScheduleError
from ralu.runtime.flux_rotary import per_sample_positions, supports_per_sample_positions
from ralu.runtime.models import get_model

SIZE = 128  # pixels: latent 16x16, M = 64 full-res tokens, 16 low-res tokens
THREE_STAGES = [(2, 0.3, 3.0), (2, 0.45, 2.5), (3, 1.0, 2.2)]


def base_shift(size: int) -> float:
    """FLUX.1-dev's own shift at size x size: what FluxPipeline's grid uses."""
    return get_model("flux-dev").base_shift(size, size)


@pytest.fixture
def ralu(flux_pipe):
    pipe = RALUFluxPipeline.from_pipe(flux_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def three_stage(make_schedule):
    return make_schedule(THREE_STAGES, c=0.04, up_ratio=0.3, height=SIZE, width=SIZE)


def generators(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def count_calls(transformer):
    """Record (batch, image tokens) of every transformer forward; returns (calls, handle)."""
    calls = []
    handle = transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(tuple(kwargs["hidden_states"].shape[:2])), with_kwargs=True)
    return calls, handle


# ----------------------------------------------------------------------------------------
# Anchor: one full-resolution stage with the base shift is FluxPipeline.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_cfg", [False, True])
def test_single_stage_reproduces_flux_pipeline(flux_pipe, ralu, flux_embeds, make_schedule, true_cfg):
    steps, size = 5, 64
    schedule = make_schedule([(steps, 1.0, base_shift(size))], height=size, width=size)
    kwargs = flux_embeds(2, seed=1)
    if true_cfg:
        kwargs.update(flux_embeds(2, seed=2, prefix="negative_"), true_cfg_scale=2.5)
    for output_type in ("latent", "np"):
        want = flux_pipe(**kwargs, height=size, width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type=output_type).images
        got = ralu(**kwargs, schedule=schedule, generator=torch.Generator().manual_seed(7), output_type=output_type).images
        assert got.shape == want.shape
        assert np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max() <= 1e-5


# ----------------------------------------------------------------------------------------
# Stages, token counts, calls.
# ----------------------------------------------------------------------------------------


def test_one_call_per_step_with_stage_token_counts(ralu, flux_embeds, three_stage):
    calls, handle = count_calls(ralu.transformer)
    try:
        ralu(**flux_embeds(2), schedule=three_stage, generator=generators(2), output_type="latent")
    finally:
        handle.remove()
    m, k = 64, math.floor(0.3 * 16)
    expected = [(2, m // 4)] * 2 + [(2, m // 4 + 3 * k)] * 2 + [(2, m)] * 3
    assert calls == expected
    assert ralu.selected_tokens.shape == (2, k)


def test_true_cfg_calls_twice_per_step_and_changes_the_result(ralu, flux_embeds, three_stage):
    kwargs = dict(**flux_embeds(1), schedule=three_stage, output_type="latent")
    negative = flux_embeds(1, seed=5, prefix="negative_")
    calls, handle = count_calls(ralu.transformer)
    try:
        cfg = ralu(**kwargs, **negative, true_cfg_scale=3.0, generator=generators(1)).images
    finally:
        handle.remove()
    assert len(calls) == 2 * three_stage.total_steps
    with pytest.warns(UserWarning, match="the negative prompt is ignored"):
        plain = ralu(**kwargs, **negative, true_cfg_scale=1.0, generator=generators(1)).images
    assert (cfg - plain).abs().max() > 1e-3


def test_two_stage_schedule(ralu, flux_embeds, make_schedule):
    schedule = make_schedule([(2, 0.4, 3.0), (3, 1.0, 2.0)], c=0.04, height=SIZE, width=SIZE)
    calls, handle = count_calls(ralu.transformer)
    try:
        out = ralu(**flux_embeds(1), schedule=schedule, generator=generators(1), output_type="np").images
    finally:
        handle.remove()
    assert [tokens for _, tokens in calls] == [16] * 2 + [64] * 3
    assert out.shape == (1, SIZE, SIZE, 3) and ralu.selected_tokens is None


def test_non_square_resolution(ralu, flux_embeds, make_schedule):
    # 96 x 64 px: latent 12 x 8, M = 24 full-res tokens, 6 low-res, k = floor(0.5 * 6) = 3.
    schedule = make_schedule(THREE_STAGES, c=0.04, up_ratio=0.5, height=96, width=64)
    calls, handle = count_calls(ralu.transformer)
    try:
        images = ralu(**flux_embeds(2), schedule=schedule, generator=generators(2), output_type="np").images
    finally:
        handle.remove()
    assert images.shape == (2, 96, 64, 3)
    assert [tokens for _, tokens in calls] == [6] * 2 + [6 + 3 * 3] * 2 + [24] * 3
    again = ralu(**flux_embeds(2), schedule=schedule, generator=generators(2), output_type="np").images
    assert np.array_equal(again, images)  # same generators, same images


# ----------------------------------------------------------------------------------------
# Batches: per-image token selection, one batched forward, image i == image i alone.
# ----------------------------------------------------------------------------------------


def test_batch_equals_each_image_alone(ralu, flux_embeds, three_stage):
    embeds = flux_embeds(3)
    batched = {t: ralu(**embeds, schedule=three_stage, generator=generators(3), output_type=t).images for t in ("latent", "np")}
    selected = ralu.selected_tokens
    assert len({tuple(row.tolist()) for row in selected}) > 1, "the test needs images that select different tokens"
    for i in range(3):
        one = {key: value[i : i + 1] for key, value in embeds.items()}
        for output_type, images in batched.items():
            alone = ralu(**one, schedule=three_stage, generator=generators(1, offset=i), output_type=output_type).images
            assert np.abs(np.asarray(images[i]) - np.asarray(alone[0])).max() <= 1e-4
        assert torch.equal(ralu.selected_tokens[0], selected[i])


def test_num_images_per_prompt(ralu, flux_embeds, three_stage):
    embeds = flux_embeds(1)
    twice = ralu(**embeds, num_images_per_prompt=2, schedule=three_stage, generator=generators(2), output_type="latent").images
    repeated = {key: value.repeat(2, *[1] * (value.ndim - 1)) for key, value in embeds.items()}
    want = ralu(**repeated, schedule=three_stage, generator=generators(2), output_type="latent").images
    assert twice.shape == (2, 64, 64) and torch.allclose(twice, want, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_per_sample_positions_equal_separate_forwards(flux_models, fused):
    from conftest import tiny_flux_transformer

    transformer = flux_models[0]
    if fused:  # fused QKV projections (a fresh model: the shared one stays unfused)
        transformer = tiny_flux_transformer()
        transformer.fuse_qkv_projections()
    g = torch.Generator().manual_seed(3)
    b, n, t = 3, 10, 5
    hidden = torch.randn(b, n, 64, generator=g)
    text = torch.randn(b, t, 32, generator=g)
    common = dict(pooled_projections=torch.randn(b, 32, generator=g), timestep=torch.full((b,), 0.7), guidance=torch.full((b,), 3.5), return_dict=False)
    txt_ids = torch.zeros(t, 3)
    ids = torch.zeros(b, n, 3)
    ids[..., 1:] = torch.rand(b, n, 2, generator=g) * 8
    seen = []
    handle = transformer.register_forward_hook(lambda *args: seen.append(1))
    try:
        with torch.no_grad(), per_sample_positions(transformer, [txt_ids], ids):
            batched = transformer(hidden_states=hidden, encoder_hidden_states=text, txt_ids=txt_ids, img_ids=ids[0], **common)[0]
        with torch.no_grad():
            single = [
                transformer(
                    hidden_states=hidden[i : i + 1],
                    encoder_hidden_states=text[i : i + 1],
                    txt_ids=txt_ids,
                    img_ids=ids[i],
                    **{key: (value[i : i + 1] if isinstance(value, torch.Tensor) else value) for key, value in common.items()},
                )[0]
                for i in range(b)
            ]
            shared = transformer(hidden_states=hidden, encoder_hidden_states=text, txt_ids=txt_ids, img_ids=ids[0], **common)[0]
    finally:
        handle.remove()
    assert len(seen) == 2 + b  # hooks on the transformer see every forward
    for i in range(b):
        assert torch.allclose(batched[i], single[i][0], atol=1e-5)
    assert not torch.allclose(batched[1], shared[1], atol=1e-3)  # positions matter
    assert supports_per_sample_positions(transformer)  # default processors restored


def test_custom_processor_falls_back_to_one_forward_per_image(flux_embeds, flux_models, three_stage):
    from conftest import tiny_flux_scheduler, tiny_flux_transformer
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class Custom(FluxAttnProcessor):
        pass

    transformer = tiny_flux_transformer()
    transformer.set_attn_processor(Custom())
    assert not supports_per_sample_positions(transformer)
    pipe = RALUFluxPipeline(tiny_flux_scheduler(), flux_models[1], None, None, None, None, transformer)
    pipe.set_progress_bar_config(disable=True)
    embeds = flux_embeds(2)
    batched = pipe(**embeds, schedule=three_stage, generator=generators(2), output_type="latent").images
    assert pipe.selected_tokens[0].tolist() != pipe.selected_tokens[1].tolist()
    alone = pipe(**{k: v[1:] for k, v in embeds.items()}, schedule=three_stage, generator=generators(1, offset=1), output_type="latent").images
    assert torch.allclose(batched[1], alone[0], atol=1e-4)
    assert all(type(p) is Custom for p in transformer.attn_processors.values())


# ----------------------------------------------------------------------------------------
# Call conventions.
# ----------------------------------------------------------------------------------------


def test_output_types_and_latents_argument(ralu, flux_embeds, three_stage):
    embeds = flux_embeds(1)
    pil = ralu(**embeds, schedule=three_stage, generator=generators(1)).images
    assert len(pil) == 1 and pil[0].size == (SIZE, SIZE)
    as_np = ralu(**embeds, schedule=three_stage, generator=generators(1), output_type="np").images
    assert as_np.shape == (1, SIZE, SIZE, 3)
    latent = ralu(**embeds, schedule=three_stage, generator=generators(1), output_type="latent").images
    assert latent.shape == (1, 64, 64)
    # latents=: the full-size packed noise FluxPipeline would draw gives the same image (the
    # generator, which then only draws the transition noise, continues after that draw).
    gen = generators(1)
    noise, _ = ralu.prepare_latents(1, 16, SIZE, SIZE, torch.float32, "cpu", gen)
    same = ralu(**embeds, schedule=three_stage, latents=noise.clone(), generator=gen, output_type="latent").images
    assert torch.allclose(same, latent, atol=1e-6)
    # The half-size first-stage noise derived from it (2x2 block sums / 2) is refused: only
    # full-size latents, in both families (tests/runtime/test_diffusers_habits.py).
    full = noise.view(1, 8, 8, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 16, 16)
    half = full.view(1, 16, 8, 2, 8, 2).sum(dim=(3, 5)) / 2
    half_packed = half.view(1, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 64)
    with pytest.raises(ValueError, match=r"half-size noise is not accepted.*Fix: pass full-size noise of shape \(1, 64, 64\)"):
        ralu(**embeds, schedule=three_stage, latents=half_packed, generator=generators(1), output_type="latent")
    as_tuple = ralu(**embeds, schedule=three_stage, return_dict=False, generator=generators(1), output_type="np")
    assert isinstance(as_tuple, tuple) and np.array_equal(as_tuple[0], as_np)


def test_callback_sees_stages_and_can_edit_latents(ralu, flux_embeds, three_stage):
    seen = []

    def callback(pipe, step, timestep, callback_kwargs):
        seen.append((step, callback_kwargs["stage_index"], callback_kwargs["stage_step"], pipe.stage_index, tuple(callback_kwargs["latents"].shape), float(timestep)))
        return {}

    ralu(**flux_embeds(1), schedule=three_stage, generator=generators(1), output_type="latent", callback_on_step_end=callback)
    assert [s[0] for s in seen] == list(range(7))
    assert [s[1] for s in seen] == [0, 0, 1, 1, 2, 2, 2] and [s[3] for s in seen] == [s[1] for s in seen]
    assert [s[2] for s in seen] == [0, 1, 0, 1, 0, 1, 2]
    assert [s[4][1] for s in seen] == [16, 16, 28, 28, 64, 64, 64]
    assert seen[0][5] == pytest.approx(1000 * three_stage.sigmas(0)[0])

    def zero_at_end(pipe, step, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step == 6 else {}

    out = ralu(**flux_embeds(1), schedule=three_stage, generator=generators(1), output_type="latent", callback_on_step_end=zero_at_end).images
    assert out.abs().max() == 0


def test_progress_bar_shows_stage_and_step(ralu, flux_embeds, three_stage):
    stream = io.StringIO()
    ralu.set_progress_bar_config(file=stream, mininterval=0)
    ralu(**flux_embeds(1), schedule=three_stage, generator=generators(1), output_type="latent")
    text = stream.getvalue()
    assert "stage 1/3 (low) step 2/2" in text and "stage 3/3 (full) step 3/3" in text and "7/7" in text


def test_lora_on_the_pipe_keeps_working(tmp_path, flux_embeds, flux_models, three_stage):
    pytest.importorskip("peft")
    from conftest import tiny_flux_scheduler, tiny_flux_transformer
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = tiny_flux_transformer()
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]))
    RALUFluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(donor))

    pipe = RALUFluxPipeline(tiny_flux_scheduler(), flux_models[1], None, None, None, None, tiny_flux_transformer())
    pipe.set_progress_bar_config(disable=True)
    embeds = flux_embeds(2)
    run = lambda **kw: pipe(**embeds, schedule=three_stage, generator=generators(2), output_type="latent", **kw).images
    base = run()
    pipe.load_lora_weights(tmp_path, adapter_name="test")
    with_lora = run()
    assert (with_lora - base).abs().max() > 1e-3
    assert torch.allclose(run(joint_attention_kwargs={"scale": 0.0}), base, atol=1e-5)
    # The adapter also acts in the mixed stage's per-image-position path: batch == alone.
    alone = pipe(**{k: v[1:] for k, v in embeds.items()}, schedule=three_stage, generator=generators(1, offset=1), output_type="latent").images
    assert torch.allclose(with_lora[1], alone[0], atol=1e-4)


def test_paper_compat(ralu, flux_embeds, three_stage):
    from ralu.runtime.noise import clear_global_noise

    clear_global_noise()
    kwargs = dict(**flux_embeds(2), schedule=three_stage, output_type="latent")
    exact = ralu(**kwargs, generator=generators(2)).images
    paper = ralu(**kwargs, generator=generators(2), paper_compat=True).images
    assert (paper - exact).abs().max() > 1e-3
    for switch in ("repeat_tokens", "unit_noise", "clip_decode", "global_noise", "subsample_noise"):
        ralu(**kwargs, generator=generators(2), paper_compat=[switch])
    with pytest.raises(ValueError, match="unknown switch"):
        ralu(**kwargs, generator=generators(2), paper_compat=["h0"])


@pytest.mark.parametrize("compat", [["subsample_noise"], True])
def test_subsample_noise_starts_stage_1_from_every_second_pixel_of_the_full_noise(ralu, flux_embeds, three_stage, compat):
    from diffusers.utils.torch_utils import randn_tensor

    calls = []
    handle = ralu.transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["hidden_states"].clone()), with_kwargs=True)
    try:
        ralu(**flux_embeds(1), schedule=three_stage, generator=generators(1), output_type="latent", paper_compat=compat)
        ralu(**flux_embeds(1), schedule=three_stage, generator=generators(1), output_type="latent")
    finally:
        handle.remove()
    first_call_of_each_run = calls[0], calls[len(calls) // 2]
    channels, latent = ralu.transformer.config.in_channels // 4, SIZE // 8
    # The full-size noise FluxPipeline draws for this seed, in latent-pixel space.
    full = randn_tensor((1, channels, latent, latent), generator=generators(1)[0], dtype=torch.float32)
    subsampled = full[..., ::2, ::2]
    packed = ralu._pack_latents(subsampled, 1, channels, latent // 2, latent // 2)
    assert torch.equal(first_call_of_each_run[0], packed)
    default = ralu._pack_latents(torch.nn.functional.avg_pool2d(full, 2) * 2, 1, channels, latent // 2, latent // 2)
    torch.testing.assert_close(first_call_of_each_run[1], default)


# ----------------------------------------------------------------------------------------
# Bad inputs: clear errors before any compute.
# ----------------------------------------------------------------------------------------


@pytest.fixture
def no_compute(ralu, monkeypatch):
    """The pipeline, checked afterwards to have run neither the transformer nor the VAE."""
    calls, handle = count_calls(ralu.transformer)
    decodes = []
    decode = ralu.vae.decode
    monkeypatch.setattr(ralu.vae, "decode", lambda *a, **k: decodes.append(1) or decode(*a, **k))
    yield ralu
    handle.remove()
    assert calls == [] and decodes == []


def test_bad_resolution(no_compute, flux_embeds, three_stage):
    with pytest.raises(ValueError, match="multiple of 32"):
        no_compute(**flux_embeds(1), schedule=three_stage, height=SIZE + 16)
    with pytest.raises(ScheduleError, match="calibrated for 128x128"):
        no_compute(**flux_embeds(1), schedule=three_stage, height=SIZE + 32)


def test_bad_schedules(no_compute, flux_embeds, make_schedule, tmp_path, three_stage):
    embeds = flux_embeds(1)
    with pytest.raises(ScheduleError, match="family 'sd3'"):
        no_compute(**embeds, schedule=make_schedule(THREE_STAGES, height=SIZE, width=SIZE, model="sd3-medium"))
    with pytest.raises(ScheduleError, match="4 stages"):
        no_compute(**embeds, schedule=make_schedule([(1, 0.2, 3.0), (1, 0.3, 3.0), (1, 0.5, 3.0), (1, 1.0, 3.0)], height=SIZE, width=SIZE))
    with pytest.raises(ScheduleError, match="required"):
        no_compute(**embeds)
    with pytest.raises(ScheduleError, match="no schedule file"):
        no_compute(**embeds, schedule="flux-dev-0x")
    truncated = tmp_path / "truncated.json"
    truncated.write_text(three_stage.model_dump_json()[:100])
    with pytest.raises(ScheduleError, match="not valid JSON"):
        no_compute(**embeds, schedule=truncated)
    inconsistent = json.loads(three_stage.model_dump_json())
    inconsistent["stages"][1]["start"] = 0.2
    path = tmp_path / "inconsistent.json"
    path.write_text(json.dumps(inconsistent))
    with pytest.raises(ScheduleError, match=r"stages\.1\.start"):
        no_compute(**embeds, schedule=str(path))
    with pytest.raises(ScheduleError, match=r"stages\.1\.start"):
        no_compute(**embeds, schedule=inconsistent)


def test_bad_call_arguments(no_compute, flux_embeds, three_stage):
    embeds = flux_embeds(2)
    with pytest.raises(ValueError, match="fixed by the schedule"):
        no_compute(**embeds, schedule=three_stage, num_inference_steps=28)
    with pytest.raises(ValueError, match="one generator per image"):
        no_compute(**embeds, schedule=three_stage, generator=generators(3))
    with pytest.raises(ValueError, match="latents of shape"):
        no_compute(**embeds, schedule=three_stage, latents=torch.zeros(2, 10, 64))
    with pytest.raises(ValueError, match="output_type"):
        no_compute(**embeds, schedule=three_stage, output_type="jpeg")


def test_bfloat16_model_keeps_float32_positions(flux_embeds, three_stage):
    from conftest import tiny_flux_scheduler, tiny_flux_transformer, tiny_flux_vae

    pipe = RALUFluxPipeline(tiny_flux_scheduler(), tiny_flux_vae(), None, None, None, None, tiny_flux_transformer()).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    ids = []
    handle = pipe.transformer.pos_embed.register_forward_pre_hook(lambda module, args: ids.append(args[0]))
    try:
        embeds = {k: v.bfloat16() for k, v in flux_embeds(1).items()}
        image = pipe(**embeds, schedule=three_stage, generator=generators(1), output_type="np").images
    finally:
        handle.remove()
    assert np.isfinite(image).all()
    mixed = ids[2]  # first step of the mixed stage (batch of one: the shared-ids path)
    assert mixed.dtype == torch.float32 and bool(((mixed[:, 1:] % 1) == 0.5).any())
