"""The backbones of the papers, built on torchvision's models (imported only when one is built).

HaS's AlexNet-GAP and GoogLeNet-GAP (Singh & Lee 2017), wsolevaluation's VGG16, ResNet50 and
InceptionV3 CAM networks (Choe et al. 2020). Trunk modules keep torchvision's attribute names so
that torchvision's ImageNet state_dict files load by key; see trainers.backbones.
"""
from __future__ import annotations

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.inception import InceptionB

from trainers.backbones import CamBackbone, _conv_relu


def alexnet_gap(num_classes: int) -> CamBackbone:
    """HaS AlexNet-GAP: conv1-conv5 without the last pool, two new convs; 1024 x 13 x 13 at 224."""
    features = torchvision.models.alexnet(weights=None).features[:-1]  # slicing keeps keys features.0..11
    extra = nn.Sequential(*_conv_relu(256, 512), *_conv_relu(512, 1024))
    return CamBackbone("alexnet_gap", 224, trunk={"features": features}, new={"extra": extra},
                       feature_channels=1024, num_classes=num_classes)


def googlenet_gap(num_classes: int) -> CamBackbone:
    """HaS GoogLeNet-GAP: up to inception4e, one new conv; 1024 x 14 x 14 at 224."""
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                       transform_input=False)
    names = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
             "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d", "inception4e"]
    trunk = {n: getattr(net, n) for n in names}  # (B, 832, 14, 14) at 224
    extra = nn.Sequential(*_conv_relu(832, 1024))
    return CamBackbone("googlenet_gap", 224, trunk=trunk, new={"extra": extra},
                       feature_channels=1024, num_classes=num_classes)


def vgg16_gap(num_classes: int) -> CamBackbone:
    """wsolevaluation VGG16-CAM: conv1-conv5 without the last pool, one new conv; 1024 x 14 x 14 at 224."""
    features = torchvision.models.vgg16(weights=None).features[:-1]  # keys features.0..29
    extra = nn.Sequential(*_conv_relu(512, 1024))
    return CamBackbone("vgg16_gap", 224, trunk={"features": features}, new={"extra": extra},
                       feature_channels=1024, num_classes=num_classes)


def resnet50_cam(num_classes: int) -> CamBackbone:
    """wsolevaluation ResNet50-CAM: layer4 at stride 1; 2048 x 14 x 14 at 224."""
    net = torchvision.models.resnet50(weights=None)
    # Stride 1 keeps layer4 at layer3's resolution: a 14x14 CAM instead of 7x7.
    net.layer4[0].conv2.stride = (1, 1)
    net.layer4[0].downsample[0].stride = (1, 1)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return CamBackbone("resnet50_cam", 224, trunk={n: getattr(net, n) for n in names}, new={},
                       feature_channels=2048, num_classes=num_classes)


class _StrideOneInceptionB(InceptionB):
    """torchvision's InceptionB (Mixed_6a) at stride 1, as in wsolevaluation's InceptionV3-CAM."""

    def __init__(self, in_channels: int) -> None:
        super().__init__(in_channels)
        for block in (self.branch3x3, self.branch3x3dbl_3):
            block.conv.stride = (1, 1)
            block.conv.padding = (1, 1)

    def _forward(self, x: Tensor) -> list[Tensor]:
        # torchvision hard-codes a stride-2 pool here; stride 1 keeps the three branches aligned.
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return [branch3x3, branch3x3dbl, branch_pool]


def inception_v3_cam(num_classes: int) -> CamBackbone:
    """wsolevaluation InceptionV3-CAM: to Mixed_6e at stride 8, two new convs; 1024 x 28 x 28 at 224."""
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True,
                                          transform_input=False)
    net.Conv2d_1a_3x3.conv.padding = (1, 1)
    # Padded, ceil-mode pools (wsolevaluation's) so 224 input gives 28x28 after the stem.
    net.maxpool1 = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    net.maxpool2 = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    mixed_6a = _StrideOneInceptionB(288)
    mixed_6a.load_state_dict(net.Mixed_6a.state_dict())  # keep torchvision's init of this block
    net.Mixed_6a = mixed_6a
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
             "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
             "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"]
    trunk = {n: getattr(net, n) for n in names}  # (B, 768, 28, 28) at 224
    extra = nn.Sequential(nn.Dropout(0.5), *_conv_relu(768, 1024), nn.Dropout(0.5), *_conv_relu(1024, 1024))
    return CamBackbone("inception_v3_cam", 224, trunk=trunk, new={"extra": extra},
                       feature_channels=1024, num_classes=num_classes)
