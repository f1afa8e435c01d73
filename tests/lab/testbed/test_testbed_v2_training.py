"""Testbed v2's training commands: each builds its network and takes a step; a run cut and
resumed from its checkpoint ends exactly where an uninterrupted one does; bad resumes are
refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ralu_lab.testbed.v2 import classifier, train_autoencoder, train_generator, training
from ralu_lab.testbed.v2 import model as tb

TINY = ["--threads", "1", "--log-every", "1", "--warmup", "1"]


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("autoencoder")
    tb.build_autoencoder(0).save_pretrained(folder)
    return folder


def record(folder):
    return json.loads((folder / training.RECORD).read_text())


def test_autoencoder_command_trains_measures_its_latents_and_records(tmp_path):
    out = tmp_path / "ae"
    argv = ["--out", str(out), "--steps", "1", "--batch", "2", "--half-batch", "2", "--stats-n", "8", *TINY]
    assert train_autoencoder.main(argv) == 0
    vae = tb.load_autoencoder(out)
    rec = record(out)
    assert rec["command"].startswith("python -m ralu_lab.testbed.v2.train_autoencoder --out")
    assert rec["steps_done"] == 1 and rec["args"]["batch"] == 2 and set(rec["final_losses"]) >= {"step", "l1_64", "l1_32"}
    assert vae.config.scaling_factor == rec["latent_statistics"]["scaling_factor"] != 1.0
    assert not (out / training.CHECKPOINT).exists()


def test_classifier_command_trains_and_reports_accuracy_per_attribute(tmp_path):
    out = tmp_path / "cls"
    assert classifier.main(["--out", str(out), "--steps", "1", "--batch", "4", "--eval-n", "8", *TINY]) == 0
    model = classifier.load_classifier(out)
    logits = model(torch.zeros(2, 3, 64, 64))
    assert [logit.shape[1] for logit in logits] == [4, 4, 4, 2, 4, 3, 3]
    assert set(record(out)["accuracy_fresh"]) >= {"period", "marks", "fine", "all"}


@pytest.mark.parametrize("arch", tb.ARCHITECTURES)
def test_generator_takes_a_step(arch, autoencoder_dir, tmp_path):
    out = tmp_path / arch
    argv = ["--arch", arch, "--autoencoder", str(autoencoder_dir), "--out", str(out), "--steps", "1", "--batch", "2", "--half-batch", "2", *TINY]
    assert train_generator.main(argv) == 0
    model = tb.load_transformer(arch, out)
    assert type(model).__name__ == ("FluxTransformer2DModel" if arch == "flux" else "SD3Transformer2DModel")
    rec = record(out)
    assert rec["arch"] == arch and rec["weights"] == "EMA" and {"full", "half"} <= set(rec["final_losses"])


def test_resumed_run_equals_an_uninterrupted_one(autoencoder_dir, tmp_path):
    def argv(out, *more):
        return ["--arch", "flux", "--autoencoder", str(autoencoder_dir), "--out", str(out), "--steps", "3", "--batch", "2", "--half-batch", "2", *TINY, *more]

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert train_generator.main(argv(straight)) == 0
    assert train_generator.main(argv(cut, "--stop-after", "1")) == 0
    assert (cut / training.CHECKPOINT).is_file() and not (cut / "config.json").exists()
    assert train_generator.main(argv(cut, "--resume", "--stop-after", "1")) == 0  # step 2 of 3
    moved = tmp_path / "moved"  # a checkpoint may move (as from a GPU machine to this one)
    cut.rename(moved)
    assert train_generator.main(argv(moved, "--resume")) == 0
    a = load_file(str(straight / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(moved / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert record(straight)["losses"] == record(moved)["losses"]
    assert record(moved)["sessions"] == 3 and record(moved)["steps_done"] == 3


def test_prefetched_scenes_are_the_same_stream():
    plain, ahead = train_generator.SceneStream(3, (2, 1), prefetch=False), train_generator.SceneStream(3, (2, 1), prefetch=True)
    for step in (0, 1, 2, 5):  # consecutive steps hit the prefetched batch, a jump renders afresh
        for (a, la), (b, lb) in zip(plain.take(step), ahead.take(step)):
            assert torch.equal(a, b) and torch.equal(la, lb)
    images, labels = plain.take(4)[1]
    assert images.shape == (1, 3, 32, 32) and labels.shape == (1, 7)  # the half-size batch
    assert train_generator.step_scenes(3, 4, (2, 0))[1] == (None, None)


def test_an_unusable_device_is_refused_with_one_line(autoencoder_dir, tmp_path, capsys):
    argv = ["--arch", "flux", "--autoencoder", str(autoencoder_dir), "--out", str(tmp_path / "g"), "--device", "nonsense", *TINY]
    assert training.main_guard(train_generator.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device nonsense" in err and "--device cpu" in err


def test_bad_resumes_are_refused_with_one_line(autoencoder_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--out", str(out), "--steps", "2", "--batch", "2", "--eval-n", "4", *TINY]
    assert classifier.main(base + ["--stop-after", "1"]) == 0
    capsys.readouterr()
    assert training.main_guard(classifier.main, base) == 2  # a checkpoint is there: --resume or remove it
    assert "pass --resume" in capsys.readouterr().err
    changed = ["--out", str(out), "--steps", "2", "--batch", "4", "--eval-n", "4", *TINY, "--resume"]
    assert training.main_guard(classifier.main, changed) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch: 2 -> 4" in err
    assert training.main_guard(train_generator.main, ["--arch", "sd3", "--autoencoder", str(tmp_path / "none"), "--out", str(tmp_path / "g")]) == 2
    assert "no testbed v2 autoencoder" in capsys.readouterr().err


def test_weights_are_found_like_v1s_and_missing_ones_stop_the_evaluation(tmp_path, monkeypatch, capsys):
    from ralu_lab.testbed.v2 import evaluate
    from ralu_lab.testbed.v2.location import PARTS, part_dir

    monkeypatch.setenv("RALU_TESTBED_WEIGHTS", str(tmp_path))
    assert [part_dir(part) for part in PARTS] == [tmp_path / "v2" / part for part in PARTS]
    assert part_dir("sd3", tmp_path / "mine") == tmp_path / "mine"
    with pytest.raises(ValueError, match="unknown testbed v2 part"):
        part_dir("vae")
    assert evaluate.main(["--arch", "flux", "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_generator --arch flux" in err


def test_the_evaluation_command_writes_its_json_and_markdown(v2_weights, tmp_path, capsys):
    from ralu_lab.testbed.v2 import evaluate

    parts = ["--autoencoder", str(v2_weights / "autoencoder"), "--classifier", str(v2_weights / "classifier")]
    argv = ["--arch", "sd3", "--weights", str(v2_weights / "sd3"), *parts, "--n", "4", "--reference-n", "16", "--threads", "1",
            "--json", str(tmp_path / "t.json"), "--report", str(tmp_path / "t.md")]
    assert evaluate.main(argv) == 1  # an untrained generator fails the checks
    report = json.loads((tmp_path / "t.json").read_text())
    assert set(report["results"]) == {"sd3"} and report["command"].endswith("t.md")
    text = (tmp_path / "t.md").read_text()
    assert "## SD3 generator" in text and "baseline draws what was asked: **FAILED**" in text
    assert "| period | fine | all |" in text and "marks |" not in text  # the prompt's attributes only
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--arch", "flux", "sd3", "--weights", str(v2_weights / "sd3")])
    assert stop.value.code == 2 and "single --arch" in capsys.readouterr().err
