"""``ralu-generate``: images from a local diffusers pipeline folder with a RALU schedule.

Loads nothing from the network (``local_files_only``).  The pipeline class follows the
folder's ``model_index.json`` ``_class_name`` through the family registry
(:data:`ralu.runtime.models.FAMILIES`): FluxPipeline -> RALUFluxPipeline,
StableDiffusion3Pipeline -> RALUStableDiffusion3Pipeline, and so on.

``--prompt`` makes ``--num-images`` images of one prompt in this process; ``--prompts FILE``
makes one image per line of a file, shared among the processes of a launcher and resumable
(see ``ralu.runtime.batch``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _pipelines() -> dict[str, tuple[str, str, str]]:
    """model_index.json ``_class_name`` -> (module, RALU pipeline class, family), from the
    family registry: each family's diffusers pipelines and its own RALU class (a folder saved
    by an older ralu may name the RALU class)."""
    from ralu.runtime.models import FAMILIES

    table = {}
    for family in FAMILIES.values():
        for name in (*family.base_pipelines, family.pipeline):
            table[name] = ("ralu.runtime", family.pipeline, family.name)
    return table


PIPELINES: dict[str, tuple[str, str, str]] = _pipelines()


class CLIError(Exception):
    """A user error: printed as one message, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ralu-generate",
        description="Generate images with RALU (region-adaptive latent upsampling) from a local diffusers pipeline folder.",
    )
    parser.add_argument("--model", required=True, help="local diffusers pipeline folder (with model_index.json); nothing is downloaded")
    parser.add_argument("--schedule", required=True, help="shipped schedule name (e.g. flux-dev-7x) or path to a schedule JSON file")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text prompt")
    what.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts file: one prompt per line, or *.jsonl with {\"prompt\", \"seed\", \"negative_prompt\"} per line; "
        "runs data-parallel under torchrun / accelerate launch, writes OUT/manifest.jsonl and skips images already made",
    )
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (needs classifier-free guidance: --true-cfg-scale > 1 for FLUX.1 and Qwen-Image, --guidance > 1 for the others); with --prompts, for lines without their own")
    parser.add_argument("--true-cfg-scale", type=float, default=None, help="true classifier-free guidance scale of guidance-distilled families (FLUX.1, Qwen-Image; > 1 enables it)")
    parser.add_argument("--image", metavar="FILE", default=None, help="reference image to edit, for families that take one (FLUX.1 Kontext); every image of the run uses it")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: the schedule's)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the schedule's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i (or prompt i of --prompts without its own seed) uses seed + i (default 0)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's, e.g. FLUX.1 distilled guidance 3.5, SD3 CFG 7.0)")
    parser.add_argument("--num-images", type=int, default=None, help="number of images of --prompt (default 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="model dtype (default: bfloat16 on cuda, float32 otherwise)")
    parser.add_argument("--out", required=True, help="output folder for the PNG files")
    return parser


def pipeline_class(model_dir: Path):
    """The RALU pipeline class for a local pipeline folder, and its family."""
    if not model_dir.is_dir():
        raise CLIError(f"model folder {str(model_dir)!r} does not exist. Fix: pass a local diffusers pipeline folder (saved with save_pretrained or downloaded beforehand)")
    index = model_dir / "model_index.json"
    if not index.is_file():
        raise CLIError(f"{str(model_dir)!r} has no model_index.json, so it is not a diffusers pipeline folder. Fix: pass the folder that holds model_index.json")
    try:
        config = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CLIError(f"{index} is not a readable JSON model_index.json ({type(error).__name__}: {str(error).splitlines()[0]}). Fix: pass an intact pipeline folder (re-save or re-download it)") from None
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if not isinstance(class_name, str):
        raise CLIError(f"{index} names no pipeline class (no string _class_name). Fix: pass an intact pipeline folder (re-save or re-download it)")
    if class_name not in PIPELINES:
        raise CLIError(f"{str(model_dir)!r} holds a {class_name!r}; ralu-generate runs {sorted(name for name in PIPELINES if not name.startswith('RALU'))}")
    module_name, attribute, family = PIPELINES[class_name]
    try:
        return getattr(importlib.import_module(module_name), attribute), family
    except (ImportError, AttributeError) as error:
        raise CLIError(f"{class_name} needs {module_name}.{attribute}, which is not available in this ralu installation ({error})") from None


def check_text_components(model_dir: Path, family: str) -> None:
    """The folder (its model_index.json already read by :func:`pipeline_class`) must hold the
    text encoders and tokenizers ``--prompt`` needs: listed, and saved as subfolders."""
    from ralu.runtime.models import get_family

    config = json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))
    missing = [name for name in get_family(family).text_components if not (isinstance(config.get(name), list) and None not in config[name] and (model_dir / name).is_dir())]
    if missing:
        raise CLIError(f"{str(model_dir)!r} lacks {'/'.join(missing)}, needed to encode --prompt. Fix: pass a complete pipeline folder (with its text encoders and tokenizers)")


def png_name(schedule_arg: str, seed: int, index: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(schedule_arg).stem) or "ralu"
    return f"{index:03d}-{stem}-seed{seed}.png"


@dataclass
class Setup:
    """Everything checked before a pipeline is loaded."""

    cls: type
    family: str
    schedule: Any
    call: dict  # pipeline keyword arguments shared by every image (no prompt, no generator)
    #: The ``--image`` reference (a PIL image) and what the records say of it (file, digest).
    image: Any = None
    image_record: dict | None = None


def prepare(args: argparse.Namespace) -> Setup:
    """Check the folder, schedule, resolution and options; load nothing heavy."""
    from ralu.runtime.models import check_resolution, get_family
    from ralu.runtime.plan import check_schedule
    from ralu.runtime.schedule import load_schedule

    cls, family = pipeline_class(Path(args.model))
    height, width = args.height, args.width
    try:
        schedule = load_schedule(args.schedule)
        height = schedule.height if height is None else height
        width = schedule.width if width is None else width
        check_resolution(height, width)
        check_schedule(schedule, family, height, width)
    except ValueError as error:  # ScheduleError included
        raise CLIError(str(error)) from None

    call = {"height": height, "width": width, "schedule": schedule}
    spec = get_family(family)
    call["guidance_scale"] = spec.default_guidance if args.guidance is None else args.guidance
    if args.true_cfg_scale is not None:
        if spec.cfg_argument != "true_cfg_scale":
            raise CLIError(f"--true-cfg-scale is for families with optional true CFG; {spec.title} runs classifier-free guidance with --guidance")
        call["true_cfg_scale"] = args.true_cfg_scale
    image, image_record = None, None
    if args.image is not None:
        if not spec.reference_image:
            raise CLIError(f"--image: {spec.title} generates from text only. Fix: drop --image, or use a family that edits a reference image (FLUX.1 Kontext)")
        image, image_record = read_reference_image(args.image)
    return Setup(cls, family, schedule, call, image, image_record)


def read_reference_image(path: str) -> tuple[Any, dict]:
    """The ``--image`` file as an RGB PIL image, and its record (file name and SHA-256, so a
    resumed ``--prompts`` run refuses a folder made with another reference)."""
    import hashlib

    from PIL import Image, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CLIError(f"--image {path!r} is not a readable image ({reason}). Fix: pass a PNG or JPEG file") from None
    return image, {"file": Path(path).name, "sha256": hashlib.sha256(data).hexdigest()}


def check_negative_prompt(setup: Setup, negative_prompt: str | None, where: str = "") -> None:
    """A negative prompt needs the family's classifier-free guidance on (its CFG argument > 1)."""
    from ralu.runtime.models import get_family

    if negative_prompt is None:
        return
    spec = get_family(setup.family)
    if setup.call.get(spec.cfg_argument, 1.0) > 1.0:
        return
    if spec.cfg_argument == "true_cfg_scale":
        raise CLIError(f"{spec.title} ignores a negative prompt without true CFG{where}. Fix: add --true-cfg-scale (e.g. 4.0), or drop the negative prompt")
    raise CLIError(f"{spec.title} ignores a negative prompt without classifier-free guidance{where}. Fix: use --guidance > 1 (e.g. {spec.default_guidance}), or drop the negative prompt")


def choose_device(args: argparse.Namespace, launcher_device: str | None = None) -> tuple[str, str]:
    """(device, dtype name).  Under a launcher, a bare ``cuda`` (or no --device) means this
    process's own GPU."""
    import torch

    device = args.device or launcher_device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and launcher_device is not None and launcher_device.startswith("cuda"):
        device = launcher_device
    dtype_name = args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    return device, dtype_name


def load_pipeline(setup: Setup, args: argparse.Namespace, device: str, dtype_name: str):
    import torch

    check_text_components(Path(args.model), setup.family)
    try:
        pipe = setup.cls.from_pretrained(args.model, local_files_only=True, dtype=getattr(torch, dtype_name))
    except (OSError, ValueError) as error:
        raise CLIError(f"could not load the pipeline from {args.model!r} without the network: {error}") from None
    pipe = pipe.to(device)
    if hasattr(pipe, "plan"):  # the pipeline's own checks (its VAE's scale factor), before any compute
        try:
            pipe.plan(setup.schedule, setup.call["height"], setup.call["width"])
        except ValueError as error:
            raise CLIError(str(error)) from None
    return pipe


def parameters(setup: Setup) -> dict:
    """The call's settings besides prompts and schedule (PNG metadata, manifest records)."""
    settings = {key: value for key, value in setup.call.items() if key != "schedule"}
    if setup.image_record is not None:
        settings["image"] = setup.image_record
    return settings


def render(pipe, setup: Setup, args: argparse.Namespace, device: str, prompt: str, negative_prompt: str | None, seed: int):
    """One image from its own CPU generator: (PIL image, PngInfo metadata, seconds)."""
    import torch
    from PIL.PngImagePlugin import PngInfo

    call = dict(setup.call, prompt=prompt)
    if setup.image is not None:
        call["image"] = setup.image
    if negative_prompt is not None:
        call["negative_prompt"] = negative_prompt
    generator = torch.Generator("cpu").manual_seed(seed)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    image = pipe(generator=generator, **call).images[0]
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    info = PngInfo()
    info.add_text("prompt", prompt)
    if negative_prompt is not None:
        info.add_text("negative_prompt", negative_prompt)
    info.add_text("seed", str(seed))
    info.add_text("schedule", args.schedule)
    info.add_text("schedule_json", setup.schedule.model_dump_json())
    info.add_text("model", str(args.model))
    info.add_text("parameters", json.dumps(parameters(setup)))
    return image, info, elapsed


#: Largest --guidance and --true-cfg-scale: far above any useful scale (FLUX 3.5, SD3 7, true
#: CFG 4), small enough that the guided prediction stays finite in bfloat16.
MAX_GUIDANCE = 100.0
#: Seeds are integers in [0, 2**63), as in a prompts file (torch's generators take them all).
SEED_LIMIT = 2**63


def check_arguments(args: argparse.Namespace) -> None:
    """The numbers and the device, before the schedule is read or anything is loaded: every
    float finite and in range, every seed usable, the device one this machine has."""
    import math

    for option, value in (("--guidance", args.guidance), ("--true-cfg-scale", args.true_cfg_scale)):
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= MAX_GUIDANCE):
            raise CLIError(f"{option} {value!r} is not a finite number in [0, {MAX_GUIDANCE:g}]. Fix: e.g. {option} 4.0")
    if args.num_images is not None and args.num_images < 1:
        raise CLIError(f"--num-images {args.num_images}: must be at least 1")
    last = args.seed + (0 if args.prompts is not None else (args.num_images or 1) - 1)
    if not 0 <= args.seed or not last < SEED_LIMIT:
        raise CLIError(f"--seed {args.seed}: seeds must be integers in [0, 2**63) (the last image's seed is --seed + --num-images - 1). Fix: a smaller non-negative --seed")
    from ralu.runtime.batch import text_problem

    for option, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        problem = text_problem(text)
        if problem is not None:
            raise CLIError(f"{option} {problem}")
    if args.device is not None:
        check_device(args.device)
    try:
        is_file = Path(args.out).exists() and not Path(args.out).is_dir()
    except (OSError, ValueError) as error:  # a name too long, a NUL byte
        raise CLIError(f"--out {args.out!r} cannot be a folder name ({getattr(error, 'strerror', None) or error}). Fix: pass a shorter, plain folder name") from None
    if is_file:
        raise CLIError(f"--out {args.out!r} is a file; --out names a folder for the PNG files. Fix: pass a folder (it is created if missing)")


def check_device(device: str) -> None:
    """Refuse a ``--device`` torch cannot parse or this machine does not have."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise CLIError(f"--device {device!r} is not a torch device. Fix: e.g. --device cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "meta":
        raise CLIError("--device meta holds no data, so it cannot make images. Fix: --device cpu or cuda")
    backend = {"mps": getattr(torch.backends, "mps", None)}.get(parsed.type, getattr(torch, parsed.type, None))
    if parsed.type != "cpu" and not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
        raise CLIError(f"--device {device!r}: this machine has no {parsed.type} device. Fix: --device cpu, or leave --device out")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise CLIError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s). Fix: an index below that, or --device cuda")


def make_out_folder(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot create the output folder {args.out!r} ({error.strerror or error}). Fix: pass a writable --out folder") from None
    return out


def run(args: argparse.Namespace) -> list[Path]:
    check_arguments(args)
    if args.prompts is not None:
        return run_prompts(args)
    num_images = 1 if args.num_images is None else args.num_images
    setup = prepare(args)
    check_negative_prompt(setup, args.negative_prompt)
    check_text_components(Path(args.model), setup.family)
    out = make_out_folder(args)  # after every check, before the pipeline is loaded
    device, dtype_name = choose_device(args)
    pipe = load_pipeline(setup, args, device, dtype_name)

    from ralu.runtime.batch import save_png_atomic

    written = []
    for index in range(num_images):
        seed = args.seed + index
        image, info, elapsed = render(pipe, setup, args, device, args.prompt, args.negative_prompt, seed)
        path = out / png_name(args.schedule, seed, index)
        try:
            save_png_atomic(image, path, info)
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot write {path} ({getattr(error, 'strerror', None) or error}). Fix: free space, or pass a writable --out folder") from None
        written.append(path)
        print(f"{path}: {elapsed:.3f} s/image (seed {seed})", flush=True)
    return written


def run_prompts(args: argparse.Namespace) -> list[Path]:
    """``--prompts``: every prompt of a file, shared among the launched processes, resumable."""
    from ralu.runtime import batch

    if args.num_images is not None:
        raise CLIError("--num-images is for --prompt; with --prompts every line is one image. Fix: repeat a line (each line gets its own seed) or drop --num-images")
    setup = prepare(args)
    try:
        jobs = batch.read_prompts(args.prompts, args.seed, args.negative_prompt)
    except ValueError as error:
        raise CLIError(str(error)) from None
    for job in jobs:
        check_negative_prompt(setup, job.negative_prompt, f" (prompt {job.index})")
    out = make_out_folder(args)

    device, _ = choose_device(args)
    try:
        processes = batch.join_processes(cpu=device.startswith("cpu"))
    except ValueError as error:
        raise CLIError(str(error)) from None
    try:
        device, dtype_name = choose_device(args, processes.device)
        common = {
            "schedule": args.schedule,
            "schedule_sha256": batch.schedule_sha256(setup.schedule),
            "parameters": dict(parameters(setup), dtype=dtype_name),
        }

        def make_renderer():
            if not processes.is_main:  # one process draws bars: the batch's own
                from diffusers.utils import logging as diffusers_logging
                from transformers.utils import logging as transformers_logging

                diffusers_logging.disable_progress_bar()
                transformers_logging.disable_progress_bar()
            pipe = load_pipeline(setup, args, device, dtype_name)
            pipe.set_progress_bar_config(disable=True)  # the batch has its own bar
            return lambda job: render(pipe, setup, args, device, job.prompt, job.negative_prompt, job.seed)

        try:
            # One live run per folder: the main process holds the folder's lock for the whole run.
            with batch.folder_lock(out) if processes.is_main else contextlib.nullcontext():
                result = batch.run_batch(jobs, out, processes, lambda job: png_name(args.schedule, job.seed, job.index), common, make_renderer)
        except ValueError as error:
            raise CLIError(str(error)) from None
    finally:
        processes.close()
    if processes.is_main:
        print(f"{len(jobs)} images in {out} ({result.skipped} were already there); manifest: {result.manifest}", flush=True)
    return [out / record["file"] for record in result.made]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CLIError as error:
        print(f"ralu-generate: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only file system: what the checks cannot foresee
        where = f" ({error.filename})" if error.filename else ""
        print(f"ralu-generate: error: {error.strerror or error}{where}. Fix: free space or pass a writable --out folder; a rerun of --prompts makes only the missing images", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = "; rerun the same command to make only the missing images" if args.prompts else ""
        print(f"ralu-generate: interrupted (the images written so far are complete){kept}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
