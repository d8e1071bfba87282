"""Specification of batched CAMs: target class per image, upsampling, min-max, no ReLU."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainers.cam import class_activation_maps, normalize_cams, predict_with_cams


def test_min_max_without_relu_keeps_negative_evidence_ordered():
    cams = torch.tensor([[[-2.0, -1.0], [0.0, 1.0]]])
    assert torch.allclose(normalize_cams(cams), torch.tensor([[[0.0, 1 / 3], [2 / 3, 1.0]]]))


def test_constant_and_nan_maps_become_zeros_and_others_are_untouched():
    cams = torch.stack([torch.full((3, 3), 5.0), torch.tensor([[float("nan")] * 3] * 3), torch.arange(9.0).view(3, 3)])
    out = normalize_cams(cams)
    assert torch.equal(out[0], torch.zeros(3, 3)) and torch.equal(out[1], torch.zeros(3, 3))
    assert torch.allclose(out[2], torch.arange(9.0).view(3, 3) / 8)


def hand_cam(features, weight, target, size):
    """Weighted channel sum by a loop over channels, bicubic upsampling, min-max by hand."""
    channels = features.shape[0]
    cam = sum(weight[target, c] * features[c] for c in range(channels))
    cam = F.interpolate(cam[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]
    low, high = cam.min().item(), cam.max().item()
    return (cam - low) / (high - low)


def test_cams_equal_a_hand_computed_cam_for_each_images_own_target():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 5, 4, 6, generator=generator)
    weight = torch.randn(7, 5, generator=generator)
    targets = torch.tensor([3, 6, 0])
    cams = class_activation_maps(features, weight, targets, (16, 24))
    assert cams.shape == (3, 16, 24) and cams.dtype == torch.float32
    for b in range(3):
        torch.testing.assert_close(cams[b], hand_cam(features[b], weight, targets[b], (16, 24)))


def test_low_precision_features_give_float32_cams_in_unit_range():
    features = torch.randn(2, 4, 3, 3).to(torch.bfloat16)
    cams = class_activation_maps(features, torch.randn(5, 4).to(torch.bfloat16), torch.tensor([1, 2]), (9, 9))
    assert cams.dtype == torch.float32
    assert cams.amin().item() == 0.0 and cams.amax().item() == 1.0


class TinyCam(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.classifier = nn.Linear(6, 4)

    def forward_features(self, x):
        return self.conv(x).relu()

    def forward_head(self, features):
        return self.classifier(features.mean((2, 3)))


def test_predicted_class_cams_when_no_target_is_given():
    torch.manual_seed(0)
    model = TinyCam()
    images = torch.randn(5, 3, 8, 8)
    logits, cams = predict_with_cams(model, images)
    _, expected = predict_with_cams(model, images, logits.argmax(dim=1))
    assert torch.equal(cams, expected)
    assert cams.shape == (5, 8, 8)


def test_shape_mismatches_are_refused():
    with pytest.raises(ValueError, match=r"targets: shape \(3,\) does not match 2 feature maps"):
        class_activation_maps(torch.zeros(2, 4, 3, 3), torch.zeros(5, 4), torch.tensor([0, 1, 2]), (8, 8))
    with pytest.raises(ValueError, match=r"classifier_weight: shape \(5, 3\) does not match 4 channels"):
        class_activation_maps(torch.zeros(2, 4, 3, 3), torch.zeros(5, 3), torch.tensor([0, 1]), (8, 8))
