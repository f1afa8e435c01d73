"""The commands and examples of the README and of the docs pages (docs/*.md) are the ones that work.

Runtime examples load real weights from a local folder; here they run as written on tiny
real-class pipelines saved to a temporary folder, with the folder path, device and dtype
substituted (a CPU machine has no CUDA and no FLUX weights).  Every python block of
README.md and of every docs page runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
#: the Markdown whose python blocks run: the README and every docs page
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
FLUX_FOLDER = "/models/FLUX.1-dev"
SD3_FOLDER = "/models/stable-diffusion-3-medium-diffusers"
CHROMA_FOLDER = "/models/Chroma1-HD"


def code_blocks(language, text=README):
    """The page's ``language`` blocks fenced at the start of a line (a block indented inside a
    list, such as docs/scale-out.md's multi-GPU torchrun script, is an illustration)."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def page_blocks(language):
    """``(page, index)`` of every ``language`` block of the README and the docs pages."""
    return [(page, i) for page in PAGES for i in range(len(code_blocks(language, (ROOT / page).read_text())))]


def on_cpu(block: str, folder: str, path: Path) -> str:
    for dtype in ("torch.bfloat16", "torch.float16"):
        block = block.replace(dtype, "torch.float32")
    return block.replace(folder, str(path)).replace('"cuda"', '"cpu"')


@pytest.fixture(scope="module")
def saved_sd3_pipeline(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline
    from sd3_models import pipeline_components, tiny_sd3_text_stack, tiny_transformer

    components = pipeline_components("sd3")
    components["transformer"] = tiny_transformer(pos_embed_max_size=64, sample_size=128)
    components.update(tiny_sd3_text_stack())
    folder = tmp_path_factory.mktemp("readme-sd3")
    StableDiffusion3Pipeline(**components).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_chroma_pipeline(tmp_path_factory):
    from chroma_models import components
    from diffusers import ChromaPipeline

    folder = tmp_path_factory.mktemp("readme-chroma")
    ChromaPipeline(**components(with_text=True)).save_pretrained(folder)
    return folder


def test_ci_runs_the_readme_test_command():
    setup = code_blocks("bash")[:2]
    assert "ralu-calibrate --model flux --speedup 7" in setup[0]
    assert "pytest" in setup[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup[1].strip() in ci


def test_examples_moved_to_the_docs_still_run():
    """The examples the README held before it became an entry run from their docs pages."""
    pages = {page for page, _ in page_blocks("python")}
    assert {"README.md", "docs/calibration.md", "docs/runtime.md", "docs/quality.md"} <= pages
    assert len(page_blocks("python")) >= 7


@pytest.mark.parametrize(("page", "index"), page_blocks("python"))
def test_python_examples_run(page, index, tmp_path, monkeypatch, request):
    block = code_blocks("python", (ROOT / page).read_text())[index]
    if FLUX_FOLDER in block:
        block = on_cpu(block, FLUX_FOLDER, request.getfixturevalue("saved_flux_pipeline"))
    if SD3_FOLDER in block:
        block = on_cpu(block, SD3_FOLDER, request.getfixturevalue("saved_sd3_pipeline"))
    if CHROMA_FOLDER in block:
        block = on_cpu(block, CHROMA_FOLDER, request.getfixturevalue("saved_chroma_pipeline"))
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"{page} python block {index}", "exec"), {})
    assert "/models/" not in block


def test_shipped_table_in_readme_matches_files():
    from ralu.runtime import load_schedule

    rows = re.findall(r"^\| `([a-z0-9.-]+x(?:-searched)?)` \| ([0-9/]+) \| ([0-9.]+)x \| ([0-9.]+) \|$", README, flags=re.M)
    assert len(rows) == 10 and sum(name.endswith("-searched") for name, *_ in rows) == 5
    for name, steps, speedup, js in rows:
        schedule = load_schedule(name)
        assert steps == "/".join(str(s.steps) for s in schedule.stages)
        assert float(speedup) == pytest.approx(schedule.flops_speedup.linear, abs=0.006)
        assert float(js) == pytest.approx(schedule.divergence.js_distance, abs=6e-5)
