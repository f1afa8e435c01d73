"""RALUChromaPipeline on tiny real-class Chroma models (float32, CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from chroma_models import components, embeds

from ralu.runtime import RALUChromaPipeline
from ralu.runtime.flux import image_ids
from ralu.runtime.flux_rotary import per_sample_positions
from ralu.runtime.models import get_model
from ralu.runtime.tokens import TokenLayout

SPEC = get_model("chroma")
SIZE = 128  # latent 16x16: M = 64 full-res tokens, 16 low-res tokens
THREE_STAGES = [(2, 0.3, 3.0), (2, 0.45, 2.5), (3, 1.0, 2.2)]


def generators(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


@pytest.fixture(scope="module")
def parts():
    return components(with_text=True)


@pytest.fixture
def base(parts):
    from diffusers import ChromaPipeline

    pipe = ChromaPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def ralu(base):
    pipe = RALUChromaPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def three_stage(make_schedule):
    return make_schedule(THREE_STAGES, c=0.04, up_ratio=0.3, height=SIZE, width=SIZE, model="chroma")


class Forwards:
    """Every transformer forward: (batch, image tokens, mask length or None) and its output."""

    def __init__(self, transformer):
        self.inputs, self.outputs = [], []

        def pre(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            text = kwargs["encoder_hidden_states"].shape[1]
            self.inputs.append((*kwargs["hidden_states"].shape[:2], text, None if mask is None else tuple(mask.shape)))

        self.handles = [
            transformer.register_forward_pre_hook(pre, with_kwargs=True),
            transformer.register_forward_hook(lambda module, args, out: self.outputs.append(out[0].clone())),
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------------------------
# (a) One full-resolution stage at the base shift is ChromaPipeline.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs", ["embeds, guidance off", "embeds + negative, CFG", "prompts, CFG with the default negative", "prompts + negative, CFG"])
def test_single_stage_reproduces_chroma_pipeline(base, ralu, make_schedule, inputs):
    size, steps = 64, SPEC.base_steps
    schedule = make_schedule([(steps, 1.0, SPEC.base_shift(size, size, steps))], height=size, width=size, model="chroma")
    if inputs.startswith("embeds"):
        kwargs = embeds(2, seed=1)
        if "negative" in inputs:
            kwargs.update(embeds(2, seed=2, valid=3, prefix="negative_"), guidance_scale=4.0)
        else:
            kwargs.update(guidance_scale=1.0)
    else:
        kwargs = {"prompt": ["a red cat", "photo of the blue dog"], "guidance_scale": 5.0}
        if "negative" in inputs:
            kwargs["negative_prompt"] = ["dog", "a cat"]
    for output_type in ("latent", "np"):
        want = base(**kwargs, height=size, width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type=output_type).images
        got = ralu(**kwargs, schedule=schedule, generator=torch.Generator().manual_seed(7), output_type=output_type).images
        assert got.shape == want.shape
        assert np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max() <= 1e-5


# ----------------------------------------------------------------------------------------
# The T5 attention mask, right for every stage's token count.
# ----------------------------------------------------------------------------------------


def test_every_stage_masks_its_own_joint_sequence(ralu, three_stage):
    kwargs = dict(**embeds(2, length=8), **embeds(2, seed=3, length=6, valid=2, prefix="negative_"), guidance_scale=3.0)
    with Forwards(ralu.transformer) as log:
        ralu(**kwargs, schedule=three_stage, generator=generators(2), output_type="latent")
    k = math.floor(0.3 * 16)
    tokens = [batch_tokens[1] for batch_tokens in log.inputs]
    assert tokens == [16] * 4 + [16 + 3 * k] * 4 + [64] * 6  # cond and uncond per step
    for batch, image_tokens, text, mask in log.inputs:
        assert mask == (batch, text + image_tokens)
    assert {text for _, _, text, _ in log.inputs} == {8, 6}


@pytest.mark.parametrize("masked", [True, False])
def test_masked_text_never_reaches_the_image_in_any_stage(ralu, three_stage, masked):
    """A boolean mask (all but the first pad token off): the padded embeddings' values do not
    change any forward of any stage, cond or uncond; without the mask they do (the check can
    fail)."""
    runs = []
    for fill in (0.0, 50.0):
        kwargs = dict(**embeds(2, valid=5, dtype=torch.bool), **embeds(2, seed=3, valid=3, dtype=torch.bool, prefix="negative_"), guidance_scale=3.0)
        for prefix, valid in (("", 5), ("negative_", 3)):
            kwargs[f"{prefix}prompt_embeds"][:, valid:] = fill
            if not masked:
                kwargs[f"{prefix}prompt_attention_mask"][:] = True
        with Forwards(ralu.transformer) as log:
            ralu(**kwargs, schedule=three_stage, generator=generators(2), output_type="latent")
        runs.append(log)
    assert {tokens for _, tokens, _, _ in runs[0].inputs} == {16, 28, 64}  # low, mixed, full
    differences = [float((a - b).abs().max()) for a, b in zip(runs[0].outputs, runs[1].outputs)]
    if masked:
        assert max(differences) <= 1e-6
    else:
        assert min(differences) > 1e-4


# ----------------------------------------------------------------------------------------
# (b), (c): the mixed-stage token path and its positions.
# ----------------------------------------------------------------------------------------


def test_per_image_positions_with_mask_equal_plain_forwards(ralu):
    """The full-resolution token set, in a different token order per image, through the
    mixed stage's per-image path (positions hook, default-equivalent processor, the mask)
    equals the plain forward of each image in ChromaPipeline's own order."""
    transformer = ralu.transformer
    g = torch.Generator().manual_seed(4)
    b, grid, t = 2, (4, 4), 8
    grid_ids = ralu._prepare_latent_image_ids(1, *grid, "cpu", torch.float32)
    n = grid_ids.shape[0]
    hidden = torch.randn(b, n, 64, generator=g)
    prompt = embeds(b, seed=5, length=t, valid=4)
    mask = ralu._prepare_attention_mask(b, n, torch.float32, prompt["prompt_attention_mask"])
    order = torch.stack([torch.arange(n), torch.randperm(n, generator=g)])
    ids = grid_ids[order]
    shuffled = hidden[torch.arange(b)[:, None], order]
    common = dict(encoder_hidden_states=prompt["prompt_embeds"], timestep=torch.full((b,), 0.6), txt_ids=torch.zeros(t, 3), attention_mask=mask, return_dict=False)
    with torch.no_grad():
        with per_sample_positions(transformer, [torch.zeros(t, 3)], ids):
            batched = transformer(hidden_states=shuffled, img_ids=ids[0], **common)[0]
        for i in range(b):
            alone = transformer(
                hidden_states=hidden[i : i + 1], img_ids=grid_ids, **{k: (v[i : i + 1] if k in ("encoder_hidden_states", "timestep", "attention_mask") else v) for k, v in common.items()}
            )[0]
            assert torch.allclose(batched[i], alone[0, order[i]], atol=1e-5)
    assert not torch.allclose(batched[1], alone[0], atol=1e-3)  # the order (so the positions) mattered


def test_mixed_stage_positions_equal_the_full_grid(ralu):
    grid = (4, 4)
    selected = torch.tensor([[0, 5, 6], [3, 9, 15]])
    layout = TokenLayout.from_selection(selected, grid, "mixed")
    ids = image_ids(layout)
    full_grid = ralu._prepare_latent_image_ids(1, 2 * grid[0], 2 * grid[1], "cpu", torch.float32)
    low_grid = ralu._prepare_latent_image_ids(1, *grid, "cpu", torch.float32)
    for i in range(2):
        # Low-res tokens sit where ChromaPipeline puts the tokens of the half-size image; the
        # upsampled children where it puts the full-size tokens, in low-res units (halved).
        assert torch.equal(ids[i, : layout.num_low], low_grid[layout.low_index[i]])
        assert torch.equal(ids[i, layout.num_low :] * 2, full_grid[layout.full_index[i]])
    # The rotary values the transformer uses for image i are its pos_embed of image i's ids.
    txt_ids = torch.zeros(3, 3)
    seen = []
    with per_sample_positions(ralu.transformer, [txt_ids], ids):
        handle = ralu.transformer.pos_embed.register_forward_hook(lambda module, args, out: seen.append(out))
        try:
            ralu.transformer.pos_embed(torch.cat([txt_ids, ids[0]]))
        finally:
            handle.remove()
    cos, sin = seen[0]
    for i in range(2):
        want_cos, want_sin = ralu.transformer.pos_embed(torch.cat([txt_ids, ids[i]]))
        assert torch.equal(cos[i], want_cos) and torch.equal(sin[i], want_sin)


# ----------------------------------------------------------------------------------------
# (d) Batches, (e) guidance branches.
# ----------------------------------------------------------------------------------------


def test_batch_equals_each_image_alone(ralu, three_stage):
    inputs = dict(**embeds(3, seed=1), **embeds(3, seed=2, valid=3, prefix="negative_"))
    batched = ralu(**inputs, guidance_scale=4.0, schedule=three_stage, generator=generators(3), output_type="latent").images
    selected = ralu.selected_tokens
    assert len({tuple(row.tolist()) for row in selected}) > 1, "the test needs images that select different tokens"
    for i in range(3):
        one = {key: value[i : i + 1] for key, value in inputs.items()}
        alone = ralu(**one, guidance_scale=4.0, schedule=three_stage, generator=generators(1, offset=i), output_type="latent").images
        assert torch.allclose(batched[i], alone[0], atol=1e-4)
        assert torch.equal(ralu.selected_tokens[0], selected[i])


def test_custom_processor_falls_back_to_one_forward_per_image_with_its_mask(three_stage):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class Custom(FluxAttnProcessor):
        pass

    pipe = RALUChromaPipeline(**components())
    pipe.transformer.set_attn_processor(Custom())
    pipe.set_progress_bar_config(disable=True)
    inputs = dict(**embeds(2, seed=1, valid=3, dtype=torch.bool), **embeds(2, seed=2, valid=6, dtype=torch.bool, prefix="negative_"))
    batched = pipe(**inputs, guidance_scale=4.0, schedule=three_stage, generator=generators(2), output_type="latent").images
    assert pipe.selected_tokens[0].tolist() != pipe.selected_tokens[1].tolist()
    one = {key: value[1:] for key, value in inputs.items()}
    alone = pipe(**one, guidance_scale=4.0, schedule=three_stage, generator=generators(1, offset=1), output_type="latent").images
    assert torch.allclose(batched[1], alone[0], atol=1e-4)
    assert all(type(p) is Custom for p in pipe.transformer.attn_processors.values())


def test_num_images_per_prompt_repeats_given_embeddings(ralu, three_stage):
    inputs = dict(**embeds(1, seed=1), **embeds(1, seed=2, prefix="negative_"))
    twice = ralu(**inputs, num_images_per_prompt=2, schedule=three_stage, generator=generators(2), output_type="latent").images
    repeated = {key: value.repeat(2, 1, *[1] * (value.ndim - 2)) for key, value in inputs.items()}
    want = ralu(**repeated, schedule=three_stage, generator=generators(2), output_type="latent").images
    assert twice.shape == (2, 64, 64) and torch.allclose(twice, want, atol=1e-6)


def test_guidance_branches(ralu, three_stage):
    inputs = embeds(1, seed=1)
    negative = embeds(1, seed=2, prefix="negative_")
    run = lambda **kw: ralu(**inputs, schedule=three_stage, generator=generators(1), output_type="latent", **kw).images  # noqa: E731
    with Forwards(ralu.transformer) as log:
        cfg = run(**negative, guidance_scale=4.0)
    assert len(log.inputs) == 2 * three_stage.total_steps
    with Forwards(ralu.transformer) as log:
        plain = run(guidance_scale=1.0)
    assert len(log.inputs) == three_stage.total_steps
    assert (cfg - plain).abs().max() > 1e-3
    other_negative = run(**embeds(1, seed=9, prefix="negative_"), guidance_scale=4.0)
    assert (other_negative - cfg).abs().max() > 1e-3  # the negative prompt acts
    with pytest.warns(UserWarning, match="the negative prompt is ignored"):
        ignored = run(**negative, guidance_scale=1.0)
    assert torch.equal(ignored, plain)
    # The CFG combination: guidance_scale 1 + tiny equals the conditional branch up to tiny.
    assert (run(**negative, guidance_scale=1.0 + 1e-6) - plain).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------
# (g) End to end with a callback; (f) saving and loading.
# ----------------------------------------------------------------------------------------


def test_three_stages_end_to_end_with_callback(ralu, three_stage):
    seen = []

    def callback(pipe, step, timestep, callback_kwargs):
        seen.append((step, callback_kwargs["stage_index"], tuple(callback_kwargs["latents"].shape), tuple(callback_kwargs["prompt_embeds"].shape)))
        return {}

    images = ralu(prompt=["a cat", "the red dog"], schedule=three_stage, generator=generators(2), output_type="np",
                  callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images
    assert images.shape == (2, SIZE, SIZE, 3) and np.isfinite(images).all()
    assert [s[0] for s in seen] == list(range(7)) and [s[1] for s in seen] == [0, 0, 1, 1, 2, 2, 2]
    assert [s[2][1] for s in seen] == [16, 16, 28, 28, 64, 64, 64]
    assert all(s[3] == (2, 512, 32) for s in seen)
    pil = ralu(prompt="a cat", schedule=three_stage, generator=generators(1)).images
    assert pil[0].size == (SIZE, SIZE)


def test_ip_adapter_and_fixed_steps_are_refused(ralu, three_stage):
    with pytest.raises(ValueError, match="fixed by the schedule"):
        ralu(**embeds(1), schedule=three_stage, num_inference_steps=35)
    with pytest.raises(ValueError, match="IP-Adapter is not supported"):
        ralu(**embeds(1), schedule=three_stage, ip_adapter_image_embeds=[torch.zeros(1)])


def test_saved_folder_loads_back(tmp_path, ralu, three_stage):
    from diffusers import ChromaPipeline, DiffusionPipeline

    ralu.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "ChromaPipeline"
    generic = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(generic) is ChromaPipeline
    again = RALUChromaPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red cat", schedule=three_stage, output_type="latent")
    want = ralu(**kwargs, generator=generators(1)).images
    assert torch.allclose(again(**kwargs, generator=generators(1)).images, want, atol=1e-6)


def test_ralu_generate_runs_a_saved_chroma_folder(tmp_path, base, three_stage):
    from ralu.runtime.cli import main
    from ralu.runtime.schedule import save_schedule

    base.save_pretrained(tmp_path / "model")
    save_schedule(three_stage, tmp_path / "schedule.json")
    code = main(["--model", str(tmp_path / "model"), "--schedule", str(tmp_path / "schedule.json"), "--prompt", "a red cat",
                 "--negative-prompt", "dog", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    written = sorted((tmp_path / "out").glob("*.png"))
    assert len(written) == 1
    from PIL import Image

    assert Image.open(written[0]).size == (SIZE, SIZE)
