"""Issue 26, item 1 (and the PNG mode of item 10): every write refuses, in one line and before
anything is created, a target that exists and is not a regular file, and never follows or
replaces a symbolic link (docs/hardening.md).

Device-like targets are made safely in tmp_path: a FIFO (os.mkfifo) and symbolic links.  The
one test that names /dev/null checks that it is refused before anything is opened, and that it
is still a character device afterwards.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import cli_checks
import pytest
from cli_checks import run_main
from PIL import Image

from ralu.calibrate import cli as calibrate_cli
from ralu.calibrate import plot as plot_cli
from ralu.runtime import batch
from ralu.runtime.cli import main as generate_main
from ralu.runtime.schedule import OutputPathError, load_schedule, save_schedule, write_bytes_atomic, write_text_atomic

FAST = ["--model", "flux", "--steps", 2, 3, 5, "--ends", 0.2, 0.3, 1.0, "--optimizer", "paper", "--quiet"]


def targets(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a link to a regular file, a dangling link and a folder, each next to the file it must not become."""
    (tmp_path / "good.json").write_text("keep me")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "good.json")
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "nowhere.json")
    (tmp_path / "folder").mkdir()
    return {"fifo": fifo, "link": link, "dangling": dangling, "folder": tmp_path / "folder"}


def assert_untouched(tmp_path: Path) -> None:
    """Nothing was replaced or written: the FIFO is a FIFO, the links are links, no temporary file is left."""
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "good.json").read_text() == "keep me"
    assert (tmp_path / "dangling.json").is_symlink() and not (tmp_path / "nowhere.json").exists()
    assert (tmp_path / "folder").is_dir() and not any((tmp_path / "folder").iterdir())
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("kind, words", [("fifo", ["FIFO", "Fix:"]), ("link", ["symbolic link", "good.json"]), ("dangling", ["symbolic link"]), ("folder", ["is a folder"])])
def test_atomic_writes_refuse_targets_that_are_not_regular_files(tmp_path, kind, words):
    target = targets(tmp_path)[kind]
    for write in (lambda: write_text_atomic(target, "x"), lambda: write_bytes_atomic(target, b"x"), lambda: save_schedule(load_schedule("flux-dev-7x"), target)):
        with pytest.raises(OutputPathError) as caught:
            write()
        message = str(caught.value)
        assert "\n" not in message and all(word in message for word in words), message
    assert_untouched(tmp_path)


def test_png_writer_refuses_a_fifo_and_a_link_and_writes_0644(tmp_path):
    found = targets(tmp_path)
    image = Image.new("RGB", (4, 4))
    for kind in ("fifo", "link"):
        with pytest.raises(OutputPathError):
            batch.save_png_atomic(image, found[kind])
    assert_untouched(tmp_path)
    old = os.umask(0o022)
    try:
        batch.save_png_atomic(image, tmp_path / "new.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.png").stat().st_mode) == 0o644  # like the manifest, not mkstemp's 0600


@pytest.mark.parametrize("option", ["--out", "--plot", "--plain-out"])
@pytest.mark.parametrize("kind", ["fifo", "link", "dangling"])
def test_calibrate_refuses_before_calibrating(tmp_path, capsys, monkeypatch, option, kind):
    def never(*args, **kwargs):
        raise AssertionError("calibrated although the output cannot be written")

    monkeypatch.setattr("ralu.calibrate.calibration.optimise", never)
    target = targets(tmp_path)[kind]
    others = {"--out": tmp_path / "s.json", "--plot": tmp_path / "s.png", "--plain-out": tmp_path / "plain.json"}
    others[option] = target
    argv = FAST + [arg for pair in others.items() for arg in pair]
    code, _, err = run_main(calibrate_cli.main, argv, capsys)
    cli_checks.assert_one_line_error("ralu-calibrate", code, err, option)
    assert_untouched(tmp_path)
    assert not (tmp_path / "s.json").exists()


def test_calibrate_refuses_dev_null_before_opening_it(capsys, monkeypatch):
    # The check is an lstat, made before any file is opened or probed: /dev/null stays a device.
    monkeypatch.setattr("ralu.calibrate.calibration.optimise", lambda *a, **k: (_ for _ in ()).throw(AssertionError("calibrated")))
    monkeypatch.setattr("tempfile.mkstemp", lambda *a, **k: (_ for _ in ()).throw(AssertionError("probed the folder of /dev/null")))
    code, _, err = run_main(calibrate_cli.main, FAST + ["--out", "/dev/null"], capsys)
    cli_checks.assert_one_line_error("ralu-calibrate", code, err, "--out /dev/null", "character device")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_plot_refuses_a_link_and_keeps_it(tmp_path, capsys):
    found = targets(tmp_path)
    code, _, err = run_main(plot_cli.main, ["flux-dev-7x", "-o", found["link"]], capsys)
    cli_checks.assert_one_line_error("ralu-plot", code, err, "-o", "symbolic link")
    code, _, err = run_main(plot_cli.main, ["flux-dev-7x", "-o", found["fifo"]], capsys)
    cli_checks.assert_one_line_error("ralu-plot", code, err, "FIFO")
    assert_untouched(tmp_path)


def test_calibrate_takes_a_300_character_name_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(calibrate_cli.main, FAST + ["--out", "a" * 300 + ".json"], capsys)
    cli_checks.assert_one_line_error("ralu-calibrate", code, err, "--out", "File name too long")
    # and a long name that the OS takes is written (the temporary name stays within 255)
    code, out, _ = run_main(calibrate_cli.main, FAST + ["--out", "b" * 250 + ".json"], capsys)
    assert code == 0 and load_schedule(tmp_path / ("b" * 250 + ".json"))


def test_generate_refuses_a_fifo_where_an_image_goes(saved_flux_pipeline, tmp_path, make_schedule, capsys):
    schedule = save_schedule(make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (2, 1.0, 2.2)], c=0.04, up_ratio=0.3, height=64, width=64), tmp_path / "tiny.json")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "000-tiny-seed0.png")
    argv = ["--model", saved_flux_pipeline, "--schedule", schedule, "--prompts", prompts, "--device", "cpu", "--out", out]
    code, _, err = run_main(generate_main, argv, capsys)
    cli_checks.assert_one_line_error("ralu-generate", code, err, "FIFO")  # before the pipeline is loaded: no progress bars
    assert stat.S_ISFIFO(os.lstat(out / "000-tiny-seed0.png").st_mode)
    # --prompt mode: --out an existing file is one line, before the pipeline is loaded
    argv = ["--model", saved_flux_pipeline, "--schedule", schedule, "--prompt", "a cat", "--device", "cpu", "--out", prompts]
    code, _, err = run_main(generate_main, argv, capsys)
    cli_checks.assert_one_line_error("ralu-generate", code, err, "is a file")
