"""The regime check of testbed v2: is the trained testbed an instrument for RALU?

    python -m ralu_lab.testbed.v2.evaluate --arch flux sd3 --n 128 --json reports/testbed.json --report reports/testbed.md

Three questions, each answered with numbers and a pass / fail line:

1. **The reference draws what was asked, fine structure included.**  The base pipeline at
   its baseline steps (FLUX 50, SD3 28) must be read back right by the classifier for at
   least :data:`MIN_ACCURACY` of the images on every prompt attribute (texture, orientation
   and period included) and on all of them together, and the classifier itself must be near
   perfect on real scenes and on their autoencoder reconstructions (the ceiling a generator
   can reach through the decoder).
2. **Few steps are visibly worse at the tightest budget.**  The same pipeline with the few
   steps of the tightest budget (FLUX 6 steps, the 7x preset's cost; SD3 5 steps, about 5.6x)
   must lose to the baseline with 95 % confidence on a fine-detail metric: the per-image
   fine accuracy or the spectral distance to real scenes (paired bootstrap over images: same
   noise, same labels).  If few plain steps match the baseline, as in v1, a low-resolution
   stage has nothing to save and the testbed cannot rank RALU.  The milder budgets' step
   counts (FLUX 11, SD3 9) are compared too and reported, not required: where they tie the
   baseline, no sampler can beat "fewer steps" there by much, and the reports say so.
3. **The measures are calibrated.**  Real scenes against the real reference give the floor
   of FD and spectral distance, printed beside the samplers' values.

Every image i is generated from its own noise generator (seed, i) and the labels
``balanced_labels(n, seed)``, so every method sees the same noise and conditioning.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data, metrics
from . import model as tb
from .classifier import load_classifier, predict

#: Criterion 1: fraction of baseline samples read back right, per prompt attribute and all together.
MIN_ACCURACY = 0.8
#: Few-step counts compared with the baseline, per architecture; the first is the tightest
#: budget's, which criterion 2 requires to be visibly worse.
FEW_STEPS = {"flux": (6, 11), "sd3": (5, 9)}


def image_generators(n: int, seed: int = 0) -> list[torch.Generator]:
    """One generator per image: image i's noise depends only on ``(seed, i)``, not on the
    batch it is generated in."""
    return [torch.Generator().manual_seed(int(seed) * 1_000_003 + i) for i in range(n)]


@torch.no_grad()
def generate_batched(pipe, labels: torch.Tensor, seed: int, batch_size: int, inputs, **call_kwargs) -> torch.Tensor:
    """The batched loop the testbed samples with: ``pipe(**inputs(chunk, device, dtype),
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


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(n, d)`` (e.g.
    the classifier's features of two image sets).

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

def generate(pipe, arch: str, labels: torch.Tensor, seed: int = 0, steps: int | None = None, batch_size: int = 32, **call_kwargs) -> torch.Tensor:
    """Images ``(n, 3, 64, 64)`` in [-1, 1] from ``pipe`` (a base or RALU pipeline of
    ``arch``) with :func:`ralu_lab.testbed.v2.model.call_inputs`; ``steps=None`` leaves
    ``num_inference_steps`` out (RALU takes ``schedule=``)."""
    labels = data.check_labels(labels)
    if steps is not None:
        call_kwargs["num_inference_steps"] = steps
    return generate_batched(pipe, labels, seed, batch_size, lambda chunk, device, dtype: tb.call_inputs(arch, chunk, device=device, dtype=dtype), **call_kwargs)


def method_metrics(images, labels, classifier, fd: metrics.FrechetDistance, real_spectra, baseline=None) -> dict:
    """Every metric of one method's images (per-image values kept for paired comparisons)."""
    predicted = predict(classifier, images)
    right = predicted == labels
    fine = [data.ATTRIBUTES.index(a) for a in data.FINE_ATTRIBUTES]
    spectra = metrics.radial_power_spectrum(images)
    result = {
        "accuracy": metrics.attribute_accuracy(predicted, labels),
        "fd": fd(images),
        "spectral_distance": metrics.spectral_distance(spectra, real_spectra),
        "blocking": metrics.blocking(images).mean().item(),
        "per_image": {"fine_right": right[:, fine].all(dim=1).double(), "spectra": spectra},
    }
    if baseline is not None:
        result["psnr"] = metrics.psnr(images, baseline).mean().item()
        result["ssim"] = metrics.ssim(images, baseline).mean().item()
    return result


def regime_check(
    pipe, arch: str, classifier, n: int = 128, seed: int = 0, reference_n: int = 1000, autoencoder=None, baseline_steps: int | None = None, few_steps: tuple[int, ...] | None = None
) -> dict:
    """Run the three checks (module docstring); returns a JSON-ready dict.  Step counts
    default to :data:`ralu_lab.testbed.v2.model.BASE_STEPS` and :data:`FEW_STEPS`."""
    labels = data.balanced_labels(n, seed)
    reference, _ = data.make_batch(6_000_000_001 + seed, reference_n)
    fd = metrics.FrechetDistance(classifier, reference)
    real_spectra = metrics.radial_power_spectrum(reference)
    real, _ = data.make_batch(7_000_000_003 + seed, 0, labels=labels)
    rows = {"real scenes": method_metrics(real, labels, classifier, fd, real_spectra)}
    if autoencoder is not None:
        with torch.no_grad():
            on = next(autoencoder.parameters()).device
            decoded = tb.latents_to_images(autoencoder, tb.images_to_latents(autoencoder, real.to(on))).clamp(-1, 1).cpu()
        rows["autoencoder reconstructions"] = method_metrics(decoded, labels, classifier, fd, real_spectra)
    timings = {}
    start = time.time()
    baseline_steps = tb.BASE_STEPS[arch] if baseline_steps is None else baseline_steps
    baseline = generate(pipe, arch, labels, seed, baseline_steps)
    timings[f"{baseline_steps} steps"] = round(time.time() - start, 1)
    rows[f"baseline, {baseline_steps} steps"] = method_metrics(baseline, labels, classifier, fd, real_spectra, baseline)
    comparisons = {}
    base_row = rows[f"baseline, {baseline_steps} steps"]
    for steps in FEW_STEPS[arch] if few_steps is None else few_steps:
        start = time.time()
        images = generate(pipe, arch, labels, seed, steps)
        timings[f"{steps} steps"] = round(time.time() - start, 1)
        name = f"{steps} steps"
        rows[name] = row = method_metrics(images, labels, classifier, fd, real_spectra, baseline)
        names = ("baseline", name)
        comparisons[name] = {
            "fine accuracy": metrics.paired_bootstrap(base_row["per_image"]["fine_right"], row["per_image"]["fine_right"], True, names=names).__dict__,
            "spectral distance": metrics.paired_set_bootstrap(
                base_row["per_image"]["spectra"], row["per_image"]["spectra"], lambda s: metrics.spectral_distance(s, real_spectra), False, names=names
            ).__dict__,
        }
    base_accuracy = base_row["accuracy"]
    tightest = next(iter(comparisons))
    checks = {
        "baseline draws what was asked": all(base_accuracy[a] >= MIN_ACCURACY for a in (*data.PROMPT_ATTRIBUTES, "all")),
        "few steps visibly worse (tightest budget)": any(c["verdict"] == "baseline better" for c in comparisons[tightest].values()),
    }
    for row in rows.values():
        row.pop("per_image")
    return {"arch": arch, "n": n, "seed": seed, "reference_n": reference_n, "rows": rows, "comparisons": comparisons, "checks": checks, "seconds": timings}


def _percent(value: float) -> str:
    return f"{100.0 * value:.1f} %"


def render_markdown(report: dict) -> str:
    """``reports/testbed.md``: every architecture's rows, comparisons and checks."""
    lines = [
        "# Testbed v2: are the generators an instrument for RALU?",
        "",
        f"Regenerate: `{report['command']}` ({report['seconds'] / 60:.1f} min on {report['threads']} CPU thread(s)).  "
        "Design and training: docs/testbed-v2.md.  Accuracy: the classifier reads back what the prompt asked for "
        f"({', '.join(data.PROMPT_ATTRIBUTES)}; *fine*: {', '.join(data.FINE_ATTRIBUTES)} together; *all*: all of them).  "
        "FD: Frechet distance in the classifier's features against real scenes; spectral: distance of the mean radial power spectrum "
        "to real scenes; PSNR / SSIM against the baseline sample of the same noise and labels.",
        "",
    ]
    for arch, result in report["results"].items():
        attrs = [*data.PROMPT_ATTRIBUTES, "fine", "all"]
        lines += [f"## {arch.upper()} generator ({result['n']} images, seed {result['seed']}, {result['reference_n']} real scenes as reference)", ""]
        lines += ["| row | " + " | ".join(attrs) + " | FD | spectral | PSNR | SSIM |", "|---" * (len(attrs) + 5) + "|"]
        for name, row in result["rows"].items():
            extra = [f"{row[k]:.2f}" if k in row else "" for k in ("psnr", "ssim")]
            lines.append(f"| {name} | " + " | ".join(_percent(row["accuracy"][a]) for a in attrs)
                         + f" | {row['fd']:.0f} | {row['spectral_distance']:.3f} | " + " | ".join(extra) + " |")
        lines += ["", "Few steps against the baseline (paired bootstrap over images, 95 %; difference = baseline - few steps):", ""]
        for name, comparisons in result["comparisons"].items():
            for metric, c in comparisons.items():
                lines.append(f"- {name}, {metric}: {c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]: **{c['verdict']}**")
        lines += ["", "Checks:", ""]
        lines += [f"- {check}: **{'passed' if ok else 'FAILED'}**" for check, ok in result["checks"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ralu_lab.testbed.v2.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=tb.ARCHITECTURES, nargs="+", required=True)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-n", type=int, default=1000)
    parser.add_argument("--weights", default=None, help="generator folder (default: the repository's; one --arch only)")
    parser.add_argument("--autoencoder", default=None)
    parser.add_argument("--classifier", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the generator runs (noise and metrics stay on the CPU)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--report", type=Path, default=None, help="write the Markdown report here")
    args = parser.parse_args(argv)
    if args.weights is not None and len(args.arch) > 1:
        parser.error("--weights names one generator's folder. Fix: pass a single --arch with it")
    torch.set_num_threads(args.threads)
    command = "python -m ralu_lab.testbed.v2.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.time()
    results = {}
    try:
        pipes = {arch: tb.load_pipeline(arch, device=args.device, path=args.weights, autoencoder=args.autoencoder) for arch in args.arch}
        classifier = load_classifier(args.classifier)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for arch, pipe in pipes.items():
        results[arch] = regime_check(pipe, arch, classifier, args.n, args.seed, args.reference_n, pipe.vae)
        print(f"{arch}: " + ", ".join(f"{k} {'passed' if v else 'FAILED'}" for k, v in results[arch]["checks"].items()), flush=True)
    report = {"command": command, "seconds": round(time.time() - started, 1), "threads": args.threads, "results": results}
    from .training import atomic_write_text

    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.report is not None:
        atomic_write_text(args.report, render_markdown(report))
    if args.json is None and args.report is None:
        print(json.dumps(report, indent=2))
    return 0 if all(all(r["checks"].values()) for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
