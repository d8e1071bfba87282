"""Inputs are normalised as the backbone's weights expect, and the fills stay the same pixel colours.

The fills' statistics are the dataset's, expressed in the backbone's normalised space: the paper's
`dataset_mean` fill is the dataset's mean colour whatever the backbone (0 only when the backbone
normalises with the dataset's own statistics)."""
from __future__ import annotations

import pytest
import torch

from test_dataset_metadata import clean_dataset
from trainers.config import DataConfig
from trainers.datasets.run_data import build_data
from trainers.datasets.synthetic import SyntheticSpec
from trainers.fills import FILL_STRATEGIES, IMAGENET_MEAN, IMAGENET_STD

SMALL = SyntheticSpec(train_size=24, val_size=6, test_size=6)


def folder_config(tmp_path) -> DataConfig:
    clean_dataset(tmp_path)
    return DataConfig(name="mine", root=str(tmp_path), resize_size=10, crop_size=8, workers=0)


@pytest.mark.parametrize("backbone, mean, std", [
    ("resnet50_cam", IMAGENET_MEAN, IMAGENET_STD),  # torchvision's weights
    ("efficientnet_lite0_cam", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # the Lite weights: [-1, 1]
])
def test_folder_data_is_normalised_as_the_backbone_expects(tmp_path, backbone, mean, std):
    data = build_data(folder_config(tmp_path), backbone=backbone)
    assert (data.mean, data.std) == (mean, std)
    # A folder dataset's statistics are taken to be ImageNet's (wsolevaluation): its mean colour is
    # IMAGENET_MEAN in pixel units, so the normalised fill is (IMAGENET_MEAN - mean) / std.
    expected = [(m - n) / s for m, n, s in zip(IMAGENET_MEAN, mean, std)]
    torch.testing.assert_close(data.fill_stats.mean, torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(data.fill_stats.black, torch.tensor([-n / s for n, s in zip(mean, std)]),
                               rtol=0, atol=1e-6)


def test_efficientnet_hides_a_folder_dataset_with_the_imagenet_mean_colour(tmp_path):
    # By hand: (0.485 - 0.5) / 0.5 = -0.03, (0.456 - 0.5) / 0.5 = -0.088, (0.406 - 0.5) / 0.5 = -0.188.
    data = build_data(folder_config(tmp_path), backbone="efficientnet_lite0_cam")
    torch.testing.assert_close(data.fill_stats.mean, torch.tensor([-0.03, -0.088, -0.188]), rtol=0, atol=1e-6)


def test_the_synthetic_set_keeps_its_own_statistics_for_tiny_cnn_and_the_weights_for_efficientnet():
    own = build_data(DataConfig(synthetic=SMALL), backbone="tiny_cnn")
    lite = build_data(DataConfig(synthetic=SMALL), backbone="efficientnet_lite0_cam")
    assert (lite.mean, lite.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    torch.testing.assert_close(own.fill_stats.mean, torch.zeros(3), rtol=0, atol=1e-6)  # the paper's 0
    torch.testing.assert_close(own.fill_stats.std, torch.ones(3), rtol=0, atol=1e-6)
    dataset_mean = torch.tensor(own.mean)  # the synthetic train split's measured mean colour
    torch.testing.assert_close(lite.fill_stats.mean, (dataset_mean - 0.5) / 0.5, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone", ["tiny_cnn", "efficientnet_lite0_cam"])
def test_the_dataset_mean_fill_is_the_same_colour_in_pixels_for_every_backbone(backbone):
    data = build_data(DataConfig(synthetic=SMALL), backbone=backbone)
    images = torch.zeros(1, 3, 4, 4)
    fill = FILL_STRATEGIES["dataset_mean"](images, data.fill_stats, torch.Generator().manual_seed(0))
    value = fill.expand(1, 3, 4, 4)[0, :, 0, 0]  # the fill of a hidden pixel, normalised
    pixels = value * torch.tensor(data.std) + torch.tensor(data.mean)  # back to [0, 1] units
    reference = build_data(DataConfig(synthetic=SMALL), backbone="tiny_cnn").mean  # the dataset's own mean
    torch.testing.assert_close(pixels, torch.tensor(reference, dtype=torch.float32), rtol=0, atol=1e-6)
