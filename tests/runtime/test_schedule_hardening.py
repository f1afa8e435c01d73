"""The schedule file contract under hostile input, and tests that pin what used to be unpinned.

Every schedule file either loads AND plans to finite sigmas and coefficients, or is refused
with a one-line :class:`ScheduleError` that names the problem: never another exception, a
NaN, or a hang.  The regression cases come first, then a property-based fuzz test over the
shipped schedules, then the pinning tests (stage ends, Canny thresholds, the latent the edge
decoder receives, SD3's bilinear position fallback).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from importlib import resources

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schedule_factory import schedule_dict

from ralu.runtime.plan import make_plan
from ralu.runtime.schedule import (
    C_RANGE,
    MAX_RESOLUTION,
    MAX_STEPS,
    SHIFT_RANGE,
    Schedule,
    ScheduleError,
    load_schedule,
    save_schedule,
    schedule_from_dict,
    shipped_schedules,
)

SHIPPED = shipped_schedules()


def shipped_dict(name: str) -> dict:
    return json.loads((resources.files("ralu.schedules") / f"{name}.json").read_text(encoding="utf-8"))


def write(tmp_path, data, name="s.json"):
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def refused(source) -> str:
    """The ScheduleError message for ``source``; it must be one non-empty line."""
    with pytest.raises(ScheduleError) as caught:
        load_schedule(source)
    message = str(caught.value)
    assert message and "\n" not in message and "\r" not in message, message
    return message


def check_plans_finitely(schedule: Schedule) -> None:
    """A loaded schedule plans (or is refused by the planner) with nothing but finite numbers."""
    try:
        plan = make_plan(schedule, schedule.family, schedule.height, schedule.width)
    except ScheduleError as error:  # e.g. more stages than the runtime runs
        assert "\n" not in str(error)
        return
    for stage in plan.stages:
        assert np.all(np.isfinite(stage.sigmas)), stage.sigmas
        assert stage.sigmas.min() >= -1e-9 and stage.sigmas.max() <= 1 + 1e-9, stage.sigmas
        assert stage.steps >= 1 and stage.tokens >= 1
    for transition in plan.transitions:
        assert all(math.isfinite(value) for value in transition.model_dump().values()), transition
    assert math.isfinite(math.sqrt(1.0 - 4.0 * plan.c)) and math.isfinite(math.sqrt(1.0 - plan.c))
    assert 0 <= plan.k <= plan.grid[0] * plan.grid[1]


# ----------------------------------------------------------------------------------------
# Numbers that used to load and sample to NaN, overflow, or allocate gigabytes.
# ----------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["transitions"][0].update(signal_scale=NAN), "transitions.0.signal_scale"),
        (lambda d: d["transitions"][0].update(noise_scale=NAN), "transitions.0.noise_scale"),
        (lambda d: d["transitions"][1].update(overlap=-INF), "transitions.1.overlap"),
        (lambda d: d["stages"][0].update(shift=INF), "stages.0.shift"),
        (lambda d: d["stages"][0].update(shift=NAN), "stages.0.shift"),
        (lambda d: d["stages"][1].update(shift=1e-300), "stages.1.shift"),
        (lambda d: d["stages"][1].update(shift=1e17), "stages.1.shift"),
        (lambda d: d["stages"][1].update(shift=SHIFT_RANGE[1] * 1.01), "stages.1.shift"),
        (lambda d: d["stages"][0].update(steps=10**9), "stages.0.steps"),
        (lambda d: d["stages"][0].update(steps=1e20), "stages.0.steps"),
        (lambda d: d["stages"][0].update(steps=MAX_STEPS + 1), "stages.0.steps"),
        (lambda d: d["stages"][0].update(steps=5.0), "stages.0.steps"),
        (lambda d: d["stages"][0].update(steps=True), "stages.0.steps"),
        (lambda d: d["stages"][0].update(steps="5"), "stages.0.steps"),
        (lambda d: d["stages"][2].update(end=NAN), "stages.2.end"),
        (lambda d: d.update(c=NAN), "c"),
        (lambda d: d.update(c=C_RANGE[0] / 2), "c="),
        (lambda d: d.update(up_ratio=1.5), "up_ratio"),
        (lambda d: d.update(up_ratio=-0.1), "up_ratio"),
        (lambda d: d.update(up_ratio="0.3"), "up_ratio"),
        (lambda d: d.update(height=MAX_RESOLUTION + 32), "height"),
        (lambda d: d.update(width=0), "width"),
        (lambda d: d.update(width=1024.0), "width"),
        (lambda d: d.update(base_steps=10**12), "base_steps"),
        (lambda d: d["divergence"].update(js_distance=INF), "divergence.js_distance"),
        (lambda d: d["flops_speedup"].update(total=NAN), "flops_speedup.total"),
        (lambda d: d["calibration"].update(h0=-1.0), "calibration.h0"),
        (lambda d: d["calibration"].update(h0=1e300), "calibration.h0"),
        (lambda d: d["calibration"].update(z_bounds=[100.0, 2.0]), "calibration.z_bounds"),
        (lambda d: d["calibration"].update(z_bounds=[2.0, INF]), "calibration.z_bounds"),
        (lambda d: d["calibration"].update(seed=-1), "calibration.seed"),
        (lambda d: d["calibration"].update(grid=10**9), "calibration.grid"),
        (lambda d: d["calibration"].update(target_speedup=NAN), "calibration.target_speedup"),
    ],
)
def test_non_finite_and_absurd_numbers_are_refused(tmp_path, mutate, field):
    data = shipped_dict("flux-dev-4x")
    mutate(data)
    message = refused(write(tmp_path, json.dumps(data)))  # json writes NaN/Infinity as Python reads them
    assert field in message and "Fix:" in message, message
    assert refused(data) == message.replace(str(tmp_path / "s.json"), "<dict>")


def test_the_nan_transition_of_the_issue_is_named_with_its_value(tmp_path):
    data = shipped_dict("flux-dev-4x")
    data["transitions"][0]["signal_scale"] = NAN
    message = refused(write(tmp_path, json.dumps(data)))
    assert "transitions.0.signal_scale=nan: Input should be a finite number" in message, message


def test_every_shipped_schedule_is_within_bounds_and_plans_finitely():
    for name in SHIPPED:
        check_plans_finitely(load_schedule(name))


def test_bound_edges_load_and_plan_finitely():
    extreme = schedule_dict(shifts=(SHIFT_RANGE[0], SHIFT_RANGE[1], SHIFT_RANGE[0]), c=C_RANGE[0], up_ratio=1.0, height=64, width=MAX_RESOLUTION)
    extreme["stages"][2]["steps"] = MAX_STEPS
    schedule = schedule_from_dict(extreme)
    check_plans_finitely(schedule)
    assert schedule_from_dict(schedule_dict(c=C_RANGE[1])).c == 0.25


def test_plan_refuses_non_finite_sigmas_even_if_validation_missed_them(monkeypatch, make_schedule):
    schedule = make_schedule([(2, 0.3, 3.0), (2, 1.0, 2.0)], height=64, width=64)
    monkeypatch.setattr(Schedule, "sigmas", lambda self, index: np.array([1.0, np.nan, 0.0]))
    with pytest.raises(ScheduleError, match="stage 1 plans sigmas outside"):
        make_plan(schedule, "flux", 64, 64)


# ----------------------------------------------------------------------------------------
# Files that are not schedules at all.
# ----------------------------------------------------------------------------------------


def test_binary_file_names_the_file(tmp_path):
    path = write(tmp_path, b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 20, "picture.json")
    message = refused(path)
    assert str(path) in message and "not UTF-8" in message and "Fix:" in message, message


@pytest.mark.parametrize("opening", ["[", '{"a": ', '{"version": 1, "stages": ['])
def test_deeply_nested_json_is_refused(tmp_path, opening):
    path = write(tmp_path, opening * 30_000, "deep.json")  # deeper than Python's recursion limit, under 1 MiB
    message = refused(path)
    assert str(path) in message and ("nested too deeply" in message or "not valid JSON" in message), message


def test_deeply_nested_values_that_parse_are_refused(tmp_path):
    deep = "[" * 500 + "]" * 500
    data = shipped_dict("flux-dev-4x")
    text = json.dumps(data).replace('"up_ratio": 0.3', f'"up_ratio": {deep}')
    assert "up_ratio" in refused(write(tmp_path, text))
    data["c"] = nested(100_000)  # a Python caller's dict: no JSON parser limits the depth
    assert "c=[[[...]]]: Input should be a valid number" in refused(data)


def test_duplicate_keys_huge_integers_and_huge_files_are_refused(tmp_path):
    text = json.dumps(shipped_dict("flux-dev-4x"))
    assert "twice" in refused(write(tmp_path, text.replace('"c":', '"c": 0.04, "c":')))
    assert "not a usable JSON" in refused(write(tmp_path, text.replace('"seed": 0', '"seed": ' + "9" * 5000)))
    assert "larger than" in refused(write(tmp_path, text + " " * (1 << 20)))


def test_sources_of_the_wrong_kind_are_refused():
    for source in (42, 1.5, ["flux-dev-4x"], b"flux-dev-4x"):
        assert "not " + type(source).__name__ in refused(source)


# ----------------------------------------------------------------------------------------
# Versions: checked first, strictly the integer 1, newer files say how to upgrade.
# ----------------------------------------------------------------------------------------


def test_newer_version_says_upgrade_and_nothing_about_fields(tmp_path):
    data = shipped_dict("flux-dev-4x")
    data.update(version=999, resolution=[1024, 1024])  # a changed field set
    del data["height"], data["width"], data["stages"]
    message = refused(write(tmp_path, data))
    assert "999" in message and "newer" in message and "pip install -U ralu" in message, message
    for field in ("height", "width", "stages", "resolution", "missing", "remove it"):
        assert field not in message, message


@pytest.mark.parametrize("version", ["1", "1.0", True, 1.0, 0, -1, None, [1], {"major": 1}])
def test_only_the_integer_one_is_version_one(tmp_path, version):
    data = shipped_dict("flux-dev-4x")
    data["version"] = version
    message = refused(write(tmp_path, data))
    assert "'version'" in message and "not the integer 1" in message and "Fix:" in message, message
    with pytest.raises(ValueError, match="version"):
        Schedule.model_validate(data)  # the model alone is as strict (pydantic's ValidationError)


def test_missing_version_is_named(tmp_path):
    data = shipped_dict("flux-dev-4x")
    del data["version"]
    assert "no field 'version'" in refused(write(tmp_path, data))


# ----------------------------------------------------------------------------------------
# save_schedule takes a Schedule or a dict.
# ----------------------------------------------------------------------------------------


def test_save_schedule_accepts_and_validates_a_dict(tmp_path):
    data = shipped_dict("sd3-medium-3x")
    path = save_schedule(data, tmp_path / "from_dict.json")
    assert load_schedule(path) == schedule_from_dict(data)
    data["stages"][0]["shift"] = NAN
    with pytest.raises(ScheduleError, match="stages.0.shift"):
        save_schedule(data, tmp_path / "bad.json")
    with pytest.raises(ScheduleError, match="takes a Schedule or a schedule dict, not list"):
        save_schedule([data], tmp_path / "list.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from_dict.json"]


# ----------------------------------------------------------------------------------------
# Fuzz: mutate the shipped schedules field by field.
# ----------------------------------------------------------------------------------------


def nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


ODD_VALUES = [
    NAN, INF, -INF, 0, 0.0, -0.0, -1, -0.5, 1, 2, 3, 7, 999, 1e-300, 5e-324, 1e-3, 1e3, 1e17, 1e300, 10**20, 2**64,
    -(2**63), True, False, None, "", "1", "1.0", "nan", "Infinity", "flux-dev", [], {}, [1.0, 2.0], {"a": 1},
    nested(50), nested(500), "x" * 5000,
]
REPLACEMENTS = st.one_of(
    st.sampled_from(ODD_VALUES),
    st.floats(),
    st.integers(),
    st.text(max_size=12),
    st.lists(st.floats(), max_size=3),
)
SETTINGS = settings(
    max_examples=250, deadline=2000, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def paths(node, prefix=()):
    """Every location in a parsed schedule: the root, every key and every list item."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from paths(value, prefix + (index,))


def mutate(data, path, operation, value):
    """Apply one mutation; returns the (possibly replaced) root."""
    if not path:
        return value if operation == "replace" else data
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    if operation == "replace":
        parent[key] = value
    elif operation == "delete":
        del parent[key]
    elif operation == "extra" and isinstance(parent[key], dict):
        parent[key]["unexpected"] = value
    elif operation == "scale" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = parent[key] * value if isinstance(value, (int, float)) else parent[key]
    elif operation == "version":
        data["version"] = value
    return data


@st.composite
def mutated_schedules(draw):
    data = shipped_dict(draw(st.sampled_from(SHIPPED)))
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(data, dict):
            break
        path = draw(st.sampled_from(list(paths(data))))
        operation = draw(st.sampled_from(["replace", "replace", "replace", "delete", "extra", "scale", "version"]))
        data = mutate(data, path, operation, draw(REPLACEMENTS))
    return data


def check_source(source) -> bool:
    """The property: loads and plans finitely, or a one-line ScheduleError; nothing else.
    Returns whether it loaded."""
    try:
        schedule = load_schedule(source)
    except ScheduleError as error:
        message = str(error)
        assert message and "\n" not in message and len(message) < 2000, message
        return False
    check_plans_finitely(schedule)
    return True


def test_fuzz_every_field_of_every_shipped_schedule(tmp_path):
    """Exhaustive single mutations: every location of one FLUX and one SD3 schedule, every odd value."""
    loaded = refused_count = 0
    for name in ("flux-dev-7x", "sd3-medium-2x"):
        base = shipped_dict(name)
        for path in paths(base):
            for value in ODD_VALUES:
                if check_source(mutate(shipped_dict(name), path, "replace", value)):
                    loaded += 1
                else:
                    refused_count += 1
            if path:
                check_source(mutate(shipped_dict(name), path, "delete", None))
    assert loaded > 20 and refused_count > loaded  # both outcomes are exercised


def test_fuzz_mutated_schedule_files(tmp_path):
    path = tmp_path / "fuzz.json"

    @SETTINGS
    @given(mutated_schedules())
    def run(data):
        path.write_text(json.dumps(data))  # NaN/Infinity written as JSON's non-standard tokens
        check_source(path)
        check_source(data)

    run()


@st.composite
def damaged_bytes(draw):
    text = (resources.files("ralu.schedules") / f"{draw(st.sampled_from(SHIPPED))}.json").read_bytes()
    kind = draw(st.sampled_from(["binary", "truncate", "splice", "deep"]))
    if kind == "binary":
        return draw(st.binary(max_size=300))
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    if kind == "splice":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.binary(min_size=1, max_size=8)) + text[at + draw(st.integers(0, 8)) :]
    opening = draw(st.sampled_from([b"[", b'{"a":', b'{"version": 1, "c": [']))
    return opening * draw(st.sampled_from([1, 100, 10_000, 100_000]))


def test_fuzz_damaged_files(tmp_path):
    path = tmp_path / "damaged.json"

    @SETTINGS
    @given(damaged_bytes())
    def run(raw):
        path.write_bytes(raw)
        check_source(path)

    run()


# ----------------------------------------------------------------------------------------
# Stage ends must be strictly increasing: an equal end is refused too.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ends", [(0.3, 0.3, 1.0), (0.2, 1.0, 1.0), (0.45, 0.3, 1.0)])
def test_stage_ends_must_strictly_increase(ends):
    data = schedule_dict(steps=(2, 3, 5), ends=ends, c=0.02)
    with pytest.raises(ScheduleError, match="strictly increasing"):
        schedule_from_dict(data)


# ----------------------------------------------------------------------------------------
# Canny thresholds: pinned by value and by behaviour.
# ----------------------------------------------------------------------------------------


def test_canny_thresholds_are_the_papers():
    from ralu.runtime.edges import CANNY_THRESHOLDS

    assert CANNY_THRESHOLDS == (100, 200)


def bar_image(contrasts, base=100, cell=16):
    """Gray ``(1, 2 cell, cell * n)``: one vertical 4 px bar per column of cells, raised by
    ``top`` in the upper cell and ``bottom`` in the lower one.  OpenCV's Canny (3x3 Sobel, L1)
    sees a gradient of 4 x contrast across each bar side."""
    image = np.full((2 * cell, cell * len(contrasts)), base, np.uint8)
    for column, (top, bottom) in enumerate(contrasts):
        left = column * cell + 6
        image[:cell, left : left + 4] = base + top
        image[cell:, left : left + 4] = base + bottom
    return image[None]


def test_default_canny_edges_follow_the_100_200_hysteresis():
    """Gradients 180 | 220 | 240 over 80 | 240 over 120: only gradients above 200 start an
    edge, and a gradient of at least 100 continues one.  Moving the high threshold past
    180 or 220, or the low one past 80 or 120, changes these scores."""
    from ralu.runtime.edges import canny, select_edge_tokens, token_scores

    gray = bar_image([(45, 45), (55, 55), (60, 20), (60, 30)])
    scores = token_scores(canny(gray), (2, 4)).reshape(2, 4)
    top, bottom = scores
    assert top[0] == 0 and bottom[0] == 0  # 180 < high: no edge at all
    assert top[1] > 0 and bottom[1] > 0  # 220 > high
    assert top[2] > 0 and top[3] > 0
    assert bottom[2] <= 2  # 80 < low: only the junction with the strong half
    assert bottom[3] > 8 * max(int(bottom[2]), 1)  # 120 >= low, connected to a strong edge
    # The sampler's path (decoded images in [-1, 1] -> gray -> Canny) sees the same scores.
    images = torch.from_numpy(gray[0]).float().div(255).mul(2).sub(1).expand(1, 3, -1, -1)
    chosen = select_edge_tokens(images, (2, 4), 5)
    assert sorted(chosen[0].tolist()) == sorted(torch.argsort(-scores.flatten(), stable=True)[:5].tolist())


# ----------------------------------------------------------------------------------------
# Which latent reaches the edge decoder: a point mass makes Tweedie exact only at the right sigma.
# ----------------------------------------------------------------------------------------


class RecordingPointMass:
    """Data distribution: the single point ``x0``.  Its exact velocity is ``(x - x0) / sigma``,
    so the Tweedie estimate ``x - sigma v`` is ``x0`` exactly, but only with the sigma that
    belongs to ``x``.  Records every latent handed to the edge decoder."""

    def __init__(self, x0):
        self.x0 = x0
        self.decoded = []

    def stage(self, layout, stage):
        @contextmanager
        def context():
            target = layout.gather(self.x0)
            yield lambda patches, sigma: (patches - target) / sigma

        return context()

    def decode_for_edges(self, latent):
        self.decoded.append(latent.clone())
        b, _, h, w = latent.shape
        return torch.zeros(b, 3, 4 * h, 4 * w)


def test_edge_decoder_receives_the_exact_clean_half_size_latent(make_schedule):
    from ralu.runtime.sampler import run_stages
    from ralu.runtime.tokens import initial_canvas, upsample_nearest

    schedule = make_schedule([(3, 0.3, 3.0), (2, 0.45, 2.5), (2, 1.0, 2.2)], c=0.04, up_ratio=0.25, height=128, width=128)
    plan = make_plan(schedule, "flux", 128, 128)
    g = torch.Generator().manual_seed(0)
    half = 3.0 + torch.randn(2, 4, 8, 8, generator=g)
    model = RecordingPointMass(upsample_nearest(half))
    noise = torch.randn(2, 4, 16, 16, generator=g)
    run_stages(plan, initial_canvas(noise, "low"), model, generator=torch.Generator().manual_seed(1))
    assert len(model.decoded) == 1
    (latent,) = model.decoded
    assert latent.shape == half.shape
    # Off by one step of sigma the estimate would be off by ~(delta sigma) * |n - x0| ~ 0.1 or more.
    assert torch.allclose(latent, half, atol=1e-4), (latent - half).abs().max()


# ----------------------------------------------------------------------------------------
# SD3 bilinear position fallback at fractional rows AND columns.
# ----------------------------------------------------------------------------------------


def test_bilinear_fallback_weights_all_four_neighbours():
    from sd3_models import tiny_transformer

    from ralu.runtime import sd3_tokens as st_tokens

    model = tiny_transformer()
    pos_embed = model.pos_embed
    size, dim = pos_embed.pos_embed_max_size, pos_embed.pos_embed.shape[-1]
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(4))
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")

    def bilinear_function(r, q):  # reproduced exactly by bilinear interpolation, and by nothing less
        return a + b * r[..., None] / size + c * q[..., None] / size + d * (r * q)[..., None] / size**2

    table = bilinear_function(rows, cols)
    with torch.no_grad():
        pos_embed.pos_embed.copy_(table.reshape(1, size * size, dim).to(pos_embed.pos_embed.dtype))
    assert not st_tokens.table_formula_matches(model)
    positions = torch.tensor([[20.25, 21.75], [0.5, 0.5], [size - 1.5, 3.125], [7.0, 9.5], [9.5, 7.0]])
    with pytest.warns(RuntimeWarning, match="bilinear"):
        got = st_tokens.position_embedding(model, positions).double()
    stored = pos_embed.pos_embed.reshape(size, size, dim).double()
    # Hand-computed at (20.25, 21.75): weights 0.75 * 0.25, 0.75 * 0.75, 0.25 * 0.25, 0.25 * 0.75.
    by_hand = 0.1875 * stored[20, 21] + 0.5625 * stored[20, 22] + 0.0625 * stored[21, 21] + 0.1875 * stored[21, 22]
    assert torch.allclose(got[0], by_hand, atol=1e-5)
    assert torch.allclose(got, bilinear_function(positions[:, 0].double(), positions[:, 1].double()), atol=1e-5)
