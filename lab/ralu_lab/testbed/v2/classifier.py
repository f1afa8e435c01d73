"""A CNN that reads all seven attributes of a testbed v2 scene, and whose features define
the testbed's Frechet distance.

    python -m ralu_lab.testbed.v2.classifier --out lab/testbed-weights/v2/classifier

It sees the image at full size (64 px): its first two convolutions run before any pooling,
so a 4 px period, a 1 px line or a 2 x 2 dot are visible to it, and its heads must tell
the fine period from the medium one, the four orientations and the marks.  Because it is
trained on every attribute, its 256-d penultimate features (the input of FD) change when
any of them is drawn wrong or blurred, not only shape, colour and position (v1's blind spot).

Augmentations are the ones a generator's honest errors look like without changing the
label: a little pixel noise and small brightness / contrast shifts.  No blur: a blurred
fine period is not a fine period any more, and the classifier must say so.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import data, training
from .location import CLASSIFIER, default_out, part_dir

PROG = "ralu_lab.testbed.v2.classifier"
FEATURE_DIM = 256
WEIGHTS_FILE = "classifier.safetensors"


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


@torch.no_grad()
def attribute_logits(classifier: AttributeClassifier, images: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """One pass of the classifier: logits per attribute, a list of ``(n, k)`` tensors in
    :data:`ralu_lab.testbed.v2.data.ATTRIBUTES` order, for images ``(n, 3, H, W)`` in [-1, 1]."""
    device = next(classifier.parameters()).device
    chunks = [[logit.cpu() for logit in classifier(chunk.to(device))] for chunk in images.split(batch_size)]
    return [torch.cat([c[a] for c in chunks]) for a in range(len(classifier.heads))]


def labels_from_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    """Predicted labels ``(n, attributes)``: the most likely value of every attribute."""
    return torch.stack([logit.argmax(dim=1) for logit in logits], dim=1)


def predict(classifier: AttributeClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels ``(n, attributes)`` for images ``(n, 3, H, W)`` in [-1, 1]."""
    return labels_from_logits(attribute_logits(classifier, images, batch_size))


class Classifier(AttributeClassifier):
    """64 px RGB in [-1, 1] -> one head of logits per attribute (:data:`data.ATTRIBUTES`)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            _conv(3, 24), _conv(24, 24), nn.MaxPool2d(2),  # 32 px
            _conv(24, 48), _conv(48, 48), nn.MaxPool2d(2),  # 16 px
            _conv(48, 96), nn.MaxPool2d(2),  # 8 px
            _conv(96, 96), nn.MaxPool2d(2),  # 4 px: the flattened map keeps where things are
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(96 * 4 * 4, FEATURE_DIM), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList([nn.Linear(FEATURE_DIM, k) for k in data.NUM_VALUES])

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[-2:] != (data.IMAGE_SIZE, data.IMAGE_SIZE):
            raise ValueError(f"images of {tuple(images.shape[-2:])} px: the v2 classifier reads {data.IMAGE_SIZE}x{data.IMAGE_SIZE} scenes")
        return images


class FeatureExtractor(nn.Module):
    """The classifier's features for ``torchmetrics``' ``FrechetInceptionDistance(feature=...,
    normalize=True)``: takes images in [0, 1], as that metric hands them over."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = FEATURE_DIM

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images * 2.0 - 1.0)


def load_classifier(path=None, device="cpu") -> Classifier:
    folder = part_dir(CLASSIFIER, path)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no testbed v2 classifier at {folder}. Fix: train it with `python -m {PROG}` (see docs/testbed-v2.md), or pass its folder")
    model = Classifier()
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.to(device).eval()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    images = images * (0.9 + 0.2 * u(n, 1, 1, 1)) + (u(n, 1, 1, 1) - 0.5) * 0.1
    images = images + torch.randn(images.shape, generator=generator) * (0.06 * u(n, 1, 1, 1))
    return images.clamp(-1.0, 1.0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    training.add_common_arguments(p, default_out(CLASSIFIER), steps=3000, lr=2e-3, warmup=100)
    p.add_argument("--batch", type=training.positive_int, default=64)
    p.add_argument("--eval-n", type=training.positive_int, default=2000, help="fresh scenes for the accuracy in the record")
    return p


def main(argv: list[str] | None = None) -> int:
    from .metrics import attribute_accuracy

    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = Classifier().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    state = training.TrainState(model, optimizer, torch.Generator().manual_seed(args.seed))

    def step(s: int) -> dict[str, float]:
        images, labels = data.make_batch(training.step_seed(args.seed, s, 0), args.batch)
        logits = model(augment(images, state.generator))
        losses = [F.cross_entropy(logit, labels[:, i]) for i, logit in enumerate(logits)]
        optimizer.zero_grad(set_to_none=True)
        sum(losses).backward()
        optimizer.step()
        return {name: loss.item() for name, loss in zip(data.ATTRIBUTES, losses)}

    extra: dict = {}

    def save(out):
        model.eval()
        images, labels = data.make_batch(3_000_000_019 * (args.seed + 1), args.eval_n)
        extra["accuracy_fresh"] = attribute_accuracy(predict(model, images), labels, data.ATTRIBUTES)
        extra["eval_n"] = args.eval_n
        print(f"accuracy on {args.eval_n} fresh scenes: {extra['accuracy_fresh']}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        training.atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp))

    return training.run(args, state, step, save, training.command_line(PROG, argv), extra, "classifier")


if __name__ == "__main__":
    raise SystemExit(training.main_guard(main))
