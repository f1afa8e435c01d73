"""Issue 26, items 2 and 5: the schedule file's ``cache`` section is typed as strictly as the
rest of the format (no NaN or infinity, no strings or booleans for numbers), every section
that loads saves to a file that loads back identical, and a TaylorSeer setting that can only
fail at run time (``disable_cache_before_step`` 0) is refused before any compute, from the
file and from the Python API."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from diffusers.hooks import TaylorSeerCacheConfig
from schedule_factory import schedule_dict

from ralu.runtime import RALUFluxPipeline
from ralu.runtime.cache import disable_cache, enable_cache
from ralu.runtime.schedule import ScheduleError, load_schedule, save_schedule

STEPS = (2, 3, 5)


def with_cache(cache) -> dict:
    return {**schedule_dict(steps=STEPS), "cache": cache}


def refused(data) -> str:
    with pytest.raises(ScheduleError) as caught:
        load_schedule(data)
    message = str(caught.value)
    assert "\n" not in message and "Fix:" in message, message
    return message


@pytest.mark.parametrize(
    "cache, words",
    [
        ({"kind": "magcache", "mag_ratios": [[1.0, math.inf], [1.0] * 3, [1.0] * 5]}, ["finite"]),
        ({"kind": "magcache", "mag_ratios": [[1.0, math.nan], [1.0] * 3, [1.0] * 5]}, ["finite"]),
        ({"kind": "magcache", "threshold": math.inf, "mag_ratios": [[1.0] * 2, [1.0] * 3, [1.0] * 5]}, ["threshold", "finite"]),
        ({"kind": "first_block", "threshold": True}, ["threshold=True"]),
        ({"kind": "taylorseer", "cache_interval": "5"}, ["cache_interval='5'"]),
        ({"kind": "taylorseer", "max_order": 1.0}, ["max_order=1.0"]),
        ({"kind": "first_block", "version": True}, ["cache version True"]),
        ({"kind": "magcache", "mag_ratios": [[1.0] * 2, [], [1.0] * 5]}, ["1 to 1000 ratios"]),
        ({"kind": "magcache", "mag_ratios": [[1e300] * 2, [1.0] * 3, [1.0] * 5]}, ["less than or equal to 100"]),
    ],
)
def test_cache_section_is_strictly_typed(cache, words):
    message = refused(with_cache(cache))
    assert all(word in message for word in words), message


@pytest.mark.parametrize("start", [0, -0.0, False, 0.5])
def test_taylorseer_without_a_computed_step_is_refused_on_load(start):
    message = refused(with_cache({"kind": "taylorseer", "disable_cache_before_step": start}))
    assert "disable_cache_before_step" in message


def test_taylorseer_without_a_computed_step_is_refused_through_the_api():
    from conftest import tiny_flux_scheduler, tiny_flux_transformer, tiny_vae

    pipe = RALUFluxPipeline(scheduler=tiny_flux_scheduler(), vae=tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tiny_flux_transformer())
    pipe.set_progress_bar_config(disable=True)
    schedule = load_schedule({**schedule_dict(steps=STEPS), "height": 64, "width": 64})
    g = torch.Generator().manual_seed(0)
    inputs = {"prompt_embeds": torch.randn(1, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(1, 32, generator=g)}
    enable_cache(pipe.transformer, TaylorSeerCacheConfig(disable_cache_before_step=0))
    try:
        with pytest.raises(ValueError, match=r"disable_cache_before_step=0.*Fix: an integer of at least 1"):
            pipe(**inputs, schedule=schedule, output_type="latent")
    finally:
        disable_cache(pipe.transformer)


def random_cache(rng: random.Random):
    """A cache section, valid or not: every field from a pool of good, bad and odd values."""
    numbers = [0, 1, 2, 3, 5, 0.0, 0.06, 0.5, 1.0, 1.5, -1, -0.0, 1e308, math.inf, -math.inf, math.nan, True, False, None, "5", [1], 1e-300]
    kind = rng.choice(["first_block", "taylorseer", "magcache", "faster", "", None, 3])
    cache = {"kind": kind} if kind is not None else {}
    for field in rng.sample(["threshold", "cache_interval", "disable_cache_before_step", "max_order", "max_skip_steps", "retention_ratio", "version"], rng.randint(0, 3)):
        cache[field] = rng.choice(numbers)
    if kind == "magcache" or rng.random() < 0.1:
        shape = STEPS if rng.random() < 0.7 else rng.choice([(2, 3), (2, 3, 4), (0, 3, 5)])
        cache["mag_ratios"] = [[rng.choice([1.0, 0.97, 1.03, 1, 2.5] if rng.random() < 0.9 else numbers) for _ in range(n)] for n in shape]
    return cache if rng.random() < 0.95 else rng.choice([[], "magcache", 1, True])


def test_fuzz_cache_section_round_trip(tmp_path):
    """Load -> save -> load gives the same schedule for every section that loads, and the file
    written holds no NaN or infinity (unset settings are written as null and read back as unset);
    everything else is refused in one line."""
    rng = random.Random(26)
    loaded = 0
    for case in range(600):
        data = with_cache(random_cache(rng))
        path = tmp_path / "in.json"
        path.write_text(json.dumps(data))  # Python's json writes NaN/Infinity literals, as a hostile file would
        try:
            schedule = load_schedule(path)
        except ScheduleError as error:
            assert "\n" not in str(error)
            continue
        loaded += 1
        out = save_schedule(schedule, tmp_path / "out.json")
        text = out.read_text()
        assert "NaN" not in text and "Infinity" not in text, (case, text)
        assert all(value is None or math.isfinite(value) for key, value in json.loads(text)["cache"].items() if key not in ("kind", "mag_ratios"))
        assert load_schedule(out) == schedule, case
        assert save_schedule(load_schedule(out), tmp_path / "again.json").read_text() == text
    assert loaded >= 40  # the fuzz reaches the round trip, not only the refusals
