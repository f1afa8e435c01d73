"""RALUQwenImagePipeline on tiny real-class Qwen-Image models (float32, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from qwenimage_models import qwen_embeds, qwen_scheduler, tiny_qwen_text_stack, tiny_qwen_transformer, tiny_qwen_vae

from ralu.runtime import RALUQwenImagePipeline
from ralu.runtime.models import get_model
from ralu.runtime.qwenimage import stretch_to_terminal
from ralu.runtime.qwenimage_rotary import grid_table, rotary_table, stage_positions, supports_per_image_positions, token_positions
from ralu.runtime.tokens import TokenLayout

MODEL = "qwen-image"
SIZE = 128  # pixels: latent 16x16, M = 64 full-res tokens, 16 low-res tokens
THREE_STAGES = [(2, 0.3, 3.0), (2, 0.45, 2.5), (3, 1.0, 2.2)]


@pytest.fixture(scope="module")
def qwen_models():
    """(transformer, vae): shared, never modified by tests."""
    return tiny_qwen_transformer(), tiny_qwen_vae()


@pytest.fixture
def base_pipe(qwen_models):
    """A QwenImagePipeline without a text encoder (call it with prompt_embeds)."""
    from diffusers import QwenImagePipeline

    transformer, vae = qwen_models
    pipe = QwenImagePipeline(scheduler=qwen_scheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def ralu(base_pipe):
    pipe = RALUQwenImagePipeline.from_pipe(base_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def three_stage(make_schedule):
    return make_schedule(THREE_STAGES, c=0.04, up_ratio=0.3, height=SIZE, width=SIZE, model=MODEL)


def generators(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def record_calls(transformer):
    """Record (batch, image tokens, text mask) of every transformer forward; returns (calls, handle)."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((tuple(kwargs["hidden_states"].shape[:2]), kwargs["encoder_hidden_states_mask"]))

    return calls, transformer.register_forward_pre_hook(hook, with_kwargs=True)


# ----------------------------------------------------------------------------------------
# (a) One full-resolution stage at the base shift is QwenImagePipeline.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_cfg", [False, True])
def test_single_stage_reproduces_qwen_image_pipeline(base_pipe, ralu, make_schedule, true_cfg):
    steps, size = 5, 64
    spec = get_model(MODEL)
    schedule = make_schedule([(steps, 1.0, spec.base_shift(size, size, steps))], height=size, width=size, model=MODEL)
    kwargs = dict(**qwen_embeds(2, seed=1, padded=2))
    if true_cfg:
        kwargs.update(qwen_embeds(2, seed=2, length=5, prefix="negative_", padded=1), true_cfg_scale=2.5)
    for output_type in ("latent", "np"):
        want = base_pipe(**kwargs, height=size, width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type=output_type).images
        got = ralu(**kwargs, schedule=schedule, generator=torch.Generator().manual_seed(7), output_type=output_type).images
        assert got.shape == want.shape
        assert np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max() <= 1e-5
    # The grid is the scheduler's own, shift_terminal stretch included.
    np.testing.assert_allclose(ralu.plan(schedule).stages[0].sigmas, base_pipe.scheduler.sigmas.numpy(), atol=1e-6)


def test_registry_scheduler_is_the_published_one():
    # Qwen/Qwen-Image scheduler/scheduler_config.json.
    config = qwen_scheduler().config
    published = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential")
    assert {key: config[key] for key in published} == published
    spec = get_model("qwen")
    assert spec.name == MODEL and spec.vae_scale_factor == 8 and spec.latent_channels == 16
    # exp(mu) at 1024x1024 (4096 tokens): mu = 0.5 + 0.4 * 3840 / 7936.
    assert spec.base_shift(1024, 1024) == pytest.approx(math.exp(0.5 + 0.4 * 3840 / 7936), rel=1e-12)


def test_terminal_stretch_keeps_the_stage_start_and_ends_at_shift_terminal(ralu, three_stage):
    plan = ralu.plan(three_stage)
    last, plain = plan.stages[-1].sigmas, three_stage.sigmas(2)
    assert last[0] == pytest.approx(plain[0], abs=1e-12) and last[-1] == 0.0 and last[-2] == pytest.approx(0.02, abs=1e-12)
    assert np.all(np.diff(last) < 0)
    for early, planned in zip(plan.stages[:-1], (three_stage.sigmas(0), three_stage.sigmas(1))):
        assert np.array_equal(early.sigmas, planned)  # only the last stage is stretched
    one_step = np.array([0.4, 0.0])
    assert np.array_equal(stretch_to_terminal(one_step, 0.02), one_step)


# ----------------------------------------------------------------------------------------
# (c) Positions: native grids for low and full stages; the mixed stage's at the full grid's.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(4, 4), (4, 6)])
def test_positions_are_the_transformers_own_rotary_values(qwen_models, grid):
    pos_embed = qwen_models[0].pos_embed
    gh, gw = grid
    low = rotary_table(pos_embed, token_positions(TokenLayout.low(1, grid))[0])
    assert torch.equal(low, grid_table(pos_embed, gh, gw))  # stage 1: a native half-size image
    full = rotary_table(pos_embed, token_positions(TokenLayout.full(1, grid))[0])
    full_grid = grid_table(pos_embed, 2 * gh, 2 * gw)
    assert torch.equal(full, full_grid)  # stage 3: a native full-size image

    selected = torch.tensor([[0, 5, 7], [2, 3, gh * gw - 1]])
    mixed = TokenLayout.from_selection(selected, grid)
    table = rotary_table(pos_embed, token_positions(mixed))
    for b in range(2):
        low_part, child_part = table[b, : mixed.num_low], table[b, mixed.num_low :]
        # Low-res tokens keep their stage-1 positions.
        assert torch.equal(low_part, low[mixed.low_index[b]])
        # Children sit at the full grid's positions in low-res units (half steps): a rotation
        # by half the angle, applied twice, is the full grid's rotation at that token.
        assert torch.allclose(child_part * child_part, full_grid[mixed.full_index[b]], atol=1e-5)
        # A child (0, 0) sits exactly on its parent.
        parents = selected[b].sort().values
        firsts = [i for i, flat in enumerate(mixed.full_index[b].tolist()) if (flat // (2 * gw)) % 2 == 0 and (flat % (2 * gw)) % 2 == 0]
        parent_of = [(mixed.full_index[b][i] // (2 * gw) // 2) * gw + (mixed.full_index[b][i] % (2 * gw)) // 2 for i in firsts]
        assert sorted(int(p) for p in parent_of) == parents.tolist()
        for i, parent in zip(firsts, parent_of):
            assert torch.equal(child_part[i], low[int(parent)])


# ----------------------------------------------------------------------------------------
# (b) A full-resolution token set through the token path is the plain forward.
# ----------------------------------------------------------------------------------------


def forward_inputs(batch=2, n_side=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    embeds = qwen_embeds(batch, seed=seed, padded=2)
    return dict(
        hidden_states=torch.randn(batch, n_side * n_side, 64, generator=g),
        encoder_hidden_states=embeds["prompt_embeds"],
        encoder_hidden_states_mask=embeds["prompt_embeds_mask"],
        timestep=torch.full((batch,), 0.7),
        img_shapes=[[(1, n_side, n_side)]] * batch,
        return_dict=False,
    )


@pytest.mark.parametrize("per_image", [False, True])
def test_full_token_set_through_the_token_path_is_the_plain_forward(qwen_models, per_image):
    transformer = qwen_models[0]
    inputs = forward_inputs()
    layout = TokenLayout.full(2, (4, 4))
    positions = token_positions(layout)
    with torch.no_grad():
        plain = transformer(**inputs)[0]
        if not per_image:
            with stage_positions(transformer, rotary_table(transformer.pos_embed, positions[0])):
                hooked = transformer(**inputs)[0]
            assert torch.allclose(hooked, plain, atol=1e-6)
            return
        # Every image its own token order: per-image tables, one forward.
        orders = torch.stack([torch.arange(64), torch.randperm(64, generator=torch.Generator().manual_seed(1))])
        shuffled = dict(inputs, hidden_states=inputs["hidden_states"][torch.arange(2)[:, None], orders])
        table = rotary_table(transformer.pos_embed, positions[torch.arange(2)[:, None], orders])
        seen = []
        handle = transformer.register_forward_hook(lambda *args: seen.append(1))
        try:
            with stage_positions(transformer, table):
                hooked = transformer(**shuffled)[0]
        finally:
            handle.remove()
    assert len(seen) == 1  # one forward, seen by the transformer's hooks
    assert torch.allclose(hooked, plain[torch.arange(2)[:, None], orders], atol=1e-5)
    assert supports_per_image_positions(transformer)  # default processors restored


# ----------------------------------------------------------------------------------------
# (g) Three stages end to end; (d) batches; (e) true CFG.
# ----------------------------------------------------------------------------------------


def test_three_stages_token_counts_and_callback(ralu, three_stage):
    calls, handle = record_calls(ralu.transformer)
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append((step, kwargs["stage_index"], kwargs["stage_step"], tuple(kwargs["latents"].shape), tuple(kwargs["prompt_embeds"].shape)))
        return {}

    try:
        images = ralu(**qwen_embeds(2, padded=2), schedule=three_stage, generator=generators(2), output_type="np",
                      callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images
    finally:
        handle.remove()
    m, k = 64, math.floor(0.3 * 16)
    expected = [m // 4] * 2 + [m // 4 + 3 * k] * 2 + [m] * 3
    assert [shape for shape, _ in calls] == [(2, n) for n in expected]
    assert all(mask is not None and mask.shape == (2, 7) for _, mask in calls)  # the text mask reaches every forward
    assert [(step, stage) for step, stage, *_ in seen] == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert [s[3] for s in seen] == [(2, n, 64) for n in expected] and all(s[4] == (2, 7, 32) for s in seen)
    assert images.shape == (2, SIZE, SIZE, 3) and np.isfinite(images).all()
    assert ralu.selected_tokens.shape == (2, k)


def test_batch_equals_each_image_alone(ralu, three_stage):
    embeds = qwen_embeds(3, padded=2)
    batched = ralu(**embeds, schedule=three_stage, generator=generators(3), output_type="latent").images
    selected = ralu.selected_tokens
    assert len({tuple(row.tolist()) for row in selected}) > 1, "the test needs images that select different tokens"
    for i in range(3):
        one = {key: value[i : i + 1] for key, value in embeds.items()}
        alone = ralu(**one, schedule=three_stage, generator=generators(1, offset=i), output_type="latent").images
        assert (batched[i] - alone[0]).abs().max() <= 1e-4
        assert torch.equal(ralu.selected_tokens[0], selected[i])


def test_custom_processor_falls_back_to_one_forward_per_image(ralu, base_pipe, three_stage):
    from diffusers import QwenImagePipeline
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    class Custom(QwenDoubleStreamAttnProcessor2_0):
        pass

    transformer = tiny_qwen_transformer()
    transformer.set_attn_processor(Custom())
    assert not supports_per_image_positions(transformer)
    custom = RALUQwenImagePipeline.from_pipe(QwenImagePipeline(scheduler=qwen_scheduler(), vae=base_pipe.vae, text_encoder=None, tokenizer=None, transformer=transformer))
    custom.set_progress_bar_config(disable=True)
    embeds = qwen_embeds(3, padded=2)
    want = ralu(**embeds, schedule=three_stage, generator=generators(3), output_type="latent").images
    assert len({tuple(row.tolist()) for row in ralu.selected_tokens}) > 1
    calls, handle = record_calls(transformer)
    try:
        got = custom(**embeds, schedule=three_stage, generator=generators(3), output_type="latent").images
    finally:
        handle.remove()
    assert [shape[0] for shape, _ in calls] == [3, 3] + [1] * 6 + [3] * 3  # stage 2: one forward per image
    assert (got - want).abs().max() <= 1e-5


def test_true_cfg_in_every_stage_with_the_negative_mask(ralu, three_stage):
    kwargs = dict(**qwen_embeds(2, padded=2), schedule=three_stage, output_type="latent")
    negative = qwen_embeds(2, seed=5, length=4, prefix="negative_", padded=1)
    calls, handle = record_calls(ralu.transformer)
    try:
        cfg = ralu(**kwargs, **negative, true_cfg_scale=3.0, generator=generators(2)).images
    finally:
        handle.remove()
    assert len(calls) == 2 * three_stage.total_steps
    masks = [mask for _, mask in calls]
    assert all(torch.equal(m, kwargs["prompt_embeds_mask"]) for m in masks[0::2])
    assert all(torch.equal(m, negative["negative_prompt_embeds_mask"]) for m in masks[1::2])
    with pytest.warns(UserWarning, match="the negative prompt is ignored"):
        plain = ralu(**kwargs, **negative, true_cfg_scale=1.0, generator=generators(2)).images
    without = ralu(**kwargs, true_cfg_scale=3.0, generator=generators(2)).images  # no negative: no CFG
    assert torch.equal(plain, without)
    assert (cfg - plain).abs().max() > 1e-3
    assert torch.isfinite(cfg).all()


def test_true_cfg_rescales_the_combination_to_the_conditional_norm(ralu, make_schedule, monkeypatch):
    # Replace the transformer's output by known predictions and read the velocity the stage uses.
    schedule = make_schedule([(1, 1.0, 2.0)], height=64, width=64, model=MODEL)
    cond, uncond = torch.randn(1, 16, 64), torch.randn(1, 16, 64)
    outputs = iter([cond, uncond])
    monkeypatch.setattr(type(ralu.transformer), "forward", lambda self, **kwargs: (next(outputs),))
    noise = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    got = ralu(**qwen_embeds(1), **qwen_embeds(1, seed=4, prefix="negative_"), true_cfg_scale=3.0, latents=noise, schedule=schedule, output_type="latent").images
    combined = uncond + 3.0 * (cond - uncond)
    velocity = combined * cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    assert torch.allclose(got, noise + velocity * (0.0 - 1.0), atol=1e-5)


def test_refuses_edit_variants_and_steps(ralu, three_stage):
    with pytest.raises(ValueError, match="num_inference_steps is fixed by the schedule"):
        ralu(**qwen_embeds(1), schedule=three_stage, num_inference_steps=10)
    edit = RALUQwenImagePipeline.from_pipe(ralu)
    edit.transformer = None
    transformer = tiny_qwen_transformer()
    transformer.register_to_config(zero_cond_t=True)
    edit.register_modules(transformer=transformer)
    with pytest.raises(ValueError, match=r"zero_cond_t=True .*\. Fix: load a Qwen-Image text-to-image transformer"):
        edit.plan(three_stage)


# ----------------------------------------------------------------------------------------
# (f) Saving and loading.
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_qwen_pipeline(tmp_path_factory, qwen_models):
    """A complete tiny QwenImagePipeline (tiny Qwen2.5-VL and tokenizer) saved with
    save_pretrained; returns its folder."""
    from diffusers import QwenImagePipeline

    transformer, vae = qwen_models
    pipe = QwenImagePipeline(scheduler=qwen_scheduler(), vae=vae, transformer=transformer, **tiny_qwen_text_stack())
    folder = tmp_path_factory.mktemp("tiny-qwen-image")
    RALUQwenImagePipeline.from_pipe(pipe).save_pretrained(folder)  # the RALU class saves a base-class folder
    return folder


def test_saved_folder_loads_with_diffusers_and_the_ralu_class(saved_qwen_pipeline, three_stage):
    from diffusers import DiffusionPipeline, QwenImagePipeline

    generic = DiffusionPipeline.from_pretrained(saved_qwen_pipeline, local_files_only=True)
    assert type(generic) is QwenImagePipeline
    loaded = RALUQwenImagePipeline.from_pretrained(saved_qwen_pipeline, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.shift_terminal == 0.02
    from_pipe = RALUQwenImagePipeline.from_pipe(generic)
    from_pipe.set_progress_bar_config(disable=True)
    prompts = dict(prompt=["a red cat", "a dog on the moon"], negative_prompt=" ", true_cfg_scale=4.0)
    want = from_pipe(**prompts, schedule=three_stage, generator=generators(2), output_type="latent").images
    got = loaded(**prompts, schedule=three_stage, generator=generators(2), output_type="latent").images
    assert got.shape == (2, 64, 64) and torch.isfinite(got).all()
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------
# ralu-generate picks the pipeline from model_index.json.
# ----------------------------------------------------------------------------------------


def test_ralu_generate_runs_a_saved_qwen_image_folder(saved_qwen_pipeline, three_stage, tmp_path):
    from PIL import Image

    from ralu.runtime.cli import main, pipeline_class
    from ralu.runtime.schedule import save_schedule

    cls, family = pipeline_class(saved_qwen_pipeline)
    assert cls is RALUQwenImagePipeline and family == MODEL
    save_schedule(three_stage, tmp_path / "schedule.json")
    code = main(["--model", str(saved_qwen_pipeline), "--schedule", str(tmp_path / "schedule.json"), "--prompt", "a red cat",
                 "--negative-prompt", "dog", "--true-cfg-scale", "4.0", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    written = sorted((tmp_path / "out").glob("*.png"))
    assert len(written) == 1 and Image.open(written[0]).size == (SIZE, SIZE)
