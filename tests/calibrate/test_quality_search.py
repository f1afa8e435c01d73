"""The quality-in-the-loop search on the offline testbed (v2's FLUX generator), at CI size (a few images, few trials)."""

import json

import optuna
import pytest
import torch

from ralu.calibrate import cli
from ralu.calibrate.quality_search import (
    Candidate,
    ReferenceCache,
    candidate_schedule,
    load_metric,
    pixel_distance,
    search,
)
from ralu.runtime.schedule import load_schedule
from ralu_lab.testbed.v2 import data
from ralu_lab.testbed.v2 import model as tb

SPEEDUP = 4.5
SIZE = data.IMAGE_SIZE


def base_shift() -> float:
    return tb.base_shift("flux")


def prompts_for_testbed(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` balanced prompts of testbed v2 and per-image seeds (a fast FLUX pipeline for the search's own tests)."""
    return data.describe(data.balanced_labels(n, seed)), [int(seed) * 1_000_003 + i for i in range(n)]


def target_options(pipe) -> dict:
    """What the lab's ``testbed`` quality target gives the search for testbed v2's FLUX
    generator: encoder, size, base shift and steps, guidance, FLOPs and reference key."""
    from ralu_lab.bench.quality.v2.search_target import testbed_target

    return dict(testbed_target("flux-dev", metric="pixel", pipe=pipe).options)


def speedup_on_testbed(pipe):
    from ralu_lab.bench.quality.v2.search_target import speedup_on_testbed_v2

    return speedup_on_testbed_v2(pipe, "flux")


def search_testbed(speedup: float, *, images: int = 32, image_seed: int = 100, pipe=None, **options):
    """The product's search given everything from outside: testbed v2's FLUX pipeline, prompts, encoder and FLOPs."""
    prompts, seeds = prompts_for_testbed(images, image_seed)
    return search(pipe, prompts, speedup, seeds=seeds, **{**target_options(pipe), **options})


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tb.load_pipeline("flux")


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.lab  # the product driven through the lab's testbed (docs/architecture.md)
def test_references_are_the_plain_pipeline_and_are_cached(pipe, tmp_path):
    prompts, seeds = prompts_for_testbed(2, 7)
    calls = []
    result = search_testbed(SPEEDUP, images=2, image_seed=7, pipe=pipe, trials=1, batch_size=2, cache_dir=tmp_path, metric="pixel",
                            log=calls.append)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    # The cached reference of image 0 is FluxPipeline's own 50-step sample from the same seed.
    options = target_options(pipe)
    plain = pipe(**options["encode"](prompts[:1]), height=SIZE, width=SIZE, num_inference_steps=50, guidance_scale=options["guidance_scale"],
                 generator=[torch.Generator().manual_seed(seeds[0])], output_type="pt").images[0]
    cache = ReferenceCache(tmp_path, options["pipeline_id"])
    stored = cache.load(cache.path(prompts[0], seeds[0], SIZE, SIZE, 50, options["guidance_scale"]))
    assert stored is not None and torch.allclose(stored, plain.clamp(0, 1), atol=1e-5)
    # The first candidate is the plain fewer-steps sampler, which matches the budget exactly.
    first = result.history[0]
    assert first["stages"] == 1 and first["shift_1"] == pytest.approx(base_shift()) and first["speedup"] >= SPEEDUP
    assert any("affords" in line for line in calls)


@pytest.mark.lab  # the product driven through the lab's testbed (docs/architecture.md)
def test_search_scores_honestly_and_resumes_from_storage(pipe, tmp_path):
    storage = str(tmp_path / "study.log")
    options = dict(images=2, image_seed=3, pipe=pipe, batch_size=1, cache_dir=tmp_path / "refs", metric="pixel", storage=storage, study_name="s")
    search_testbed(SPEEDUP, trials=2, **options)
    result = search_testbed(SPEEDUP, trials=4, **options)
    study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage)))
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) >= 4 and result.trials == len(study.trials)
    # Every sampled trial reported its running score after each batch of images (for pruning).
    sampled = [t for t in finished if t.user_attrs.get("feasible") and "same_as" not in t.user_attrs]
    assert sampled and all(sorted(t.intermediate_values) == [0, 1] for t in sampled)
    # No parameter set evaluated twice: a repeat reuses the earlier value.
    evaluated = [t.user_attrs["layout"] for t in finished if "layout" in t.user_attrs and "same_as" not in t.user_attrs]
    assert len(evaluated) == len(set(evaluated))
    # Paired pixel distance: the plain sampler retraces the base path, re-noised stages do not.
    assert result.plain is not None and result.best_value == min(v for v in (result.plain_value, result.ralu_value) if v is not None)
    assert result.plain_wins == (len(result.best.stages) == 1)
    assert ("plain fewer-steps sampler scores best" in result.describe()) == result.plain_wins


@pytest.mark.lab  # the product driven through the lab's testbed (docs/architecture.md)
def test_trials_worse_than_the_median_are_pruned_after_their_first_batch(pipe):
    calls = []

    def worsening(images, references):  # every batch scores worse than all before it
        calls.append(len(images))
        return torch.full((len(images),), float(len(calls)), dtype=torch.float64)

    result = search_testbed(SPEEDUP, images=2, image_seed=5, pipe=pipe, batch_size=1, metric=worsening, trials=7)
    pruned = [t for t in result.history if t["state"] == "PRUNED"]
    assert pruned and all(t["images_scored"] == 1 for t in pruned)
    assert result.pruned == len(pruned)


def test_steps_split_by_weight_fill_the_budget():
    from ralu.calibrate.budget import apportion, budget_steps

    assert apportion(3, (1.0, 1.0, 1.0)) == (1, 1, 1)
    assert apportion(10, (1.0, 1.0)) == (5, 5) and apportion(11, (3.0, 1.0)) == (8, 3)  # one each, then 9 split 6.75 : 2.25
    for total in range(3, 40):
        steps = apportion(total, (0.2, 1.7, 1.0))
        assert sum(steps) == total and min(steps) >= 1
    with pytest.raises(ValueError, match="one step each"):
        apportion(2, (1.0, 1.0, 1.0))

    def speedup_of(steps, up_ratio):  # a low-res step costs a quarter of a full one
        return 50.0 / (0.25 * sum(steps[:-1]) + steps[-1])

    steps = budget_steps(speedup_of, 4.0, (2.0, 1.0), 0.0, 200)
    assert speedup_of(steps, 0.0) >= 4.0 and speedup_of(apportion(sum(steps) + 1, (2.0, 1.0)), 0.0) < 4.0
    assert budget_steps(speedup_of, 60.0, (1.0, 1.0), 0.0, 200) is None  # not even one step each


@pytest.mark.lab  # the product driven through the lab's testbed (docs/architecture.md)
def test_the_search_draws_only_layouts_that_spend_the_budget(pipe):
    from ralu.calibrate.budget import apportion
    from ralu.calibrate.quality_search import GIVEN_STEPS_ATTR

    result = search_testbed(SPEEDUP, images=1, image_seed=4, pipe=pipe, batch_size=1, metric="pixel", trials=14)
    speedup_of = speedup_on_testbed(pipe)
    drawn = [t for t in result.history if GIVEN_STEPS_ATTR not in t]
    assert drawn and all(t["speedup"] >= SPEEDUP for t in drawn)
    for t in drawn:
        n = t["stages"]
        weights = [*(t[f"weight_{k + 1}_of_{n}"] for k in range(n - 1)), 1.0]
        assert tuple(t["steps"]) == apportion(sum(t["steps"]), weights)
        assert speedup_of(apportion(sum(t["steps"]) + 1, weights), t["up_ratio"]) < SPEEDUP  # one step more misses it


def test_candidate_schedules_validate_and_price_with_the_flops_model():
    for candidate in (Candidate((11,), (1.0,), (3.1582,), 2.0, 0.0), Candidate((4, 6), (0.4, 1.0), (5.0, 3.0), 12.0, 0.0),
                      Candidate((2, 3, 5), (0.2, 0.3, 1.0), (8.0, 2.8, 2.2), 6.0, 0.1)):
        schedule = candidate_schedule("flux-dev", 1024, 1024, 50, 3.1582, candidate)
        assert [s.steps for s in schedule.stages] == list(candidate.steps)
        assert len(schedule.transitions) == len(candidate.steps) - 1
        assert schedule.calibration.optimizer == "quality search"


def test_metrics_by_name_callable_and_folder(tmp_path):
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert torch.allclose(load_metric(None)(a, b), torch.full((2,), 0.5, dtype=torch.float64))
    assert load_metric(pixel_distance) is pixel_distance
    with pytest.raises(ValueError, match="features.pt2"):
        load_metric(tmp_path)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    torch.export.save(torch.export.export(model, (torch.zeros(2, 3, 4, 4),), dynamic_shapes=({0: torch.export.Dim("n")},)), str(tmp_path / "features.pt2"))
    distances = load_metric(tmp_path)(a, b)
    assert distances.shape == (2,) and (distances >= 0).all()


def test_cli_quality_needs_its_inputs_in_one_line(tmp_path, capsys):
    code, _, stderr = run_cli(["--model", "flux", "--objective", "quality", "--speedup", 4, "--out", tmp_path / "q.json", "--quiet"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "--pipeline" in stderr and "--prompts" in stderr


@pytest.mark.lab  # the product driven through the lab's testbed (docs/architecture.md)
def test_cli_quality_on_the_testbed_writes_the_best_schedule(tmp_path, capsys):
    """``--pipeline testbed``: the lab's testbed v2 through the entry point ralu.quality_targets."""
    from ralu_lab.testbed.v2 import data

    labels = data.balanced_labels(2, 11)
    prompts, seeds = data.describe(labels), [11, 12]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p, "seed": s}) + "\n" for p, s in zip(prompts, seeds)))
    out, plain = tmp_path / "best.json", tmp_path / "plain.json"
    code, stdout, _ = run_cli(["--model", "flux", "--objective", "quality", "--pipeline", "testbed", "--prompts", file, "--speedup", SPEEDUP,
                               "--trials", 2, "--batch-size", 2, "--cache-dir", tmp_path / "refs", "--out", out, "--plain-out", plain, "--quiet"], capsys)
    assert code == 0, stdout
    assert "quality search" in stdout and "best plain" in stdout
    assert load_schedule(plain).stages[0].steps >= 1 and len(load_schedule(plain).stages) == 1
    assert load_schedule(out).calibration.optimizer == "quality search"


@pytest.mark.parametrize("arch", ["flux", "sd3"])
@pytest.mark.lab  # the product driven through the lab's testbed (docs/architecture.md)
def test_the_search_runs_on_testbed_v2_with_its_guided_calls(arch, v2_weights, tmp_path):
    from ralu.calibrate.fewer_steps import plain_schedule
    from ralu.calibrate.quality_search import to_ralu
    from ralu_lab.bench.quality.v2.search_target import search_testbed_v2
    from ralu_lab.testbed.v2 import data
    from ralu_lab.testbed.v2 import model as tb
    from ralu_lab.testbed.v2.evaluate import generate

    pipe = tb.load_pipeline(arch, path=v2_weights / arch, autoencoder=v2_weights / "autoencoder")
    speedup = 4.5 if arch == "flux" else 2.0
    result = search_testbed_v2(arch, speedup, images=2, image_seed=7, pipe=pipe, trials=1, batch_size=2, cache_dir=tmp_path, metric="pixel")
    first = result.history[0]
    assert first["stages"] == 1 and first["speedup"] >= speedup and first["shift_1"] == pytest.approx(tb.base_shift(arch))
    # the cached references are the base model's samples on its base grid, with the harness's
    # labels, noise and guidance; on FLUX that grid is FluxPipeline's, so they are its baseline
    labels = data.balanced_labels(2, 7)
    base = plain_schedule("flux-dev" if arch == "flux" else "sd3-medium", tb.BASE_STEPS[arch], 64, 64, tb.base_shift(arch), tb.BASE_STEPS[arch])
    expected = [(generate(to_ralu(pipe), arch, labels, seed=7, batch_size=2, schedule=base) + 1.0) / 2.0]
    if arch == "flux":
        expected.append((generate(pipe, arch, labels, seed=7, steps=tb.BASE_STEPS[arch], batch_size=2) + 1.0) / 2.0)
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 2
    stored = [torch.load(f, weights_only=True) for f in files]
    for images in expected:
        assert all(any(torch.allclose(s, b.clamp(0, 1), atol=1e-4) for s in stored) for b in images)


@pytest.mark.lab  # the product driven through the lab's testbed (docs/architecture.md)
def test_quality_testbed_command_refuses_what_a_testbed_lacks(tmp_path, capsys):
    from ralu_lab.bench import quality_testbed

    for argv, message in ((["--testbed", "v1"], "invalid choice: 'v1'"), (["--testbed", "v2", "--arch", "sd3", "--budgets", "7"], "[2, 3]")):
        with pytest.raises(SystemExit) as stop:
            quality_testbed.main([*argv, "--out-dir", str(tmp_path)])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_known_schedule_is_a_point_of_the_search_space():
    from ralu.calibrate.quality_search import candidate_of

    for name in ("flux-dev-7x", "flux-dev-4x-searched", "sd3-medium-3x"):
        known = load_schedule(name)
        again = candidate_schedule(known.model, known.height, known.width, known.base_steps, known.calibration.h0, candidate_of(known))
        assert [s.steps for s in again.stages] == [s.steps for s in known.stages]
        assert [s.end for s in again.stages] == pytest.approx([s.end for s in known.stages], abs=0.005)
        assert [s.shift for s in again.stages] == pytest.approx([s.shift for s in known.stages])
        assert again.c == pytest.approx(known.c) and again.up_ratio == known.up_ratio


@pytest.mark.lab  # the product driven through the lab's testbed (docs/architecture.md)
def test_given_schedules_are_tried_first_and_named_in_the_answer(pipe, tmp_path, capsys):
    from ralu.calibrate.quality_search import SOURCE_ATTR, candidate_of

    known = candidate_schedule("flux-dev", SIZE, SIZE, 50, base_shift(), Candidate((2, 3), (0.4, 1.0), (4.0, 3.0), 8.0, 0.0))
    result = search_testbed(SPEEDUP, images=1, image_seed=9, pipe=pipe, batch_size=1, metric="pixel", trials=6, extra_candidates=[("my preset", known)])
    tried = [t for t in result.history if t.get(SOURCE_ATTR) == "my preset"]
    assert len(tried) == 1
    assert tried[0]["steps"] == [2, 3] and tried[0]["ends"] == [0.4, 1.0] and tried[0]["z"] == pytest.approx(candidate_of(known).z)
    assert f"my preset (trial {tried[0]['number']})" in result.describe()
    # from the command line: --candidate files, refused in one line when unreadable
    (tmp_path / "prompts.txt").write_text("a red square\n")
    code, _, stderr = run_cli(["--model", "flux", "--objective", "quality", "--pipeline", "testbed", "--prompts", tmp_path / "prompts.txt", "--speedup", 4,
                               "--candidate", tmp_path / "missing.json", "--out", tmp_path / "q.json", "--quiet"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "--candidate" in stderr and not (tmp_path / "q.json").exists()


@pytest.mark.lab  # the product's spectrum checked against the lab's definition
def test_the_spectral_term_equals_the_testbeds_spectral_distance():
    from ralu.calibrate import quality_search
    from ralu_lab.testbed.v2 import metrics

    generator = torch.Generator().manual_seed(3)
    a, b = torch.rand(5, 3, 64, 64, generator=generator), torch.rand(7, 3, 64, 64, generator=generator) ** 2
    # the lab reads images in [-1, 1], the product in [0, 1]
    assert torch.allclose(quality_search.radial_power_spectrum(a), metrics.radial_power_spectrum(a * 2.0 - 1.0), rtol=1e-5, atol=0.0)
    expected = metrics.spectral_distance(a * 2.0 - 1.0, b * 2.0 - 1.0)
    assert expected > 0.02 and quality_search.spectral_distance(a, b) == pytest.approx(expected, rel=1e-5)


def test_cli_refuses_a_bad_spectral_weight_in_one_line(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a red square\n")
    for bad in ("-1", "nan", "inf"):
        code, _, stderr = run_cli(["--model", "flux", "--objective", "quality", "--pipeline", "testbed", "--prompts", tmp_path / "prompts.txt", "--speedup", 4,
                                   "--spectral-weight", bad, "--out", tmp_path / "q.json", "--quiet"], capsys)
        assert code == 2 and stderr.count("\n") == 1 and "--spectral-weight" in stderr and "finite number >= 0" in stderr


@pytest.mark.lab  # the product driven through the lab's testbed (docs/architecture.md)
def test_quality_testbed_runs_sd3_at_both_budgets_with_both_parts_of_the_score(tmp_path, monkeypatch):
    """``python -m ralu_lab.bench.quality_testbed --arch sd3 --budgets 2 3``, tiny: SD3's
    budgets, costs and known schedules, crop positions on every call, and the result files."""
    from ralu.runtime.sd3 import RALUStableDiffusion3Pipeline
    from ralu_lab.bench import quality_testbed

    positions = []
    call = RALUStableDiffusion3Pipeline.__call__

    def spy(self, *args, **kwargs):
        positions.append(kwargs.get("low_res_positions"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(RALUStableDiffusion3Pipeline, "__call__", spy)
    assert quality_testbed.main(["--arch", "sd3", "--budgets", "2", "3", "--images", "2", "--trials", "2", "--batch-size", "2", "--metric", "pixel",
                                 "--spectral-weight", "3", "--out-dir", str(tmp_path)]) == 0
    assert positions and set(positions) == {"crop"}
    for budget, preset in ((2, [5, 6, 9]), (3, [3, 3, 6])):
        result = json.loads((tmp_path / f"quality-v2-sd3-{budget}x-result.json").read_text())
        assert result["settings"]["low_res_positions"] == "crop" and result["spectral_weight"] == 3.0
        best = result["best"]
        assert best["score"] == pytest.approx(best["distance"] * (1 + 3.0 * best["spectral"]))
        assert best["speedup"] >= result["settings"]["target_speedup"] > budget  # the testbed's budget: the preset's own speed-up there
        assert load_schedule(tmp_path / f"quality-v2-sd3-{budget}x.json").model == "sd3-medium"
        trials = json.loads((tmp_path / f"quality-v2-sd3-{budget}x-trials.json").read_text())
        assert [t["given_steps"] for t in trials if t.get("source") == f"published {budget}x preset"] == [preset]  # queued, not sampled in 2 trials
        assert all("distance" in t and "spectral" in t for t in trials if t["state"] == "COMPLETE" and t.get("feasible"))
