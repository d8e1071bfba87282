"""Specification of the embedded synthetic set: exact geometry, determinism, and the design's intent.

The intent: the part (head disc) alone gives the class away with a trivial rule, the body carries the
class only in its faint grating (a matched-filter rule reads it reliably, its mean colour does not),
and both cues survive the horizontal flip of training.
"""
from __future__ import annotations

import math

import pytest
import torch

from trainers.datasets.synthetic import (
    SyntheticSpec, SyntheticSplit, class_textures, generate_synthetic, mask_boxes, part_colors, train_statistics,
)

SMALL = SyntheticSpec(train_size=480, val_size=120, test_size=480, seed=3)


@pytest.fixture(scope="module")
def splits() -> dict[str, SyntheticSplit]:
    return {split: generate_synthetic(SMALL, split) for split in ("train", "val", "test")}


def test_shapes_and_dtypes(splits):
    size = SMALL.image_size
    for split, data in splits.items():
        n = SMALL.size_of(split)
        assert len(data) == n
        assert data.images.shape == (n, 3, size, size) and data.images.dtype == torch.uint8
        assert data.labels.shape == (n,) and data.labels.dtype == torch.int64
        assert data.boxes.shape == (n, 4) and data.boxes.dtype == torch.int64
        assert data.part_boxes.shape == (n, 4) and data.part_boxes.dtype == torch.int64
        assert data.masks.shape == (n, size, size) and data.masks.dtype == torch.uint8
        assert set(data.masks.unique().tolist()) == {0, 1}
        assert 0 <= int(data.labels.min()) and int(data.labels.max()) < SMALL.num_classes


def test_same_seed_same_bytes_other_seed_differs(splits):
    again = generate_synthetic(SMALL, "val")
    for name in ("images", "labels", "boxes", "masks", "part_boxes"):
        assert torch.equal(getattr(again, name), getattr(splits["val"], name)), name
    other = generate_synthetic(SyntheticSpec(train_size=480, val_size=120, test_size=480, seed=4), "val")
    assert not torch.equal(other.images, again.images)
    assert (other.images != again.images).flatten(1).any(1).all()  # every image differs


def test_splits_share_no_image(splits):
    def rows(data):
        return {bytes(image.numpy()) for image in data.images}

    train, val, test = (rows(splits[s]) for s in ("train", "val", "test"))
    assert len(train) == SMALL.train_size and len(val) == SMALL.val_size and len(test) == SMALL.test_size
    assert not train & val and not train & test and not val & test


def test_boxes_are_exactly_the_bounding_boxes_of_the_masks(splits):
    for data in splits.values():
        for box, mask in zip(data.boxes.tolist(), data.masks):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box == [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    # mask_boxes on a hand-made mask: inclusive corners
    mask = torch.zeros((1, 6, 7), dtype=torch.uint8)
    mask[0, 1:4, 2:6] = 1
    mask[0, 5, 3] = 1
    assert mask_boxes(mask).tolist() == [[2, 1, 5, 5]]


def test_part_is_inside_the_object_and_small(splits):
    data = splits["test"]
    part, whole = data.part_boxes, data.boxes
    assert (part[:, :2] >= whole[:, :2]).all() and (part[:, 2:] <= whole[:, 2:]).all()
    # The part's centre pixel belongs to the object mask.
    cx, cy = (part[:, 0] + part[:, 2]) // 2, (part[:, 1] + part[:, 3]) // 2
    assert data.masks[torch.arange(len(data)), cy, cx].all()

    def area(b):
        return ((b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)).float()

    # A CAM on the part alone cannot reach IoU 0.3 with the object box: the part is < 1/4 of it.
    assert (area(part) / area(whole)).max() < 0.25
    # Objects are large but vary: between ~10% and ~60% of the image.
    fraction = area(whole) / SMALL.image_size ** 2
    assert 0.05 < fraction.min() and fraction.max() < 0.75 and fraction.std() > 0.05


def test_labels_are_balanced(splits):
    for split, data in splits.items():
        counts = torch.bincount(data.labels, minlength=SMALL.num_classes)
        assert int(counts.max() - counts.min()) <= 1, split


def part_rule(data: SyntheticSplit) -> torch.Tensor:
    """The class whose part colour is nearest in chromaticity to the mean of the part's 3x3 centre."""
    part = data.part_boxes
    cx, cy = (part[:, 0] + part[:, 2]) // 2, (part[:, 1] + part[:, 3]) // 2
    offsets = torch.arange(-1, 2)
    ys = (cy[:, None, None] + offsets[None, :, None]).expand(-1, 3, 3)
    xs = (cx[:, None, None] + offsets[None, None, :]).expand(-1, 3, 3)
    n = torch.arange(len(data))[:, None, None]
    pixels = data.images.permute(0, 2, 3, 1)[n, ys, xs].float().mean(dim=(1, 2))  # (N, 3)
    chroma = pixels / pixels.amax(dim=1, keepdim=True)
    return torch.cdist(chroma, part_colors(SMALL.num_classes)).argmin(dim=1)


def test_the_part_alone_gives_the_class_away(splits):
    for data in splits.values():
        assert torch.equal(part_rule(data), data.labels)


def body_pixels(data: SyntheticSplit) -> torch.Tensor:
    """(N, H, W) bool: the object without its part's box."""
    size = data.masks.shape[-1]
    grid = torch.arange(size)
    pb = data.part_boxes
    in_x = (grid[None] >= pb[:, 0, None]) & (grid[None] <= pb[:, 2, None])
    in_y = (grid[None] >= pb[:, 1, None]) & (grid[None] <= pb[:, 3, None])
    return data.masks.bool() & ~(in_y[:, :, None] & in_x[:, None, :])


def texture_rule(data: SyntheticSplit, spec: SyntheticSpec) -> torch.Tensor:
    """Matched filters: the class whose gratings (both tilt signs, jittered) hold most body energy."""
    body = body_pixels(data)
    luma = data.images.float().mean(dim=1) / 255
    mean = (luma * body).sum((1, 2)) / body.sum((1, 2))
    signal = ((luma - mean[:, None, None]) * body).flatten(1)  # (N, H*W)
    size = data.images.shape[-1]
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    tilts, periods = class_textures(spec)
    scale = size / 48
    jitter = math.radians(spec.orientation_jitter)
    energies = []
    for k in range(spec.num_classes):
        best = None
        for sign in (-1, 1):
            for dt in (-jitter, 0.0, jitter):
                for dp in (-spec.period_jitter, 0.0, spec.period_jitter):
                    theta = sign * (float(tilts[k]) + dt)
                    period = float(periods[k]) * scale * (1 + dp)
                    phase = (x * math.cos(theta) + y * math.sin(theta)) * (2 * math.pi / period)
                    c, s = signal @ torch.cos(phase).flatten(), signal @ torch.sin(phase).flatten()
                    energy = c * c + s * s
                    best = energy if best is None else torch.maximum(best, energy)
        energies.append(best)
    return torch.stack(energies, dim=1).argmax(dim=1)


def test_the_body_texture_is_a_reliable_cue(splits):
    data = splits["test"]
    accuracy = (texture_rule(data, SMALL) == data.labels).float().mean()
    assert accuracy >= 0.9  # measured 1.00 on these 480 images; chance is 1/6


def test_the_body_colour_is_not_a_cue(splits):
    # Nearest class centroid of the body's mean colour, fitted on train, scored on test: near chance.
    def mean_colour(data):
        body = body_pixels(data)[:, None]
        return (data.images.float() * body).sum((2, 3)) / body.sum((2, 3))

    train, test = splits["train"], splits["test"]
    centroids = torch.stack([mean_colour(train)[train.labels == k].mean(0) for k in range(SMALL.num_classes)])
    accuracy = (torch.cdist(mean_colour(test), centroids).argmin(1) == test.labels).float().mean()
    # chance 1/6 = 0.167; the s.d. of an accuracy on 480 images is ~0.017, so 0.27 is > 6 s.d. away
    assert accuracy < 0.27


def test_both_cues_survive_a_horizontal_flip(splits):
    data = splits["test"]
    flipped = SyntheticSplit(
        images=data.images.flip(-1), labels=data.labels, masks=data.masks.flip(-1),
        boxes=mask_boxes(data.masks.flip(-1)), part_boxes=torch.stack(
            [SMALL.image_size - 1 - data.part_boxes[:, 2], data.part_boxes[:, 1],
             SMALL.image_size - 1 - data.part_boxes[:, 0], data.part_boxes[:, 3]], dim=1),
        mean=data.mean, std=data.std)
    assert torch.equal(part_rule(flipped), data.labels)
    assert (texture_rule(flipped, SMALL) == data.labels).float().mean() >= 0.9


def test_unreliable_texture_knob():
    spec = SyntheticSpec(train_size=60, val_size=60, test_size=400, seed=3, texture_reliability=0.5)
    data = generate_synthetic(spec, "test")
    accuracy = float((texture_rule(data, spec) == data.labels).float().mean())
    assert 0.4 < accuracy < 0.6  # half the bodies wear another class's texture (s.d. 0.025)
    assert torch.equal(part_rule(data), data.labels)  # the part stays perfect


def test_train_statistics_of_every_split(splits):
    images = splits["train"].images.double() / 255
    mean = images.mean(dim=(0, 2, 3))
    std = images.permute(1, 0, 2, 3).flatten(1).std(dim=1, unbiased=False)
    for data in splits.values():
        torch.testing.assert_close(torch.tensor(data.mean, dtype=torch.float64), mean)
        torch.testing.assert_close(torch.tensor(data.std, dtype=torch.float64), std)
    assert train_statistics(SMALL) == (splits["train"].mean, splits["train"].std)


def test_other_sizes_and_class_counts():
    for spec in (SyntheticSpec(num_classes=2, image_size=32, train_size=40, val_size=40, test_size=40),
                 SyntheticSpec(num_classes=9, image_size=64, train_size=90, val_size=40, test_size=40)):
        data = generate_synthetic(spec, "val")
        assert data.images.shape == (40, 3, spec.image_size, spec.image_size)
        assert torch.equal(mask_boxes(data.masks), data.boxes)
        assert int(data.labels.max()) < spec.num_classes


@pytest.mark.parametrize("field, value", [
    ("num_classes", 1), ("num_classes", 10), ("num_classes", 3.0), ("image_size", 50), ("image_size", True),
    ("train_size", 0), ("seed", -1), ("body_length", (18.0, 11.0)), ("body_length", (11.0, 20.0)),
    ("part_radius", (3.0,)), ("part_radius", "3,4"), ("texture_contrast", (0.1, float("nan"))), ("texture_period", (3.5, 4.0)),
    ("texture_reliability", 1.5), ("period_jitter", 0.3), ("orientation_jitter", 20.0), ("max_clutter", -1),
    ("noise_std", -0.1),
])
def test_invalid_spec_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SyntheticSpec.{field}: .* allowed"):
        SyntheticSpec(**{field: value})


def test_ranges_from_lists_become_tuples():
    spec = SyntheticSpec(body_length=[11, 18], part_radius=[3.0, 4.0])  # as a YAML config gives them
    assert spec.body_length == (11.0, 18.0) and spec.part_radius == (3.0, 4.0)
    assert spec == SyntheticSpec() and hash(spec) == hash(SyntheticSpec())


def test_invalid_split():
    with pytest.raises(ValueError, match="split: 'dev'.*train, val, test"):
        generate_synthetic(SMALL, "dev")
