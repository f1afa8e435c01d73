"""ralu-generate --prompts: a prompts file shared among data-parallel processes, a manifest
that survives crashes, and reruns that resume.  Multi-process runs use torchrun on CPU
(gloo) with the tiny FLUX pipeline saved locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ralu.runtime import batch
from ralu.runtime.batch import Job, read_prompts
from ralu.runtime.cli import main
from ralu.runtime.schedule import save_schedule

PROMPTS = [
    {"prompt": "a red cat"},
    {"prompt": "a blue dog", "seed": 41},
    {"prompt": "a photo of the cat", "negative_prompt": "dog"},
    {"prompt": "the red dog"},
    {"prompt": "a cat"},
]


@pytest.fixture
def schedule_file(tmp_path, make_schedule):
    schedule = make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (2, 1.0, 2.2)], c=0.04, up_ratio=0.3, height=64, width=64)
    return str(save_schedule(schedule, tmp_path / "tiny-3x.json"))


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in PROMPTS))
    return path


def _args(model, schedule, prompts, out, *extra):
    return ["--model", str(model), "--schedule", schedule, "--prompts", str(prompts), "--seed", "10",
            "--true-cfg-scale", "1.5", "--device", "cpu", "--out", str(out), *extra]  # fmt: skip


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _assert_complete(out: Path, count: int) -> list[dict]:
    records = _manifest(out)
    assert [r["index"] for r in records] == list(range(count))  # each image exactly once, in order
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in records)
    assert not list(out.glob("manifest.part-*")) and not list(out.glob(".*.tmp"))
    return records


# ----------------------------------------------------------------------------------------
# The prompts file
# ----------------------------------------------------------------------------------------


def test_prompt_lines_and_seeds(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n  a dog  \n")
    assert read_prompts(text, 7, "blurry") == [Job(0, "a cat", 7, "blurry"), Job(1, "a dog", 8, "blurry")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x"}\n{"prompt": "y", "seed": 3, "negative_prompt": "z"}\n{"prompt": "w"}\n')
    # The seed of a line depends on its index only, never on which process makes it.
    assert read_prompts(jsonl, 100) == [Job(0, "x", 100), Job(1, "y", 3, "z"), Job(2, "w", 102)]


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2 is not JSON"),
        ('["a"]', "line 2 is not a JSON object"),
        ('{"prompt": "a", "neg": "b"}', "unknown keys ['neg']"),
        ('{"seed": 1}', "line 2 has no prompt"),
        ('{"prompt": "a", "seed": -1}', "seed -1 is not an integer"),
        ('{"prompt": "a", "seed": 1.5}', "seed 1.5 is not an integer"),
    ],
)
def test_bad_jsonl_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_prompts(path, 0)
    with pytest.raises(ValueError) as error:
        read_prompts(path, 0)
    assert message in str(error.value)


def test_cli_refuses_bad_prompt_files(saved_flux_pipeline, schedule_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    out = tmp_path / "out"
    assert main(_args(saved_flux_pipeline, schedule_file, empty, out)) == 2
    assert "holds no prompt" in capsys.readouterr().err
    assert main(_args(saved_flux_pipeline, schedule_file, tmp_path / "missing.txt", out)) == 2
    assert "cannot read the prompts file" in capsys.readouterr().err
    negative = tmp_path / "neg.jsonl"
    negative.write_text('{"prompt": "a cat", "negative_prompt": "dog"}\n')
    no_cfg = ["--model", str(saved_flux_pipeline), "--schedule", schedule_file, "--prompts", str(negative), "--out", str(out)]
    assert main(no_cfg) == 2
    assert "true CFG (prompt 0)" in capsys.readouterr().err
    assert main(_args(saved_flux_pipeline, schedule_file, negative, out, "--num-images", "2")) == 2
    assert "--num-images is for --prompt" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------
# One process
# ----------------------------------------------------------------------------------------


def test_batch_writes_images_and_manifest(saved_flux_pipeline, schedule_file, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(saved_flux_pipeline, schedule_file, prompts_file, out)) == 0
    records = _assert_complete(out, len(PROMPTS))
    assert [r["seed"] for r in records] == [10, 41, 12, 13, 14]
    assert records[2]["negative_prompt"] == "dog" and records[0]["negative_prompt"] is None
    assert {r["schedule"] for r in records} == {schedule_file}
    assert len({r["schedule_sha256"] for r in records}) == 1 and len(records[0]["schedule_sha256"]) == 64
    assert records[0]["parameters"] == {"height": 64, "width": 64, "guidance_scale": 3.5, "true_cfg_scale": 1.5, "dtype": "float32"}
    assert all(r["seconds"] > 0 for r in records)
    with Image.open(out / records[1]["file"]) as image:
        assert image.text["prompt"] == "a blue dog" and image.text["seed"] == "41"
    assert "5 images in" in capsys.readouterr().out

    # Image i of the batch is the image --prompt makes alone with the same seed.
    alone = tmp_path / "alone"
    single = ["--model", str(saved_flux_pipeline), "--schedule", schedule_file, "--prompt", "a photo of the cat", "--negative-prompt", "dog",
              "--true-cfg-scale", "1.5", "--seed", "12", "--device", "cpu", "--out", str(alone)]  # fmt: skip
    assert main(single) == 0
    (path,) = alone.glob("*.png")
    assert np.array_equal(_pixels(path), _pixels(out / records[2]["file"]))


def test_runs_without_accelerate_unless_launched(saved_flux_pipeline, schedule_file, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate now fails
    for name in batch.LAUNCHER_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert main(_args(saved_flux_pipeline, schedule_file, prompts, tmp_path / "one")) == 0
    _assert_complete(tmp_path / "one", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    capsys.readouterr()
    assert main(_args(saved_flux_pipeline, schedule_file, prompts, tmp_path / "two")) == 2
    error = capsys.readouterr().err
    assert "needs accelerate" in error and "pip install 'ralu[distributed]'" in error and error.count("\n") == 1


def test_ctrl_c_is_one_line_and_a_rerun_completes(saved_flux_pipeline, schedule_file, prompts_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    append = batch.PartWriter.append

    def interrupt_after_one(self, record):
        append(self, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(batch.PartWriter, "append", interrupt_after_one)
    assert main(_args(saved_flux_pipeline, schedule_file, prompts_file, out)) == 130
    said = [line for line in capsys.readouterr().err.splitlines() if "ralu-generate:" in line]  # besides the progress bars
    assert len(said) == 1 and "ralu-generate: interrupted" in said[0] and said[0].endswith("rerun the same command to make only the missing images")
    monkeypatch.undo()
    assert main(_args(saved_flux_pipeline, schedule_file, prompts_file, out)) == 0
    _assert_complete(out, len(PROMPTS))


def test_crash_then_resume_completes_without_duplicates(saved_flux_pipeline, schedule_file, prompts_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    append = batch.PartWriter.append
    rendered = []

    class Crash(Exception):
        """The process dies (kill -9, power loss) with two images durable."""

    def crash_after_two(self, record):
        append(self, record)
        rendered.append(record["index"])
        if len(rendered) == 2:
            raise Crash

    monkeypatch.setattr(batch.PartWriter, "append", crash_after_two)
    with pytest.raises(Crash):
        main(_args(saved_flux_pipeline, schedule_file, prompts_file, out))
    monkeypatch.undo()
    assert not (out / "manifest.jsonl").read_text()  # the merged manifest of the start: empty, never torn
    part = out / "manifest.part-0.jsonl"
    assert len(part.read_text().splitlines()) == 2
    with part.open("a") as stream:  # and a third record cut short by the crash
        stream.write('{"index": 2, "prompt": "a ph')
    (out / ".003-tiny-3x-seed13.png.x1.tmp").write_bytes(b"half a png")

    first = {name: (out / name).stat().st_mtime_ns for name in ("000-tiny-3x-seed10.png", "001-tiny-3x-seed41.png")}
    made = []
    monkeypatch.setattr(batch.PartWriter, "append", lambda self, record: (append(self, record), made.append(record["index"])))
    assert main(_args(saved_flux_pipeline, schedule_file, prompts_file, out)) == 0
    assert made == [2, 3, 4]  # only what was missing
    records = _assert_complete(out, len(PROMPTS))
    assert {name: (out / name).stat().st_mtime_ns for name in first} == first

    # A complete run reruns as a no-op, and a rerun after losing an image remakes just that one.
    made.clear()
    (out / records[3]["file"]).unlink()
    assert main(_args(saved_flux_pipeline, schedule_file, prompts_file, out)) == 0
    assert made == [3]
    assert _assert_complete(out, len(PROMPTS)) == records[:3] + _manifest(out)[3:4] + records[4:]


def test_rerun_with_other_settings_is_refused(saved_flux_pipeline, schedule_file, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps(line) + "\n" for line in PROMPTS[:2]))
    assert main(_args(saved_flux_pipeline, schedule_file, short, out)) == 0
    before = (out / "manifest.jsonl").read_text()
    assert main(_args(saved_flux_pipeline, schedule_file, short, out, "--guidance", "2.0")) == 2
    assert "another parameters" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "a dog"}\n')
    assert main(_args(saved_flux_pipeline, schedule_file, other, out)) == 2
    assert "another prompt ('a red cat', now 'a dog')" in capsys.readouterr().err
    assert (out / "manifest.jsonl").read_text() == before
    # Appending prompts to the file extends the job: only the new ones are made.
    assert main(_args(saved_flux_pipeline, schedule_file, prompts_file, out)) == 0
    _assert_complete(out, len(PROMPTS))
    assert (out / "manifest.jsonl").read_text().startswith(before)


# ----------------------------------------------------------------------------------------
# Two processes (torchrun, gloo on CPU)
# ----------------------------------------------------------------------------------------

CRASHING_RANK_1 = """
import os, sys
from ralu.runtime import batch
from ralu.runtime.cli import main

append = batch.PartWriter.append

def append_then_die(self, record):
    append(self, record)
    if os.environ["RANK"] == "1":
        os._exit(17)  # a hard crash right after the first image of process 1 is durable

batch.PartWriter.append = append_then_die
sys.exit(main(sys.argv[1:]))
"""


def _torchrun(target: list[str], argv: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *target, *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_a_crash(saved_flux_pipeline, schedule_file, prompts_file, tmp_path):
    one = tmp_path / "one"
    assert main(_args(saved_flux_pipeline, schedule_file, prompts_file, one)) == 0
    reference = _assert_complete(one, len(PROMPTS))

    # Process 1 dies after its first image; the launcher stops the other one.
    two = tmp_path / "two"
    script = tmp_path / "crashing.py"
    script.write_text(CRASHING_RANK_1)
    crashed = _torchrun([str(script)], _args(saved_flux_pipeline, schedule_file, prompts_file, two))
    assert crashed.returncode != 0
    assert len((two / "manifest.part-1.jsonl").read_text().splitlines()) == 1
    assert len(list(two.glob("*.png"))) < len(PROMPTS)

    resumed = _torchrun(["-m", "ralu.runtime.cli"], _args(saved_flux_pipeline, schedule_file, prompts_file, two))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("5 images in") == 1  # only the main process reports
    records = _assert_complete(two, len(PROMPTS))
    assert [{**r, "seconds": 0} for r in records] == [{**r, "seconds": 0} for r in reference]
    for record in records:  # bit for bit the images of the single process
        assert (two / record["file"]).read_bytes() == (one / record["file"]).read_bytes()


def test_batch_module_stays_light():
    code = (
        "import sys, ralu.runtime.cli, ralu.runtime.batch\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('accelerate', 'optuna', 'scipy', 'matplotlib', 'torch', 'diffusers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
