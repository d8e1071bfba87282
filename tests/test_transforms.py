"""Specification of the image geometry: train resize (square or shorter side), crop, flip, eval resize,
with exact output sizes and boxes computed by hand."""
import numpy as np
import pytest
import torch

from trainers.datasets.transforms import Geometry, apply_geometry, eval_geometry, resized_size, train_geometry


@pytest.mark.parametrize("width, height, expected", [
    (500, 375, (341, 256)),  # landscape: 256 * 500 / 375 = 341.33, truncated
    (375, 500, (256, 341)),  # portrait
    (300, 300, (256, 256)),  # square stays square
    (1000, 257, (996, 256)),  # 256 * 1000 / 257 = 996.1
    (224, 225, (256, 257)),  # upscaled: 256 * 225 / 224 = 257.1
])
def test_shorter_side_resize_keeps_the_aspect_ratio(width, height, expected):
    assert resized_size(width, height, 256, "shorter_side") == expected
    assert resized_size(width, height, 256, "square") == (256, 256)


def test_a_shorter_side_train_crop_is_crop_by_crop_and_stays_inside_the_resized_image():
    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    for seed in range(20):
        geometry = train_geometry(500, 375, 256, 224, torch.Generator().manual_seed(seed), "shorter_side")
        assert (geometry.resize_width, geometry.resize_height) == (341, 256)
        assert 0 <= geometry.offset_x <= 341 - 224 and 0 <= geometry.offset_y <= 256 - 224
        assert apply_geometry(image, geometry).shape == (3, 224, 224)


def test_the_crop_offset_can_reach_both_ends_of_the_longer_side():
    offsets = {train_geometry(500, 375, 256, 224, torch.Generator().manual_seed(seed), "shorter_side").offset_x
               for seed in range(2000)}
    assert min(offsets) == 0 and max(offsets) == 341 - 224


def test_square_mode_draws_the_same_crops_and_flips_as_before():
    # One randint of two offsets, then the flip coin: the stream the square resize has always used.
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.randint(0, 256 - 224 + 1, (2,), generator=generator)
        flip = bool(torch.rand((), generator=generator) < 0.5)
        geometry = train_geometry(500, 375, 256, 224, torch.Generator().manual_seed(seed))
        assert (geometry.offset_x, geometry.offset_y, geometry.flip) == (int(offsets[0]), int(offsets[1]), flip)
        assert (geometry.resize_width, geometry.resize_height) == (256, 256)


def test_boxes_follow_a_shorter_side_resize_crop_and_flip():
    geometry = Geometry(500, 375, 341, 256, 50, 10, False, 224)  # a 500 x 375 image, shorter side to 256
    # x: int(100 * 341 / 500) = 68 -> 18; int(400 * 341 / 500) = 272 -> 222
    # y: int(30 * 256 / 375) = 20 -> 10; int(300 * 256 / 375) = 204 -> 194
    assert geometry.map_boxes(np.array([[100, 30, 400, 300]])).tolist() == [[18, 10, 222, 194]]
    flipped = Geometry(500, 375, 341, 256, 50, 10, True, 224)
    assert flipped.map_boxes(np.array([[100, 30, 400, 300]])).tolist() == [[1, 10, 205, 194]]  # 223 - x


def test_the_shorter_side_image_is_the_resized_image_cropped():
    from torchvision.transforms.v2.functional import resize

    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    geometry = train_geometry(500, 375, 256, 224, torch.Generator().manual_seed(3), "shorter_side")
    resized = resize(image, [256, 341], antialias=True)
    top, left = geometry.offset_y, geometry.offset_x
    expected = resized[:, top:top + 224, left:left + 224]
    expected = expected.flip(-1) if geometry.flip else expected
    assert torch.equal(apply_geometry(image, geometry), expected)


def test_evaluation_resizes_straight_to_the_crop_size_whatever_the_train_resize():
    geometry = eval_geometry(500, 375, 224)
    assert (geometry.resize_width, geometry.resize_height, geometry.offset_x, geometry.offset_y) == (224, 224, 0, 0)
    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    assert apply_geometry(image, geometry).shape == (3, 224, 224)
    # int(100 * 224 / 500) = 44, int(30 * 224 / 375) = 17, int(400 * 224 / 500) = 179, int(300 * 224 / 375) = 179
    assert geometry.map_boxes(np.array([[100, 30, 400, 300]])).tolist() == [[44, 17, 179, 179]]
