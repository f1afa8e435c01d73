"""Procedural images with checkable conditioning: one coloured shape in one quadrant on a
textured background.

Every image has three attributes (its *label*, a row of three ints):

* ``shape``: circle, square, triangle, cross;
* ``colour``: one of six saturated colours;
* ``position``: the quadrant the shape sits in (top-left, top-right, bottom-left,
  bottom-right), with a little jitter.

Backgrounds are muted (low saturation, dark to mid value) so that every shape colour
stands out: stripes (4 orientations), checkerboards (both with sharp edges) or smooth
linear gradients.  Shapes are drawn with hard edges.

Everything is vectorised torch and reproducible: ``make_batch(seed, n, size)`` always
returns the same images and labels for the same arguments, on any machine.  Images are
float32 ``(n, 3, size, size)`` in [-1, 1] (the range a VAE decodes to); geometry is in
units of the image size, so any size works (the testbed model is trained at 32 px and at
its half size, 16 px, made by 2x2 average pooling of the 32 px rendering).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Attribute names, in label column order.
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "position")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
POSITIONS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")

#: Values of every attribute, in label column order.
VALUES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "position": POSITIONS}
#: Number of values of every attribute, in label column order: (4, 6, 4).
NUM_VALUES: tuple[int, ...] = tuple(len(VALUES[a]) for a in ATTRIBUTES)
#: Number of distinct label sets (4 * 6 * 4 = 96).
NUM_CLASSES: int = math.prod(NUM_VALUES)

#: RGB in [0, 1] of the shape colours (before a small per-image brightness jitter).
PALETTE = torch.tensor(
    [
        [0.92, 0.15, 0.15],  # red
        [0.15, 0.80, 0.22],  # green
        [0.20, 0.32, 0.95],  # blue
        [0.95, 0.88, 0.15],  # yellow
        [0.88, 0.20, 0.88],  # magenta
        [0.15, 0.85, 0.88],  # cyan
    ]
)

#: Full training / sampling resolution of the testbed (pixels).
IMAGE_SIZE = 32

BACKGROUNDS: tuple[str, ...] = ("stripes", "checker", "gradient")


@dataclass(frozen=True)
class Geometry:
    """Per-image geometry of a batch, in pixels of the rendered size (centre of the top-left
    pixel at (0.5, 0.5)); for tests and debugging."""

    centre_x: torch.Tensor  # (n,)
    centre_y: torch.Tensor  # (n,)
    radius: torch.Tensor  # (n,)
    colour: torch.Tensor  # (n, 3) RGB in [0, 1] actually drawn
    mask: torch.Tensor  # (n, size, size) bool: the shape's pixels
    background: torch.Tensor  # (n,) index into BACKGROUNDS


def sample_labels(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` int64 labels, every attribute uniform and independent."""
    return torch.stack([torch.randint(k, (n,), generator=generator) for k in NUM_VALUES], dim=1)


def all_labels() -> torch.Tensor:
    """All 96 label sets ``(96, 3)``, in class-index order (see :func:`class_index`)."""
    grids = torch.meshgrid(*[torch.arange(k) for k in NUM_VALUES], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def class_index(labels: torch.Tensor) -> torch.Tensor:
    """Label sets ``(n, 3)`` -> one class index in [0, 96) each (row-major over attributes)."""
    index = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
    for column, k in enumerate(NUM_VALUES):
        index = index * k + labels[:, column]
    return index


def check_label_table(labels, attributes, num_values) -> torch.Tensor:
    """``labels`` as an ``(n, len(attributes))`` int64 tensor whose column ``a`` lies in
    ``[0, num_values[a])``, or a one-line ``ValueError`` (a single row may be given 1-d)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.ndim == 1:
        labels = labels[None]
    if labels.ndim != 2 or labels.shape[1] != len(attributes):
        raise ValueError(f"labels of shape {tuple(labels.shape)}: expected (n, {len(attributes)}) columns {attributes}")
    for column, (name, k) in enumerate(zip(attributes, num_values)):
        bad = (labels[:, column] < 0) | (labels[:, column] >= k)
        if bad.any():
            raise ValueError(f"label column {name!r} must be in [0, {k}); got {labels[bad, column].tolist()[:5]}")
    return labels


def check_labels(labels: torch.Tensor) -> torch.Tensor:
    return check_label_table(labels, ATTRIBUTES, NUM_VALUES)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB, all in [0, 1]; returns (..., 3)."""
    k = torch.stack([(5.0 + h * 6.0) % 6.0, (3.0 + h * 6.0) % 6.0, (1.0 + h * 6.0) % 6.0], dim=-1)
    return v[..., None] - v[..., None] * s[..., None] * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _shape_masks(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Boolean masks (n, S, S) for offsets dx, dy (n, S, S) from the centre and radius r (n, 1, 1)."""
    circle = dx * dx + dy * dy <= r * r
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r
    half_height = 1.05 * r  # equilateral triangle pointing up, its bounding box centred
    triangle = (dy <= half_height) & (dx.abs() * math.sqrt(3.0) <= dy + half_height)
    arm, length = 0.36 * r, 1.05 * r
    cross = ((dx.abs() <= arm) & (dy.abs() <= length)) | ((dy.abs() <= arm) & (dx.abs() <= length))
    choice = shape[:, None, None]
    return torch.where(choice == 0, circle, torch.where(choice == 1, square, torch.where(choice == 2, triangle, cross)))


def render(labels: torch.Tensor, generator: torch.Generator, size: int = IMAGE_SIZE, return_geometry: bool = False):
    """Images ``(n, 3, size, size)`` in [-1, 1] for the given labels ``(n, 3)``.

    All other randomness (background kind, colours, texture, jitter of position, size and
    brightness) comes from ``generator``, drawn in a fixed order.
    """
    labels = check_labels(labels)
    n = labels.shape[0]
    g = generator
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731

    # Draw every random number up front, in a fixed order (independent of size).
    background = torch.randint(len(BACKGROUNDS), (n,), generator=g)
    hue = u(n, 2)
    sat = 0.30 * u(n, 2)
    val = 0.10 + 0.30 * u(n, 2)
    val[:, 1] = torch.where(val[:, 1] > val[:, 0], val[:, 1] + 0.10, val[:, 1] - 0.10).clamp(0.04, 0.55)
    angle = torch.randint(4, (n,), generator=g).float() * (math.pi / 4.0)
    period = 5.0 + 5.0 * u(n)  # stripes: period in px at 32 px
    cell = 4.0 + 4.0 * u(n)  # checker: cell in px at 32 px
    phase = u(n, 2)
    gradient_angle = 2.0 * math.pi * u(n)
    jitter = (u(n, 2) - 0.5) * 0.08  # centre jitter, fraction of the size
    radius_frac = 0.16 + 0.04 * u(n)
    brightness = 0.93 + 0.07 * u(n)

    scale = size / 32.0
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    xx, yy = xx[None], yy[None]  # (1, S, S)

    # Background.
    c1 = _hsv_to_rgb(hue[:, 0], sat[:, 0], val[:, 0])  # (n, 3)
    c2 = _hsv_to_rgb(hue[:, 1], sat[:, 1], val[:, 1])
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    along = (xx * cos + yy * sin) / (period[:, None, None] * scale) + phase[:, 0, None, None]
    stripes = torch.frac(along) < 0.5
    cx = torch.floor(xx / (cell[:, None, None] * scale) + phase[:, 0, None, None])
    cy = torch.floor(yy / (cell[:, None, None] * scale) + phase[:, 1, None, None])
    checker = ((cx + cy) % 2) == 0
    gcos, gsin = torch.cos(gradient_angle)[:, None, None], torch.sin(gradient_angle)[:, None, None]
    ramp = ((xx - size / 2) * gcos + (yy - size / 2) * gsin) / (size * 0.75) + 0.5
    ramp = ramp.clamp(0.0, 1.0)
    kind = background[:, None, None]
    weight = torch.where(kind == 0, stripes.float(), torch.where(kind == 1, checker.float(), ramp))  # (n, S, S)
    image = c1[:, :, None, None] * (1.0 - weight[:, None]) + c2[:, :, None, None] * weight[:, None]

    # Shape.
    position = labels[:, 2]
    centre_x = (0.25 + 0.5 * (position % 2).float() + jitter[:, 0]) * size
    centre_y = (0.25 + 0.5 * (position // 2).float() + jitter[:, 1]) * size
    radius = radius_frac * size
    dx = xx - centre_x[:, None, None]
    dy = yy - centre_y[:, None, None]
    mask = _shape_masks(labels[:, 0], dx, dy, radius[:, None, None])
    colour = PALETTE[labels[:, 1]] * brightness[:, None]
    image = torch.where(mask[:, None], colour[:, :, None, None], image)

    image = image * 2.0 - 1.0
    if return_geometry:
        return image, Geometry(centre_x, centre_y, radius, colour, mask, background)
    return image


def make_batch(seed: int, n: int, size: int = IMAGE_SIZE, labels: torch.Tensor | None = None, return_geometry: bool = False):
    """``(images, labels)``: ``n`` images ``(n, 3, size, size)`` in [-1, 1] and their labels
    ``(n, 3)`` int64 (columns :data:`ATTRIBUTES`), fully determined by ``(seed, n, size)``
    (labels drawn uniformly unless given; then ``n`` is ignored).  ``return_geometry``:
    ``(images, labels, Geometry)``."""
    generator = torch.Generator().manual_seed(int(seed))
    if labels is None:
        labels = sample_labels(n, generator)
    labels = check_labels(labels)
    if return_geometry:
        images, geometry = render(labels, generator, size, return_geometry=True)
        return images, labels, geometry
    return render(labels, generator, size), labels


def downsample(images: torch.Tensor) -> torch.Tensor:
    """Half-size images by 2x2 average pooling (what the testbed's half-resolution training
    sees: the same scenes, natively at half size)."""
    return F.avg_pool2d(images, 2)


def describe(labels: torch.Tensor) -> list[str]:
    """Human prompts, e.g. ``"a red circle, top-left"``."""
    labels = check_labels(labels)
    return [f"a {COLOURS[c]} {SHAPES[s]}, {POSITIONS[p]}" for s, c, p in labels.tolist()]


def parse(prompt: str) -> list[int]:
    """Inverse of :func:`describe` for one prompt (words in any order): ``[shape, colour, position]``."""
    words = prompt.lower().replace(",", " ").split()
    found = []
    for name in ATTRIBUTES:
        hits = [i for i, value in enumerate(VALUES[name]) if value in words]
        if len(hits) != 1:
            raise ValueError(f"prompt {prompt!r} must name exactly one {name} (one of {VALUES[name]})")
        found.append(hits[0])
    return found
