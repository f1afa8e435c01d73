"""Testbed v2 scenes: reproducible from a seed, and every label is what the pixels show
(periods and angles measured by FFT, marks and shapes by their pixels)."""

from __future__ import annotations

import math

import pytest
import torch

from ralu_lab.testbed.v2 import conditioning, data


def test_batches_are_reproducible_from_a_seed():
    images, labels = data.make_batch(7, 12)
    again, labels_again = data.make_batch(7, 12)
    other, _ = data.make_batch(8, 12)
    assert images.shape == (12, 3, 64, 64) and images.dtype == torch.float32
    assert labels.shape == (12, len(data.ATTRIBUTES)) and labels.dtype == torch.int64
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert not torch.equal(images, other)
    assert images.min() >= -1.0 and images.max() <= 1.0
    # given labels: the same scene whatever else is in the batch
    first, _ = data.make_batch(3, 0, labels=labels[:4])
    assert torch.equal(first, data.make_batch(3, 0, labels=labels[:4])[0])


def test_balanced_labels_balance_every_attribute():
    labels = data.balanced_labels(48, seed=1)
    for column, k in enumerate(data.NUM_VALUES):
        counts = torch.bincount(labels[:, column], minlength=k)
        assert counts.max() - counts.min() <= 1
    assert torch.equal(labels, data.balanced_labels(48, seed=1))
    assert not torch.equal(labels, data.balanced_labels(48, seed=2))


def test_bad_labels_are_refused_with_the_column_named():
    with pytest.raises(ValueError, match="'period' must be in"):
        data.check_labels([[0, 0, 0, 0, 0, 3, 0]])
    with pytest.raises(ValueError, match="expected"):
        data.check_labels([[0, 0, 0]])


def _peak(luma: torch.Tensor, min_radius: float) -> tuple[float, float]:
    """(radius in cycles per image, angle in degrees mod 180) of the strongest frequency of
    a Hann-windowed image, ignoring the low frequencies the shape occupies."""
    size = luma.shape[-1]
    window = torch.hann_window(size, periodic=False, dtype=torch.float64)
    y = (luma.double() - luma.double().mean()) * window[:, None] * window[None, :]
    power = torch.fft.fft2(y).abs().pow(2)
    f = torch.fft.fftfreq(size, d=1.0 / size, dtype=torch.float64)
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    radius = torch.sqrt(fx**2 + fy**2)
    power[radius < min_radius] = 0.0
    index = int(power.argmax())
    ky, kx = fy.flatten()[index].item(), fx.flatten()[index].item()
    return math.hypot(kx, ky), math.degrees(math.atan2(ky, kx)) % 180.0


def test_background_period_and_orientation_measured_by_fft_equal_the_label():
    # every texture x orientation x period, no marks (a line would add broadband energy)
    grid = torch.cartesian_prod(torch.arange(2), torch.arange(4), torch.arange(3))
    n = grid.shape[0]
    labels = torch.stack([torch.arange(n) % 4, torch.arange(n) % 4, torch.arange(n) % 4, grid[:, 0], grid[:, 1], grid[:, 2], torch.zeros(n, dtype=torch.long)], 1)
    images, labels, geometry = data.make_batch(11, 0, labels=labels, return_geometry=True)
    rgb = (images + 1) / 2
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    for i in range(n):
        texture, orientation, period = labels[i, 3:6].tolist()
        radius, angle = _peak(luma[i], min_radius=4.0)
        # a checker (product of two square waves) has its fundamental on the diagonals of its
        # axes: radius sqrt(2) / period, angle its own +- 45 degrees
        measured = (data.IMAGE_SIZE / radius) * (math.sqrt(2.0) if texture == 1 else 1.0)
        nearest = min(range(3), key=lambda k: abs(math.log(measured / data.PERIODS_PX[k])))
        assert nearest == period, (i, labels[i].tolist(), measured)
        assert abs(measured / geometry.period[i].item() - 1.0) < 0.15, (i, measured, geometry.period[i].item())
        expected = orientation * data.ANGLE_STEP_DEG[texture] + (45.0 if texture == 1 else 0.0)
        tolerance = 90.0 if texture == 1 else 180.0
        error = (angle - expected) % tolerance
        assert min(error, tolerance - error) < 10.0, (i, labels[i].tolist(), angle, expected)


def test_shape_colour_position_and_marks_are_in_the_pixels():
    labels = data.balanced_labels(36, seed=5)
    images, labels, geometry = data.make_batch(13, 0, labels=labels, return_geometry=True)
    rgb = (images + 1) / 2
    for i in range(labels.shape[0]):
        _, colour, position, _, _, _, marks = labels[i].tolist()
        inside = geometry.shape_mask[i] == 1.0
        assert inside.sum() > 100, "the shape is drawn"
        pixels = rgb[i][:, inside].T
        ratio = pixels / data.PALETTE[colour]
        assert ratio.min() > 0.92 and ratio.max() < 1.0001
        rows, cols = torch.nonzero(inside, as_tuple=True)
        assert (rows.float().mean() < 32) == (position // 2 == 0) and (cols.float().mean() < 32) == (position % 2 == 0)
        # the two background colours differ in brightness enough to see the pattern
        assert (geometry.background[i, 0].max() - geometry.background[i, 1].max()).abs() > 0.2
        mark = geometry.mark_mask[i]
        full = mark == 1.0
        if marks == 0:
            assert mark.sum() == 0
            continue
        assert torch.allclose(rgb[i][:, full], torch.full_like(rgb[i][:, full], data.MARK_LEVEL), atol=1e-5)
        if marks == 1:  # a 1 px line across the scene (a chord: shorter near a corner, partly under the shape)
            assert 20 < mark.sum() < 100 and mark.amax() <= 1.0
            assert (mark > 0).sum() <= 3 * mark.sum(), "thin: about one pixel wide"
        else:  # four 2 x 2 dots (some may overlap or hide under the shape)
            assert 4 <= mark.sum() <= data.DOTS * data.DOT_SIDE**2 + 1e-3


def test_half_size_stage_loses_the_fine_period():
    """The instrument's premise: pooled to half size, the fine period is at the Nyquist limit
    and its contrast collapses, while the coarse one survives."""
    def labels_for(period):
        return torch.tensor([[0, 0, 0, 0, 1, period, 0]] * 8)

    contrast = {}
    for period in (0, 2):
        images, _ = data.make_batch(17, 0, labels=labels_for(period))
        half = data.downsample(images)
        # the bottom-right quadrant: background only (the shape is top-left)
        contrast[period] = (half[:, :, 16:, 16:].flatten(1).std(1) / images[:, :, 32:, 32:].flatten(1).std(1)).mean().item()
    assert contrast[0] < 0.6 and contrast[2] > 0.85


def test_conditioning_has_one_token_per_prompt_attribute_and_a_null_prompt():
    labels = data.balanced_labels(5)
    cond = conditioning.encode_labels(labels)
    assert cond["prompt_embeds"].shape == (5, len(data.PROMPT_ATTRIBUTES), conditioning.JOINT_DIM)
    # the marks are drawn but never asked for: changing them changes no embedding
    unmarked = labels.clone()
    unmarked[:, data.ATTRIBUTES.index("marks")] = (unmarked[:, data.ATTRIBUTES.index("marks")] + 1) % 3
    assert all(torch.equal(v, conditioning.encode_labels(unmarked)[k]) for k, v in cond.items())
    assert cond["pooled_prompt_embeds"].shape == (5, conditioning.POOLED_DIM)
    changed = labels.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 3
    other = conditioning.encode_labels(changed)["prompt_embeds"]
    assert torch.equal(other[:, :5], cond["prompt_embeds"][:, :5]) and not torch.equal(other[:, 5], cond["prompt_embeds"][:, 5])
    null = conditioning.null_embeds(5, prefix="negative_")
    assert set(null) == {"negative_prompt_embeds", "negative_pooled_prompt_embeds"}
    dropped = conditioning.drop_conditioning(cond, torch.tensor([True, False, True, True, False]))
    assert torch.equal(dropped["prompt_embeds"][1], null["negative_prompt_embeds"][0])
    assert torch.equal(dropped["prompt_embeds"][0], cond["prompt_embeds"][0])
