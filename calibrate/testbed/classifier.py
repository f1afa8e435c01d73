"""A small CNN that reads an image's label (shape, colour, position) back, and gives
features for Frechet distances.

    python -m ralu.calibrate.testbed.classifier --out testbed-weights/classifier

Trained on the procedural data (:mod:`.data`) with augmentations that make it robust to
what a generator gets slightly wrong without teaching it to accept wrong content: pixel
noise, blur (a 2x2 average-pool round trip or a 3x3 box blur) and small brightness /
contrast changes.  Input: ``(B, 3, 32, 32)`` images in [-1, 1] (other sizes are resized
to 32 px).  Output: three heads of logits, in :data:`ralu.calibrate.testbed.data.ATTRIBUTES`
order; :meth:`Classifier.features` gives the 128-d penultimate activations.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import data
from .location import CLASSIFIER, REPOSITORY_FOLDER, classifier_dir

FEATURE_DIM = 128


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """A CNN ``body`` and ``embed`` to features, one linear head per attribute; a subclass
    builds the three modules and says how images are ``prepare``d."""

    body: nn.Module
    embed: nn.Module
    heads: nn.ModuleList

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, FEATURE_DIM)`` penultimate features (for Frechet distances)."""
        return self.embed(self.body(self.prepare(images)))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.features(images)
        return [head(feats) for head in self.heads]


class Classifier(AttributeClassifier):
    """32 px RGB -> logits for shape (4), colour (6) and position (4)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            _conv(3, 16), _conv(16, 16), nn.MaxPool2d(2),  # 16 px
            _conv(16, 32), _conv(32, 32), nn.MaxPool2d(2),  # 8 px
            _conv(32, 64), nn.MaxPool2d(2),  # 4 px: the flattened map keeps where things are
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList([nn.Linear(FEATURE_DIM, k) for k in data.NUM_VALUES])

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[-2:] != (data.IMAGE_SIZE, data.IMAGE_SIZE):
            images = F.interpolate(images, size=(data.IMAGE_SIZE, data.IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return images



def load_classifier(path: str | Path | None = None, device="cpu") -> Classifier:
    """The repository's trained classifier (or the given folder's) in eval mode; :mod:`.location`
    says where the repository's weights are found."""
    path = classifier_dir(path)
    if not (path / "classifier.safetensors").is_file():
        raise FileNotFoundError(
            f"no testbed classifier at {path}. Fix: train one with `python -m ralu.calibrate.testbed.classifier --out {path}`"
        )
    model = Classifier()
    model.load_state_dict(load_file(str(path / "classifier.safetensors")))
    return model.to(device).eval()


@torch.no_grad()
def attribute_logits(classifier: AttributeClassifier, images: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """One pass of the classifier: logits per attribute, a list of ``(n, k)`` tensors in
    :data:`ralu.calibrate.testbed.data.ATTRIBUTES` order, for images ``(n, 3, H, W)`` in [-1, 1]."""
    device = next(classifier.parameters()).device
    chunks = [[logit.cpu() for logit in classifier(chunk.to(device))] for chunk in images.split(batch_size)]
    return [torch.cat([c[a] for c in chunks]) for a in range(len(classifier.heads))]


def labels_from_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    """Predicted labels ``(n, attributes)``: the most likely value of every attribute."""
    return torch.stack([logit.argmax(dim=1) for logit in logits], dim=1)


def predict(classifier: AttributeClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels ``(n, attributes)`` for images ``(n, 3, H, W)`` in [-1, 1]."""
    return labels_from_logits(attribute_logits(classifier, images, batch_size))


def label_probability(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """``(n,)``: the probability the classifier gives to each image's whole label set (the
    product over attributes of the softmax of :func:`attribute_logits`): a softer companion
    of the all-right rate."""
    labels = data.check_labels(labels)
    return torch.stack([logit.softmax(dim=1).gather(1, labels[:, a : a + 1].cpu())[:, 0] for a, logit in enumerate(logits)], dim=1).prod(dim=1)


@torch.no_grad()
def features(classifier: AttributeClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features ``(n, FEATURE_DIM)`` for images ``(n, 3, H, W)`` in [-1, 1]."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier.features(chunk.to(device)).cpu() for chunk in images.split(batch_size)])


def agreement(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Fraction of images whose predicted attributes equal the labels: per attribute, and
    ``"all"`` (every attribute right, the headline number)."""
    labels = data.check_labels(labels)
    right = predicted == labels
    result = {name: right[:, i].float().mean().item() for i, name in enumerate(data.ATTRIBUTES)}
    result["all"] = right.all(dim=1).float().mean().item()
    return result


def accuracy(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return agreement(predict(classifier, images), labels)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    kind = torch.randint(3, (n,), generator=generator)
    pooled = F.interpolate(F.avg_pool2d(images, 2), scale_factor=2, mode="bilinear", align_corners=False)
    boxed = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    images = torch.where((kind == 1).view(-1, 1, 1, 1), pooled, torch.where((kind == 2).view(-1, 1, 1, 1), boxed, images))
    contrast = 0.85 + 0.3 * u(n, 1, 1, 1)
    bright = (u(n, 1, 1, 1) - 0.5) * 0.2
    images = images * contrast + bright
    images = images + torch.randn(images.shape, generator=generator) * (0.12 * u(n, 1, 1, 1))
    return images.clamp(-1.0, 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ralu.calibrate.testbed.classifier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(REPOSITORY_FOLDER) / CLASSIFIER, help="output folder (default: the repository's, from its root)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-n", type=int, default=2000, help="fresh images for the accuracy in the record")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = Classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    command = "python -m ralu.calibrate.testbed.classifier " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(command, flush=True)
    start = time.time()
    model.train()
    for step in range(args.steps):
        images, labels = data.make_batch(2_000_000_011 * (args.seed + 1) + step, args.batch)
        logits = model(augment(images, generator))
        loss = sum(F.cross_entropy(logit, labels[:, i]) for i, logit in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} {time.time() - start:.0f} s", flush=True)
    model.eval()
    images, labels = data.make_batch(3_000_000_019 * (args.seed + 1), args.eval_n)
    clean = accuracy(model, images, labels)
    augmented = accuracy(model, augment(images, torch.Generator().manual_seed(1)), labels)
    elapsed = time.time() - start
    print(f"accuracy on {args.eval_n} fresh images: clean {clean}, augmented {augmented}; {elapsed / 60:.1f} min", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "classifier.safetensors"))
    record = {
        "command": command,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_seconds": round(elapsed, 1),
        "accuracy_fresh_clean": clean,
        "accuracy_fresh_augmented": augmented,
        "eval_n": args.eval_n,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    (args.out / "classifier.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
