"""``ralu-calibrate --magcache SCHEDULE``: MagCache ratios per stage measured on a pipeline (the lab's offline testbed v2 here)."""

import pytest
import torch

from ralu.calibrate import cli
from ralu.calibrate.magcache import measure_mag_ratios
from ralu.calibrate.quality_search import to_ralu
from ralu.runtime.schedule import load_schedule
from ralu_lab.testbed.v2 import data
from ralu_lab.testbed.v2 import model as tb


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.lab  # the product driven through the lab's testbed (docs/architecture.md)
def test_writes_the_schedule_with_the_ratios_measured_per_stage(tmp_path, capsys):
    torch.set_num_threads(1)
    labels = data.balanced_labels(3, 5)
    prompts = data.describe(labels)
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "7x-magcache.json"
    code, stdout, stderr = run_cli(["--model", "flux", "--magcache", "flux-dev-7x", "--pipeline", "testbed", "--prompts", file, "--batch-size", 2,
                                    "--magcache-threshold", 0.1, "--out", out], capsys)
    assert code == 0, stderr
    written = load_schedule(out)
    assert written.cache.kind == "magcache" and written.cache.threshold == 0.1
    assert [len(stage) for stage in written.cache.mag_ratios] == [2, 3, 5]
    # the same measurement from Python: prompts in batches of 2, seeds --seed + index (0, 1, 2)
    # (--pipeline testbed is the lab's testbed v2, registered in the entry-point group ralu.quality_targets)
    pipe = to_ralu(tb.load_pipeline("flux"))
    schedule = tb.testbed_schedule("flux-dev-7x", "flux")

    def inputs(batch):
        call = tb.call_inputs("flux", batch)
        return {k: v for k, v in call.items() if k not in ("height", "width", "guidance_scale")}

    calls = [{**inputs(labels[i : i + 2]), "guidance_scale": tb.GUIDANCE_SCALE["flux"], "generator": [torch.Generator().manual_seed(s) for s in range(i, min(i + 2, 3))]}
             for i in (0, 2)]
    expected = measure_mag_ratios(pipe, schedule, calls)
    assert written.cache.mag_ratios == [[pytest.approx(r, abs=2e-6) for r in stage] for stage in expected]
    assert "stage 3:" in stdout and str(out) in stdout
    # everything but the cache section is the shipped schedule (at the testbed's size)
    assert written.model_copy(update={"cache": None}) == schedule


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "sd3", "--magcache", "flux-dev-7x", "--pipeline", "testbed", "--prompts", "p.txt"], "--model is sd3-medium"),
    (["--model", "flux", "--magcache", "flux-dev-7x", "--speedup", 4, "--pipeline", "testbed", "--prompts", "p.txt"], "--speedup calibrates a new one"),
    (["--model", "flux", "--magcache", "flux-dev-7x"], "needs --pipeline, --prompts"),
    (["--model", "flux", "--magcache", "no-such-schedule", "--pipeline", "testbed", "--prompts", "p.txt"], "no-such-schedule"),
    (["--model", "flux", "--magcache", "flux-dev-7x", "--pipeline", "testbed", "--prompts", "p.txt", "--magcache-threshold", 2], "--magcache-threshold"),
])
def test_bad_input_is_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a blue square, bottom-right\n")
    code, _, stderr = run_cli([*argv, "--out", tmp_path / "m.json"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and message in stderr
    assert not (tmp_path / "m.json").exists()
