"""RALUStableDiffusion3Pipeline on tiny SD3 / SD3.5-style models built offline."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sd3_models import pipeline_components, text_inputs, tiny_transformer

from ralu.runtime import RALUStableDiffusion3Pipeline, ScheduleError, load_schedule, shipped_schedules
from ralu.runtime import sd3 as sd3_module
from ralu.runtime.tokens import TokenLayout

SIZE = 128  # latent 16x16: low-res token grid 4x4 (M/4 = 16), full-res 8x8 (M = 64)
THREE_STAGES = [(2, 0.3, 5.0), (2, 0.5, 2.5), (3, 1.0, 2.0)]


def generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def one(inputs: dict, index: int) -> dict:
    return {key: value[index : index + 1] for key, value in inputs.items()}


@pytest.fixture(params=["sd3", "sd3.5"])
def variant(request):
    return request.param


@pytest.fixture
def base_pipe(variant):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**pipeline_components(variant))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(base_pipe):
    ralu = RALUStableDiffusion3Pipeline.from_pipe(base_pipe)
    ralu.set_progress_bar_config(disable=True)
    return ralu


@pytest.fixture
def sd3_pipe():
    ralu = RALUStableDiffusion3Pipeline(**pipeline_components("sd3"))
    ralu.set_progress_bar_config(disable=True)
    return ralu


@pytest.fixture
def three_stage(make_schedule):
    return make_schedule(THREE_STAGES, c=0.05, up_ratio=0.3, height=SIZE, width=SIZE, model="sd3-medium")


class EvaluationLog:
    """Every transformer evaluation (model forward or token path): image tokens and batch,
    seen at ``proj_out`` (called exactly once per evaluation in both paths)."""

    def __init__(self, transformer):
        self.shapes: list[tuple[int, int]] = []
        self.handle = transformer.proj_out.register_forward_hook(lambda module, args, out: self.shapes.append(tuple(args[0].shape[:2])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ----------------------------------------------------------------------------------------
# Reproduction of StableDiffusion3Pipeline
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip_layers", [None, [1]])
def test_single_full_stage_reproduces_sd3_pipeline(base_pipe, pipe, make_schedule, skip_layers):
    steps = 5
    schedule = make_schedule([(steps, 1.0, 3.0)], height=SIZE, width=SIZE, model="sd3-medium")
    inputs = text_inputs(2)
    extra = {} if skip_layers is None else {"skip_guidance_layers": skip_layers, "skip_layer_guidance_start": 0.01, "skip_layer_guidance_stop": 0.6}
    # The base scheduler shifts the sigmas it is given by its own shift (3.0): hand it the
    # un-shifted grid of the schedule's single stage.
    unshifted = np.linspace(1.0, 0.0, steps + 1)[:-1].tolist()
    reference = base_pipe(**inputs, height=SIZE, width=SIZE, sigmas=unshifted, generator=generators(3, 4), output_type="latent", **extra).images
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy()[:-1], schedule.sigmas(0)[:-1], atol=1e-6)
    out = pipe(**inputs, schedule=schedule, generator=generators(3, 4), output_type="latent", **extra).images
    assert out.shape == reference.shape == (2, 16, SIZE // 8, SIZE // 8)
    assert (out - reference).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------
# Stages: token counts, evaluations, guidance, positions
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["crop", "stretch"])
def test_one_evaluation_per_step_and_token_counts(pipe, three_stage, mode):
    inputs = text_inputs(2)
    with EvaluationLog(pipe.transformer) as log:
        pipe(**inputs, schedule=three_stage, generator=generators(0, 1), output_type="latent", low_res_positions=mode)
    m = (SIZE // 16) ** 2
    k = int(np.floor(0.3 * m / 4))
    expected = [(4, m // 4)] * 2 + [(4, m // 4 + 3 * k)] * 2 + [(4, m)] * 3  # CFG: batch 2 x 2
    assert log.shapes == expected
    assert pipe.selected_tokens.shape == (2, k)


def test_two_stage_schedule_and_skip_layer_guidance_in_every_stage(pipe, make_schedule, three_stage):
    inputs = text_inputs(1)
    two = make_schedule([(2, 0.4, 4.0), (3, 1.0, 2.0)], c=0.05, height=SIZE, width=SIZE, model="sd3-medium")
    m = (SIZE // 16) ** 2
    with EvaluationLog(pipe.transformer) as log:
        pipe(**inputs, schedule=two, generator=generators(0), output_type="latent")
    assert log.shapes == [(2, m // 4)] * 2 + [(2, m)] * 3
    assert pipe.selected_tokens is None
    # Skip-layer guidance with a window covering everything: one extra (positive-half) forward per step.
    with EvaluationLog(pipe.transformer) as log:
        out = pipe(**inputs, schedule=three_stage, generator=generators(0), output_type="latent", skip_guidance_layers=[0], skip_layer_guidance_start=-1.0, skip_layer_guidance_stop=2.0)
    k = int(np.floor(0.3 * m / 4))
    counts = [m // 4] * 2 + [m // 4 + 3 * k] * 2 + [m] * 3
    assert log.shapes == [shape for n in counts for shape in ((2, n), (1, n))]
    assert torch.isfinite(out.images).all()


def test_cfg_halves_share_the_token_selection(pipe, three_stage, monkeypatch):
    seen = []
    original = sd3_module.sd3_tokens.token_forward

    def spy(transformer, patches, positions, *args, **kwargs):
        seen.append((patches, positions))
        return original(transformer, patches, positions, *args, **kwargs)

    monkeypatch.setattr(sd3_module.sd3_tokens, "token_forward", spy)
    pipe(**text_inputs(2), schedule=three_stage, generator=generators(5, 6), output_type="latent")
    assert len(seen) == 2  # the two mixed-stage steps (crop: stages 1 and 3 use forward)
    for patches, positions in seen:
        assert positions.shape[0] == patches.shape[0] == 4
        assert torch.equal(positions[:2], positions[2:]) and torch.equal(patches[:2], patches[2:])


def test_position_conventions(pipe):
    transformer = pipe.transformer
    grid = (4, 5)
    low = TokenLayout.low(1, grid)
    crop = sd3_module.table_positions(transformer, low, "crop")[0]
    assert torch.equal(crop, sd3_module.sd3_tokens.grid_positions(transformer, *grid))  # a native half-size image
    stretch = sd3_module.table_positions(transformer, low, "stretch")[0]
    full_grid = sd3_module.sd3_tokens.grid_positions(transformer, 8, 10).reshape(8, 10, 2)
    assert torch.equal(stretch, full_grid[::2, ::2].reshape(-1, 2))  # the full-size crop at double step
    full = sd3_module.table_positions(transformer, TokenLayout.full(1, grid), "crop")[0]
    assert torch.equal(full, full_grid.reshape(-1, 2))
    mixed = TokenLayout.from_selection(torch.tensor([[7]]), grid)  # low-res token (1, 2) upsampled
    for mode, step in (("crop", 0.5), ("stretch", 1.0)):
        positions = sd3_module.table_positions(transformer, mixed, mode)[0]
        parent = sd3_module.table_positions(transformer, low, mode)[0, 7]
        children = positions[mixed.num_low :]
        offsets = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.float32) * step
        assert torch.equal(children, parent + offsets)


# ----------------------------------------------------------------------------------------
# Batches and noise
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["crop", "stretch"])
def test_batch_equivalence(sd3_pipe, three_stage, mode):
    inputs = text_inputs(3, seed=7)
    batch = sd3_pipe(**inputs, schedule=three_stage, generator=generators(10, 11, 12), output_type="latent", low_res_positions=mode).images
    selected = sd3_pipe.selected_tokens
    assert len({tuple(row.tolist()) for row in selected}) > 1, "test is weak: every image chose the same tokens"
    for i in range(3):
        alone = sd3_pipe(**one(inputs, i), schedule=three_stage, generator=generators(10 + i), output_type="latent", low_res_positions=mode).images
        assert torch.equal(sd3_pipe.selected_tokens[0], selected[i])
        assert (alone[0] - batch[i]).abs().max().item() <= 1e-4


def _oracle(self, patches, timestep, *args, **kwargs):
    """Exact velocity when the data is 0: x_sigma = sigma * noise, v = x / sigma."""
    return patches / (timestep.float() / 1000.0).reshape(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("compat", [False, ["unit_noise"]])
def test_noise_injection_statistics(sd3_pipe, make_schedule, monkeypatch, compat):
    """With the exact velocity of all-zero data every state must be sigma * N(0, I): unit
    per-pixel variance (after dividing by sigma) and no covariance inside the 2x2 blocks that
    upsampling copied one value to.  ``unit_noise`` (the published script's N(0, I) on tokens
    not upsampled at a transition) must show its excess: variance 1 + c on those tokens, and
    1 + c^2 with covariance c^2 where such tokens are upsampled at the next transition."""
    c = 0.2
    schedule = make_schedule(THREE_STAGES, c=c, up_ratio=0.5, height=SIZE, width=SIZE, model="sd3-medium")
    monkeypatch.setattr(sd3_module._SD3StageModel, "transformer_output", _oracle)
    states = {}

    def record(pipe, step, timestep, kwargs):
        if kwargs["stage_step"] == 0:
            states[kwargs["stage_index"]] = kwargs["latents"].clone()
        return {}

    count = 32
    inputs = {key: value.expand(count, *value.shape[1:]) for key, value in text_inputs(1).items()}
    sd3_pipe(**inputs, schedule=schedule, generator=generators(*range(count)), output_type="latent", callback_on_step_end=record, paper_compat=compat)
    m = (SIZE // 16) ** 2 // 4
    k = m // 2
    full_before = TokenLayout.from_selection(sd3_pipe.selected_tokens, (SIZE // 32, SIZE // 32)).pixel_mask()[:, 0, ::2, ::2].flatten(1)
    for stage in (1, 2):
        x = states[stage].reshape(count, -1, 16, 2, 2) / float(schedule.sigmas(stage)[1])  # N(0, I) expected
        if stage == 1:  # mixed: the kept low-res tokens, then the 4k children just upsampled
            kept, fresh = x[:, : m - k], x[:, m - k :]
            fresh_var, fresh_cov = 1.0, 0.0
        else:  # full: tokens full-res since stage 2, and the children of tokens upsampled now
            kept = x[full_before].reshape(count, -1, 16, 2, 2)
            fresh = x[~full_before].reshape(count, -1, 16, 2, 2)
            fresh_var, fresh_cov = (1.0 + c * c, c * c) if compat else (1.0, 0.0)
        kept_var = 1.0 + c if compat else 1.0
        assert abs(fresh.mean().item()) < 0.03
        assert abs(fresh.var().item() - fresh_var) < 0.04
        assert abs(kept.var().item() - kept_var) < 0.05
        # covariance of horizontal neighbours inside the 2x2 blocks of freshly upsampled pixels
        block = fresh.flatten(0, 2)
        assert abs((block[..., 0] * block[..., 1]).mean().item() - fresh_cov) < 0.02


def test_noise_comes_from_the_callers_generator(sd3_pipe, three_stage):
    inputs = text_inputs(1)
    a = sd3_pipe(**inputs, schedule=three_stage, generator=generators(1), output_type="latent").images
    torch.manual_seed(123)
    b = sd3_pipe(**inputs, schedule=three_stage, generator=generators(1), output_type="latent").images
    c = sd3_pipe(**inputs, schedule=three_stage, generator=generators(2), output_type="latent").images
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_paper_compat_runs_and_differs(sd3_pipe, three_stage):
    inputs = text_inputs(1)
    exact = sd3_pipe(**inputs, schedule=three_stage, generator=generators(1), output_type="latent").images
    compat = sd3_pipe(**inputs, schedule=three_stage, generator=generators(1), output_type="latent", paper_compat=True).images
    assert torch.isfinite(compat).all() and not torch.allclose(exact, compat)


# ----------------------------------------------------------------------------------------
# Callbacks, progress, loading, shipped schedules, errors
# ----------------------------------------------------------------------------------------


def test_callbacks_and_progress_are_stage_aware(sd3_pipe, three_stage):
    calls = []

    def callback(pipe, step, timestep, kwargs):
        calls.append((step, kwargs["stage_index"], kwargs["stage_step"], tuple(kwargs["latents"].shape), tuple(kwargs["pooled_prompt_embeds"].shape)))
        if step == 6:  # last step: zero the state
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    buffer = io.StringIO()
    sd3_pipe.set_progress_bar_config(file=buffer, mininterval=0, ascii=True)
    out = sd3_pipe(**text_inputs(1), schedule=three_stage, generator=generators(0), output_type="latent", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "pooled_prompt_embeds"])
    m = (SIZE // 16) ** 2
    k = int(np.floor(0.3 * m / 4))
    tokens = [m // 4] * 2 + [m // 4 + 3 * k] * 2 + [m] * 3
    assert [call[:3] for call in calls] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1), (4, 2, 0), (5, 2, 1), (6, 2, 2)]
    assert [call[3] for call in calls] == [(1, n, 64) for n in tokens]
    assert all(call[4] == (2, 32) for call in calls)
    assert torch.count_nonzero(out.images) == 0
    assert (sd3_pipe.stage_index, sd3_pipe.stage_step) == (2, 2)
    text = buffer.getvalue()
    assert "stage 1/3 (low)" in text and "stage 2/3 (mixed)" in text and "stage 3/3 (full) step 3/3" in text


def test_from_pretrained_and_from_pipe(tmp_path, base_pipe, three_stage):
    missing = {name: None for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")}
    base_pipe.save_pretrained(tmp_path)
    loaded = RALUStableDiffusion3Pipeline.from_pretrained(tmp_path, **missing)
    loaded.set_progress_bar_config(disable=True)
    from_pipe = RALUStableDiffusion3Pipeline.from_pipe(base_pipe)
    from_pipe.set_progress_bar_config(disable=True)
    assert isinstance(loaded, RALUStableDiffusion3Pipeline) and from_pipe.transformer is base_pipe.transformer
    inputs = text_inputs(1)
    a = loaded(**inputs, schedule=three_stage, generator=generators(0), output_type="np").images
    b = from_pipe(**inputs, schedule=three_stage, generator=generators(0), output_type="np").images
    assert a.shape == (1, SIZE, SIZE, 3) and np.abs(a - b).max() <= 1e-5


@pytest.mark.parametrize("name", ["sd3-medium-2x", "sd3-medium-3x"])
def test_shipped_sd3_schedules_run(name):
    if name not in shipped_schedules():
        pytest.skip(f"{name}.json is not shipped")
    schedule = load_schedule(name)
    assert schedule.family == "sd3" and len(schedule.stages) == 3
    components = pipeline_components("sd3")
    components["transformer"] = tiny_transformer(pos_embed_max_size=schedule.height // 16)
    pipe = RALUStableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    m = (schedule.height // 16) * (schedule.width // 16)
    k = int(np.floor(schedule.up_ratio * m / 4))
    with EvaluationLog(pipe.transformer) as log:
        out = pipe(**text_inputs(1), schedule=name, generator=generators(0), output_type="latent").images
    steps = [stage.steps for stage in schedule.stages]
    assert [n for _, n in log.shapes] == [m // 4] * steps[0] + [m // 4 + 3 * k] * steps[1] + [m] * steps[2]
    assert out.shape == (1, 16, schedule.height // 8, schedule.width // 8) and torch.isfinite(out).all()


def test_clear_errors(sd3_pipe, make_schedule, three_stage):
    inputs = text_inputs(1)
    with pytest.raises(ScheduleError, match="family 'flux'"):
        sd3_pipe(**inputs, schedule=make_schedule(THREE_STAGES, height=SIZE, width=SIZE, model="flux-dev"))
    with pytest.raises(ScheduleError, match="a schedule is required"):
        sd3_pipe(**inputs)
    bad = three_stage.model_dump()
    bad["stages"][1]["start"] = 0.9
    with pytest.raises(ScheduleError, match="stages.1.start"):
        sd3_pipe(**inputs, schedule=bad)
    with pytest.raises(ValueError, match="multiple of 32"):
        sd3_pipe(**inputs, schedule=make_schedule(THREE_STAGES, height=SIZE, width=SIZE, model="sd3-medium"), height=SIZE + 16)
    with pytest.raises(ScheduleError, match="calibrated for 128x128"):
        sd3_pipe(**inputs, schedule=three_stage, height=SIZE + 32)
    with pytest.raises(ValueError, match="position table"):
        sd3_pipe(**inputs, schedule=make_schedule(THREE_STAGES, height=1024, width=1024, model="sd3-medium"))
    with pytest.raises(ValueError, match="num_inference_steps is fixed by the schedule"):
        sd3_pipe(**inputs, schedule=three_stage, num_inference_steps=28)
    with pytest.raises(ValueError, match="low_res_positions"):
        sd3_pipe(**inputs, schedule=three_stage, low_res_positions="middle")
    with pytest.raises(ValueError, match="latents of shape"):
        sd3_pipe(**inputs, schedule=three_stage, latents=torch.zeros(1, 16, 5, 5))
    with pytest.raises(ValueError, match="generators for 1 images"):
        sd3_pipe(**inputs, schedule=three_stage, generator=generators(0, 1))
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        sd3_pipe(**inputs, schedule=three_stage, skip_guidance_layers=[5])


def test_one_position_mode_check_serves_the_call_its_default_and_table_positions(sd3_pipe, three_stage, monkeypatch):
    message = "low_res_positions='middle' is unknown. Fix: use one of ('crop', 'stretch')"
    assert sd3_module.check_position_mode("stretch") == "stretch"
    with pytest.raises(ValueError) as error:
        sd3_module.table_positions(sd3_pipe.transformer, None, mode="middle")
    assert str(error.value) == message
    monkeypatch.setattr(sd3_pipe, "low_res_positions", "middle")  # the pipeline's default, not the call's argument
    with pytest.raises(ValueError) as error:
        sd3_pipe(**text_inputs(1), schedule=three_stage)
    assert str(error.value) == message


def test_num_images_per_prompt_and_output_types(sd3_pipe, three_stage):
    inputs = text_inputs(1)
    two = sd3_pipe(**inputs, schedule=three_stage, num_images_per_prompt=2, generator=generators(0, 1), output_type="pt").images
    repeated = {key: value.expand(2, *value.shape[1:]) for key, value in inputs.items()}
    same = sd3_pipe(**repeated, schedule=three_stage, generator=generators(0, 1), output_type="pt").images
    assert two.shape == (2, 3, SIZE, SIZE) and (two - same).abs().max().item() <= 1e-5
    pil = sd3_pipe(**inputs, schedule=three_stage, generator=generators(0), return_dict=False)[0]
    assert pil[0].size == (SIZE, SIZE)
    with pytest.raises(ValueError, match="output_type"):
        sd3_pipe(**inputs, schedule=three_stage, output_type="jpeg")


def test_given_full_size_latents_and_refused_half_size(sd3_pipe, three_stage):
    inputs = text_inputs(1)
    gen = generators(1)
    noise = sd3_pipe.prepare_latents(1, 16, SIZE, SIZE, torch.float32, "cpu", gen)
    from_full = sd3_pipe(**inputs, schedule=three_stage, latents=noise, generator=gen, output_type="latent").images
    drawn = sd3_pipe(**inputs, schedule=three_stage, generator=generators(1), output_type="latent").images
    assert (from_full - drawn).abs().max().item() <= 1e-5
    half = noise.reshape(1, 16, SIZE // 16, 2, SIZE // 16, 2).sum(dim=(3, 5)) / 2
    with pytest.raises(ValueError, match=r"half-size noise is not accepted.*Fix: pass full-size noise of shape \(1, 16, 16, 16\)"):
        sd3_pipe(**inputs, schedule=three_stage, latents=half, generator=generators(1), output_type="latent")


@pytest.mark.parametrize("mode", ["crop", "stretch"])
def test_every_step_runs_the_transformer_forward(sd3_pipe, three_stage, mode):
    """Forward hooks (and so diffusers' caches and a compiled forward) see every step: the
    mixed stage goes through ``transformer.forward`` too, 7 forwards for 2 + 2 + 3 steps."""
    calls = []
    handle = sd3_pipe.transformer.register_forward_hook(lambda module, args, kwargs, out: calls.append(tuple(kwargs["hidden_states"].shape)), with_kwargs=True)
    try:
        sd3_pipe(**text_inputs(2), schedule=three_stage, generator=generators(1, 2), output_type="latent", low_res_positions=mode)
    finally:
        handle.remove()
    assert len(calls) == 7
    k = int(np.floor(0.3 * 64 / 4))
    assert calls[2][-1] == 2 * (16 + 3 * k)  # the mixed stage: a one-row strip of its tokens
