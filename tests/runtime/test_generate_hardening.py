"""Issue 26: ralu-generate at its edges (items 3, 4, 6 and 10) and a seeded fuzz of its
arguments and prompts files.

Every case answers with one ``ralu-generate: error:`` line and exit status 2, or works; the
argument checks come before the schedule is read or a pipeline is loaded, so most cases need
no model at all.  The cases that must get past the checks run on the tiny FLUX pipeline.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cli_checks
import pytest
import torch
from cli_checks import run_main

from ralu.runtime import batch
from ralu.runtime import cli as generate_cli
from ralu.runtime.batch import read_prompts
from ralu.runtime.schedule import save_schedule


def run(argv, capsys):
    return run_main(generate_cli.main, argv, capsys)


def assert_refused(code, err, *words):
    """Exit 2, exactly one error line holding ``words``, no traceback (progress bars of a
    loaded pipeline may share stderr)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "ralu-generate: error:" in line]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def schedule_file(tmp_path, make_schedule):
    schedule = make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (2, 1.0, 2.2)], c=0.04, up_ratio=0.3, height=64, width=64)
    return str(save_schedule(schedule, tmp_path / "tiny.json"))


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cat\na blue dog\n")
    return path


# ----------------------------------------------------------------------------------------
# Item 3: every float setting finite and in range; items 6 and 10: seeds, devices, --out
# ----------------------------------------------------------------------------------------


def unavailable_devices() -> list[str]:
    devices = ["bogus", "meta", "cuda:99"]
    if not torch.cuda.is_available():
        devices.append("cuda")
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        devices.append("mps")
    return devices


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--guidance", "inf"], ["--guidance inf", "finite"]),
        (["--guidance", "nan"], ["--guidance nan"]),
        (["--guidance", "1e308"], ["--guidance 1e+308"]),
        (["--guidance", "-1"], ["--guidance -1.0"]),
        (["--true-cfg-scale", "inf"], ["--true-cfg-scale inf"]),
        (["--true-cfg-scale", "1e308"], ["--true-cfg-scale 1e+308"]),
        (["--true-cfg-scale", "nan", "--negative-prompt", "dog"], ["--true-cfg-scale nan"]),
        (["--seed", "-1"], ["--seed -1", "[0, 2**63)"]),
        (["--seed", str(2**64)], ["--seed 18446744073709551616"]),
        (["--seed", str(2**63 - 1), "--num-images", "2"], ["--seed 9223372036854775807"]),
        (["--num-images", "0"], ["--num-images 0"]),
        (["--prompt", "a \udcff cat"], ["--prompt", "lone surrogate"]),
        *[(["--device", device], ["--device"]) for device in unavailable_devices()],
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, capsys, extra, words):
    argv = ["--model", tmp_path / "no-model", "--schedule", "flux-dev-7x", "--out", tmp_path / "out"]
    argv += ([] if "--prompt" in extra else ["--prompt", "a cat"]) + extra
    code, _, err = run(argv, capsys)
    cli_checks.assert_one_line_error("ralu-generate", code, err, *words)
    assert not (tmp_path / "out").exists()


def test_seed_overflow_in_a_prompts_file_is_refused(tmp_path, capsys, prompts_file):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))  # read, never loaded
    argv = ["--model", tmp_path, "--schedule", "flux-dev-7x", "--prompts", prompts_file, "--seed", str(2**63 - 1), "--out", tmp_path / "out"]
    code, _, err = run(argv, capsys)
    assert_refused(code, err, "line 2", "2**63")


def test_out_that_is_a_file_or_a_bad_name_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, words in ((afile, ["is a file"]), (tmp_path / ("a" * 300), ["cannot be a folder name"])):
        code, _, err = run(["--model", tmp_path, "--schedule", "flux-dev-7x", "--prompt", "a cat", "--out", out], capsys)
        cli_checks.assert_one_line_error("ralu-generate", code, err, *words)
    assert afile.read_text() == "x"


@pytest.mark.parametrize("errno_, text", [(28, "No space left on device"), (30, "Read-only file system")])
def test_full_or_read_only_disk_is_one_line(saved_flux_pipeline, schedule_file, tmp_path, capsys, monkeypatch, errno_, text):
    def fail(*args, **kwargs):
        raise OSError(errno_, text)

    monkeypatch.setattr(os, "fsync", fail)  # the image is rendered, its write fails
    for what in (["--prompt", "a cat"], ["--prompts", str(tmp_path / "p.txt")]):
        (tmp_path / "p.txt").write_text("a cat\n")
        code, _, err = run(["--model", saved_flux_pipeline, "--schedule", schedule_file, *what, "--device", "cpu", "--out", tmp_path / "out"], capsys)
        assert_refused(code, err, text)
    assert not list((tmp_path / "out").glob(".*.tmp"))


# ----------------------------------------------------------------------------------------
# Item 4: one live run per --out folder
# ----------------------------------------------------------------------------------------


def test_a_second_live_run_on_one_folder_is_refused(saved_flux_pipeline, schedule_file, prompts_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--model", saved_flux_pipeline, "--schedule", schedule_file, "--prompts", prompts_file, "--device", "cpu", "--out", out]
    loaded = []
    monkeypatch.setattr(generate_cli, "load_pipeline", lambda *a, **k: loaded.append(1))
    with batch.folder_lock(out):  # the other run, alive
        code, _, err = run(argv, capsys)
    assert_refused(code, err, "another ralu-generate is writing to --out", "Fix:")
    assert not loaded and sorted(p.name for p in out.iterdir()) == [".ralu-generate.lock"]  # wrote nothing


def test_a_killed_run_leaves_no_stuck_lock(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from ralu.runtime.batch import folder_lock
        with folder_lock(Path({str(out)!r})):
            print("locked", flush=True)
            time.sleep(120)
    """)
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="another ralu-generate"):
            with batch.folder_lock(out):
                pass
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    with batch.folder_lock(out):  # the kernel released it with the process
        pass


# ----------------------------------------------------------------------------------------
# Items 6 and 10: prompts files
# ----------------------------------------------------------------------------------------


def test_prompts_file_bom_is_not_part_of_the_first_prompt(tmp_path):
    for name, text in (("p.txt", "a cat\n"), ("p.jsonl", json.dumps({"prompt": "a cat"}) + "\n")):
        path = tmp_path / name
        path.write_bytes("\ufeff".encode() + text.encode())
        assert read_prompts(path, 0)[0].prompt == "a cat"


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"prompt": "a cat", "prompt": "a dog"}', ["'prompt' is given twice"]),
        ('{"prompt": "a \\ud800 cat"}', ["lone surrogate"]),
        ('{"prompt": "a \\u0000 cat"}', ["NUL byte"]),
        ('{"prompt": "a cat", "negative_prompt": "\\udfff"}', ["negative_prompt", "lone surrogate"]),
        ('{"prompt": "a cat", "seed": ' + "9" * 5000 + "}", ["line 1"]),
        ("[" * 100000, ["line 1"]),
    ],
)
def test_bad_jsonl_lines_are_refused_in_one_line(tmp_path, line, words):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError) as caught:
        read_prompts(path, 0)
    message = str(caught.value)
    assert "\n" not in message and "Fix:" in message and all(word in message for word in words), message


def test_nul_byte_in_a_text_prompts_file_and_a_fifo_are_refused(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\na \0 dog\n")
    with pytest.raises(ValueError, match="line 2: the prompt holds a NUL byte"):
        read_prompts(path, 0)
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(ValueError, match="not a regular file"):  # and does not block reading it
        read_prompts(tmp_path / "fifo.txt", 0)


# ----------------------------------------------------------------------------------------
# The fuzz: 600 seeded argument vectors and prompts files, no model loaded
# ----------------------------------------------------------------------------------------

FLOATS = ["3.5", "0", "1", "1.5", "100", "100.0001", "-0.0", "-1", "nan", "inf", "-inf", "1e308", "1e-308", "x", ""]
INTS = ["0", "1", "2", "7", "100", "-1", str(2**63 - 1), str(2**63), str(2**64), "1.5", "x", "64", "1000000"]
PROMPT_LINES = ['{"prompt": "a cat"}', '{"prompt": "a cat", "seed": 3}', '{"prompt": "a", "prompt": "b"}', '{"prompt": "\\ud800"}', '{"prompt": "x\\u0000"}',
                '{"prompt": ""}', '{"prompt": 3}', '{"seed": -1, "prompt": "a"}', '{"prompt": "a", "seed": 1e3}', "[1]", "not json", "", "\ufeff{\"prompt\": \"a\"}",
                '{"prompt": "a", "negative_prompt": "b"}', '{"prompt": "a", "x": 1}', "{" * 50]


def pick(rng: random.Random, good: list, bad: list, p_good: float = 0.85):
    return rng.choice(good if rng.random() < p_good or not bad else bad)


def random_argv(rng: random.Random, folder: Path, model: Path, schedule: str) -> list[str]:
    argv = ["--model", str(pick(rng, [model], [folder / "missing", folder / "prompts.jsonl"])), "--schedule", pick(rng, [schedule], ["flux-dev-7x", "nothing", str(folder)])]
    if rng.random() < 0.5:
        argv += ["--prompt", pick(rng, ["a cat", "x" * 300], ["", "a \udcff"])]
    else:
        lines = [pick(rng, PROMPT_LINES[:2], PROMPT_LINES[2:], 0.8) for _ in range(rng.randint(0, 3))]
        name = rng.choice(["prompts.jsonl", "prompts.txt"])
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        argv += ["--prompts", str(folder / name)]
    counts = ["1", "2", "0", "-1", "1.5", "x", str(2**64)]
    for option, pool, good in (("--guidance", FLOATS, 5), ("--true-cfg-scale", FLOATS, 5), ("--seed", INTS, 5), ("--num-images", counts, 2), ("--height", ["64", *INTS], 1), ("--width", ["64", *INTS], 1)):
        if rng.random() < 0.2:
            argv += [option, pick(rng, pool[:good] or ["64"], pool[good:], 0.6)]
    if rng.random() < 0.2:
        argv += ["--negative-prompt", pick(rng, ["dog"], ["", "\udcff"], 0.6)]
    if rng.random() < 0.2:
        argv += ["--device", pick(rng, ["cpu", "cpu:0"], ["meta", "bogus", "cuda:7"], 0.6)]
    if rng.random() < 0.1:
        argv += ["--dtype", rng.choice(["float32", "float64"])]
    out = pick(rng, [folder / "out"], [folder / "prompts.jsonl", folder / "fifo", folder / "link", folder / ("o" * 300), folder], 0.8)
    argv += ["--out", str(out)]
    if rng.random() < 0.03:
        argv.pop(rng.randrange(len(argv)))
    return argv


def test_fuzz_generate_arguments_and_prompts_files(tmp_path, capsys, monkeypatch, make_schedule):
    """600 seeded argument vectors and prompts files on a saved (fake) FLUX folder: each run
    stops at a one-line error or, got past every check, at a stub pipeline that makes one
    small black image; no traceback, no non-finite number in any file written, no FIFO or link
    replaced."""
    from PIL import Image

    folder = tmp_path / "f"
    folder.mkdir()
    model = folder / "model"
    model.mkdir()
    components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    (model / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", **{name: ["transformers", "Stub"] for name in components}}))
    for name in components:
        (model / name).mkdir()
    schedule = str(save_schedule(make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (2, 1.0, 2.2)], c=0.04, up_ratio=0.3, height=64, width=64), folder / "tiny.json"))
    os.mkfifo(folder / "fifo")
    (folder / "target").write_text("keep")
    (folder / "link").symlink_to(folder / "target")

    class Stub:
        def __call__(self, **kwargs):
            for key in ("guidance_scale", "true_cfg_scale"):
                assert math.isfinite(kwargs.get(key, 0.0)), kwargs
            return type("Output", (), {"images": [Image.new("RGB", (8, 8))]})()

        def set_progress_bar_config(self, **kwargs):
            pass

    monkeypatch.setattr(generate_cli, "load_pipeline", lambda *args, **kwargs: Stub())
    rng = random.Random(2626)
    codes = {}
    for case in range(600):
        argv = random_argv(rng, folder, model, schedule)
        code, _, err = run(argv, capsys)
        codes[code] = codes.get(code, 0) + 1
        assert code in (0, 2) and "Traceback" not in err, (case, argv, err)
        if code == 2:
            assert len([line for line in err.splitlines() if "error:" in line]) == 1, (case, argv, err)
        assert os.path.islink(folder / "link") and (folder / "target").read_text() == "keep"
        assert os.path.exists(folder / "fifo") and not os.path.isfile(folder / "fifo")
    for written in folder.rglob("*"):
        if written.is_file() and written.suffix in (".jsonl", ".json") and written.parent.name == "out":
            text = written.read_text()
            assert "NaN" not in text and "Infinity" not in text, written
    assert codes.get(0, 0) >= 10 and codes.get(2, 0) >= 300, codes
