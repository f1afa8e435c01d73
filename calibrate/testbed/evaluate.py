"""Does a sampler make the right images?  Generate with a real pipeline, read the images
back with the classifier, and compare with the conditioning.

    python -m ralu.calibrate.testbed.evaluate --n 200 --steps 50 --report reports/testbed-v1.md

:func:`sample_accuracy` works with any FluxPipeline-like object built on the testbed's
components (``load_pipeline()``, or ``RALUFluxPipeline.from_pipe(pipe, vae=pipe.vae)`` with
``num_inference_steps=None, schedule=...``): the harness builds on it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data
from .classifier import Classifier, agreement, attribute_logits, label_probability, labels_from_logits, load_classifier
from .conditioning import encode_labels
from .location import CLASSIFIER, ENV_VAR, REPOSITORY_FOLDER, TRANSFORMER, classifier_dir
from .model import BASE_STEPS, GUIDANCE_SCALE, load_pipeline, training_record


def balanced_labels(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` label sets covering all 96 classes as evenly as possible: seeded permutations of
    the class list, concatenated (``n = 192`` gives every class exactly twice)."""
    generator = torch.Generator().manual_seed(int(seed))
    every = data.all_labels()
    rounds = -(-n // every.shape[0])
    return torch.cat([every[torch.randperm(every.shape[0], generator=generator)] for _ in range(rounds)])[:n]


def image_generators(n: int, seed: int = 0) -> list[torch.Generator]:
    """One generator per image: image i's noise depends only on ``(seed, i)``, not on the
    batch it is generated in."""
    return [torch.Generator().manual_seed(int(seed) * 1_000_003 + i) for i in range(n)]


@torch.no_grad()
def generate_batched(pipe, labels: torch.Tensor, seed: int, batch_size: int, inputs, **call_kwargs) -> torch.Tensor:
    """The batched loop both testbeds sample with: ``pipe(**inputs(chunk, device, dtype),
    generator=[one per image], output_type="pt", **call_kwargs)`` over chunks of
    ``batch_size`` labels (``call_kwargs`` override the inputs, e.g. a guidance scale), images
    returned in [-1, 1] on the CPU.  Image i's noise comes from :func:`image_generators`
    ``(seed, i)``, so it does not depend on the batching."""
    generators = image_generators(labels.shape[0], seed)
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    out = []
    for start in range(0, labels.shape[0], batch_size):
        chunk = labels[start : start + batch_size]
        call = {**inputs(chunk, device, dtype), **call_kwargs}
        images = pipe(**call, generator=generators[start : start + chunk.shape[0]], output_type="pt").images
        out.append(images.float().cpu() * 2.0 - 1.0)
    return torch.cat(out)


def generate(
    pipe,
    labels: torch.Tensor,
    seed: int = 0,
    num_inference_steps: int | None = BASE_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    batch_size: int = 64,
    size: int = data.IMAGE_SIZE,
    **call_kwargs,
) -> torch.Tensor:
    """Images ``(n, 3, size, size)`` in [-1, 1] for ``labels`` ``(n, 3)``.

    Calls ``pipe(prompt_embeds=..., pooled_prompt_embeds=..., height=size, width=size,
    num_inference_steps=..., guidance_scale=..., generator=[one per image],
    output_type="pt", **call_kwargs)`` in batches; ``num_inference_steps=None`` leaves it
    out (RALUFluxPipeline takes its steps from ``schedule=``).
    """
    labels = data.check_labels(labels)
    if num_inference_steps is not None:
        call_kwargs["num_inference_steps"] = num_inference_steps

    def inputs(chunk, device, dtype):
        return dict(encode_labels(chunk, device=device, dtype=dtype), height=size, width=size, guidance_scale=guidance_scale)

    return generate_batched(pipe, labels, seed, batch_size, inputs, **call_kwargs)


def sample_accuracy(
    pipe,
    n: int = 200,
    steps: int | None = BASE_STEPS,
    seed: int = 0,
    classifier: Classifier | None = None,
    batch_size: int = 64,
    return_images: bool = False,
    **call_kwargs,
) -> dict:
    """Classifier agreement with the conditioning on ``n`` samples (balanced over the 96
    classes, label order and noise fixed by ``seed``).

    Returns ``dict(all, shape, colour, position, p_label, n, steps, seconds)``: ``all``
    (every attribute right) is the headline number; ``p_label`` is the mean probability the
    classifier gives to the whole conditioning (softer, more sensitive to degraded shapes).  ``return_images=True`` adds ``images``,
    ``labels`` and ``predicted``.
    """
    classifier = load_classifier() if classifier is None else classifier
    labels = balanced_labels(n, seed)
    start = time.time()
    images = generate(pipe, labels, seed=seed, num_inference_steps=steps, batch_size=batch_size, **call_kwargs)
    seconds = time.time() - start
    logits = attribute_logits(classifier, images)
    predicted = labels_from_logits(logits)
    p_label = label_probability(logits, labels).mean().item()
    result = {**agreement(predicted, labels), "p_label": p_label, "n": n, "steps": steps, "seconds": round(seconds, 1)}
    if return_images:
        result.update(images=images, labels=labels, predicted=predicted)
    return result


def data_accuracy(n: int = 1000, seed: int = 123, classifier: Classifier | None = None) -> dict:
    """Classifier accuracy on ``n`` fresh procedural images (balanced labels)."""
    classifier = load_classifier() if classifier is None else classifier
    labels = balanced_labels(n, seed)
    images, labels = data.make_batch(seed, n, labels=labels)
    logits = attribute_logits(classifier, images)
    return {**agreement(labels_from_logits(logits), labels), "p_label": label_probability(logits, labels).mean().item(), "n": n}


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(n, d)`` (e.g.
    :func:`ralu.calibrate.testbed.classifier.features` of two image sets).

    ``|mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr((A^1/2 B A^1/2)^1/2)``, computed with symmetric
    eigendecompositions (stable when covariances are singular, e.g. dead ReLU features).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0.0))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2.0).clip(min=0.0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


def image_grid(images: torch.Tensor, columns: int = 16, scale: int = 3):
    """PIL image of a grid of images in [-1, 1] (nearest-upscaled ``scale`` x)."""
    from PIL import Image

    images = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.zeros(rows * columns, c, h, w, dtype=torch.uint8)
    canvas[:n] = images
    canvas = canvas.reshape(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
    picture = Image.fromarray(canvas.numpy())
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def _percent(x: float) -> str:
    return f"{100.0 * x:.1f} %"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ralu.calibrate.testbed.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="samples (balanced over the 96 classes)")
    parser.add_argument("--steps", type=int, default=BASE_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--data-n", type=int, default=1000, help="fresh procedural images for the classifier's own accuracy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", type=Path, help=f"transformer folder (default: {REPOSITORY_FOLDER}/{TRANSFORMER} of the repository, or ${ENV_VAR})")
    parser.add_argument("--classifier", type=Path, help=f"classifier folder (default: {REPOSITORY_FOLDER}/{CLASSIFIER} of the repository, or ${ENV_VAR})")
    parser.add_argument("--report", type=Path, help="write a markdown report here")
    parser.add_argument("--grid", type=Path, help="write a PNG of the first 64 samples (default: next to the report)")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    command = "python -m ralu.calibrate.testbed.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        classifier = load_classifier(args.classifier)
        pipe = load_pipeline(path=args.weights)
    except FileNotFoundError as error:
        print(f"python -m ralu.calibrate.testbed.evaluate: {error}", file=sys.stderr)
        return 2
    on_data = data_accuracy(args.data_n, classifier=classifier)
    print(f"classifier on {args.data_n} fresh procedural images: {on_data}", flush=True)
    result = sample_accuracy(pipe, args.n, args.steps, args.seed, classifier, args.batch_size, return_images=True, guidance_scale=args.guidance)
    images, labels, predicted = result.pop("images"), result.pop("labels"), result.pop("predicted")
    print(f"classifier agreement on {args.n} samples ({args.steps} steps, plain FluxPipeline): {result}", flush=True)
    numbers = {"command": command, "data_accuracy": on_data, "sample_accuracy": result, "guidance_scale": args.guidance, "seed": args.seed}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    grid = args.grid or (args.report.parent / args.report.stem / "samples.png" if args.report else None)
    if grid:
        grid.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images[:64], columns=16).save(grid)
    if args.report:
        try:
            training = training_record(args.weights) if args.weights else training_record()
        except FileNotFoundError:
            training = {}
        per_class = {}
        right = (predicted == labels).all(dim=1)
        for i, name in enumerate(data.ATTRIBUTES):
            rows = []
            for value_index, value in enumerate(data.VALUES[name]):
                pick = labels[:, i] == value_index
                rows.append(f"{value} {_percent(right[pick].float().mean().item())} ({int(pick.sum())})")
            per_class[name] = ", ".join(rows)
        wrong = [
            f"| {data.describe(labels[j:j + 1])[0]} | {data.describe(predicted[j:j + 1])[0]} |"
            for j in torch.nonzero(~right).flatten().tolist()[:12]
        ]
        try:
            grid_link = grid.relative_to(args.report.parent)
        except ValueError:
            grid_link = grid
        lines = [
            "# Testbed: is the testbed model good enough to judge samplers?",
            "",
            f"Regenerate: `{command}` (about {result['seconds'] / 60:.0f} min of sampling on {args.threads} CPU threads).",
            "",
            "The testbed (`ralu.calibrate.testbed`) is a small rectified-flow `FluxTransformer2DModel` in pixel space "
            "(32x32 RGB, 256 tokens; half size 64 tokens) trained on procedural images of one coloured shape in one "
            "quadrant on a textured background, driven by a real `diffusers.FluxPipeline`.  A small CNN reads "
            "shape, colour and position back from an image.",
            "",
            "## Numbers",
            "",
            "| measure | all three right | shape | colour | position | mean p(label) | images |",
            "|---|---|---|---|---|---|---|",
            f"| classifier on fresh procedural images | {_percent(on_data['all'])} | {_percent(on_data['shape'])} | {_percent(on_data['colour'])} | {_percent(on_data['position'])} | {on_data['p_label']:.3f} | {on_data['n']} |",
            f"| classifier agreement with the conditioning, {args.steps}-step FluxPipeline samples (guidance {args.guidance}) | "
            f"**{_percent(result['all'])}** | {_percent(result['shape'])} | {_percent(result['colour'])} | {_percent(result['position'])} | {result['p_label']:.3f} | {result['n']} |",
            "",
            f"Requirement: at least 80 % (all three attributes right) on 50-step samples.  Samples: labels balanced over the "
            f"96 classes, noise from one generator per image (seed {args.seed}).  Mean p(label): the classifier's probability "
            "for the whole conditioning (product over the three attributes), averaged over images: a softer number that "
            "also drops when shapes are recognisable but degraded.",
            "",
            "All-right rate by label value:",
            "",
            *[f"- {name}: {text}" for name, text in per_class.items()],
            "",
            f"First 64 samples (rows of 16; labels in `balanced_labels({args.n}, {args.seed})` order): ![samples]({grid_link})",
            "",
        ]
        if wrong:
            lines += ["Some disagreements:", "", "| conditioning | classifier reads |", "|---|---|", *wrong, ""]
        lines += [
            "## Using the testbed",
            "",
            "- `pipe = ralu.calibrate.testbed.load_pipeline()`: a real `diffusers.FluxPipeline` (pixel-space identity VAE, "
            "`vae_scale_factor` 1); call it with `**encode_labels(labels)`, `height=width=32`, `guidance_scale=3.5` "
            "(the guidance input was trained uninformative in [1, 5]).",
            "- RALU: `RALUFluxPipeline.from_pipe(pipe, vae=pipe.vae)` (diffusers' `from_pipe` drops components whose class "
            "differs from the type hint) or `load_pipeline(pipeline_class=RALUFluxPipeline)`.",
            "- Scheduler: FLUX.1-dev's dynamic shift with token counts scaled 1/16, so 32 px (256 tokens) samples with "
            "h0 = exp(1.15) = 3.158 like FLUX.1-dev at 1024 px and the 16 px half size with exp(0.5) like 512 px. "
            "Schedules: `ralu-calibrate --model flux --height 32 --width 32 --h0 3.1582 --steps ... --ends ... --up-ratio ...` "
            "(the FLOPs speed-ups it prints are those of the real FLUX.1-dev at 32 px, not of the testbed).",
            "",
        ]
        if training:
            lines += [
                "## Weights",
                "",
                f"- transformer: `{training.get('command')}` ({training.get('steps_done')} steps, "
                f"{training.get('wall_seconds', 0) / 60:.0f} min wall, {training.get('parameters', 0) / 1e6:.2f}M parameters, EMA weights)",
            ]
            try:
                clf = json.loads((classifier_dir(args.classifier) / "classifier.json").read_text())
                lines.append(f"- classifier: `{clf['command']}` ({clf['wall_seconds'] / 60:.0f} min wall)")
            except (FileNotFoundError, KeyError):
                pass
            lines.append("")
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text("\n".join(lines))
        print(f"wrote {args.report}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
