"""``ralu-generate``: images from a local diffusers pipeline folder with a RALU schedule.

Loads nothing from the network (``local_files_only``).  The pipeline class follows the
folder's ``model_index.json`` ``_class_name``: FluxPipeline -> RALUFluxPipeline,
StableDiffusion3Pipeline -> RALUStableDiffusion3Pipeline.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
from pathlib import Path

#: model_index.json ``_class_name`` -> (module, RALU pipeline class, family)
PIPELINES: dict[str, tuple[str, str, str]] = {
    "FluxPipeline": ("ralu.runtime", "RALUFluxPipeline", "flux"),
    "RALUFluxPipeline": ("ralu.runtime", "RALUFluxPipeline", "flux"),
    "StableDiffusion3Pipeline": ("ralu.runtime", "RALUStableDiffusion3Pipeline", "sd3"),
    "RALUStableDiffusion3Pipeline": ("ralu.runtime", "RALUStableDiffusion3Pipeline", "sd3"),
}


#: Text components a family's pipeline needs to encode ``--prompt`` (SD3's T5 is optional).
TEXT_COMPONENTS: dict[str, tuple[str, ...]] = {
    "flux": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "sd3": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}


class CLIError(Exception):
    """A user error: printed as one message, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ralu-generate",
        description="Generate images with RALU (region-adaptive latent upsampling) from a local diffusers pipeline folder.",
    )
    parser.add_argument("--model", required=True, help="local diffusers pipeline folder (with model_index.json); nothing is downloaded")
    parser.add_argument("--schedule", required=True, help="shipped schedule name (e.g. flux-dev-7x) or path to a schedule JSON file")
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (FLUX: needs --true-cfg-scale > 1; SD3: --guidance > 1)")
    parser.add_argument("--true-cfg-scale", type=float, default=None, help="FLUX true classifier-free guidance scale (> 1 enables it)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: the schedule's)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the schedule's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default 0)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (FLUX distilled guidance, default 3.5; SD3 CFG, default 7.0)")
    parser.add_argument("--num-images", type=int, default=1, help="number of images (default 1)")
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
        raise CLIError(f"{str(model_dir)!r} holds a {class_name!r}; ralu-generate runs {sorted(set(PIPELINES) - {'RALUFluxPipeline', 'RALUStableDiffusion3Pipeline'})}")
    module_name, attribute, family = PIPELINES[class_name]
    try:
        return getattr(importlib.import_module(module_name), attribute), family
    except (ImportError, AttributeError) as error:
        raise CLIError(f"{class_name} needs {module_name}.{attribute}, which is not available in this ralu installation ({error})") from None


def check_text_components(model_dir: Path, family: str) -> None:
    """The folder (its model_index.json already read by :func:`pipeline_class`) must hold the
    text encoders and tokenizers ``--prompt`` needs: listed, and saved as subfolders."""
    config = json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))
    missing = [name for name in TEXT_COMPONENTS[family] if not (isinstance(config.get(name), list) and None not in config[name] and (model_dir / name).is_dir())]
    if missing:
        raise CLIError(f"{str(model_dir)!r} lacks {'/'.join(missing)}, needed to encode --prompt. Fix: pass a complete pipeline folder (with its text encoders and tokenizers)")


def png_name(schedule_arg: str, seed: int, index: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(schedule_arg).stem) or "ralu"
    return f"{index:03d}-{stem}-seed{seed}.png"


def run(args: argparse.Namespace) -> list[Path]:
    from ralu.runtime.plan import check_resolution, check_schedule
    from ralu.runtime.schedule import load_schedule

    if args.num_images < 1:
        raise CLIError(f"--num-images {args.num_images}: must be at least 1")
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

    call = {"prompt": args.prompt, "height": height, "width": width, "schedule": schedule}
    if args.negative_prompt is not None:
        call["negative_prompt"] = args.negative_prompt
    if family == "flux":
        call["guidance_scale"] = 3.5 if args.guidance is None else args.guidance
        if args.true_cfg_scale is not None:
            call["true_cfg_scale"] = args.true_cfg_scale
        if args.negative_prompt is not None and (args.true_cfg_scale or 1.0) <= 1.0:
            raise CLIError("FLUX ignores a negative prompt without true CFG. Fix: add --true-cfg-scale (e.g. 4.0), or drop --negative-prompt")
    else:
        if args.true_cfg_scale is not None:
            raise CLIError("--true-cfg-scale is for FLUX; for SD3 use --guidance")
        if args.guidance is not None:
            call["guidance_scale"] = args.guidance
        if args.negative_prompt is not None and args.guidance is not None and args.guidance <= 1.0:
            raise CLIError("SD3 ignores a negative prompt without classifier-free guidance. Fix: use --guidance > 1 (e.g. 7.0), or drop --negative-prompt")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    check_text_components(Path(args.model), family)
    try:
        pipe = cls.from_pretrained(args.model, local_files_only=True, dtype=getattr(torch, dtype_name))
    except (OSError, ValueError) as error:
        raise CLIError(f"could not load the pipeline from {args.model!r} without the network: {error}") from None
    pipe = pipe.to(device)
    if hasattr(pipe, "plan"):  # the pipeline's own checks (its VAE's scale factor), before any compute
        try:
            pipe.plan(schedule, height, width)
        except ValueError as error:
            raise CLIError(str(error)) from None

    from PIL.PngImagePlugin import PngInfo

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(args.num_images):
        seed = args.seed + index
        generator = torch.Generator("cpu").manual_seed(seed)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        image = pipe(generator=generator, **call).images[0]
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        info = PngInfo()
        info.add_text("prompt", args.prompt)
        if args.negative_prompt is not None:
            info.add_text("negative_prompt", args.negative_prompt)
        info.add_text("seed", str(seed))
        info.add_text("schedule", args.schedule)
        info.add_text("schedule_json", schedule.model_dump_json())
        info.add_text("model", str(args.model))
        info.add_text("parameters", json.dumps({k: v for k, v in call.items() if k not in ("prompt", "negative_prompt", "schedule")}))
        path = out / png_name(args.schedule, seed, index)
        image.save(path, pnginfo=info)
        written.append(path)
        print(f"{path}: {elapsed:.3f} s/image (seed {seed})", flush=True)
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CLIError as error:
        print(f"ralu-generate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
