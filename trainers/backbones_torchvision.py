"""The backbones of the papers, built on torchvision's models (imported only when one is built).

CAM's / HaS's AlexNet-GAP and GoogLeNet-GAP (Zhou et al. 2016, metalbubble/CAM prototxts; Singh & Lee
2017), wsolevaluation's VGG16, ResNet50 and InceptionV3 CAM networks (Choe et al. 2020). Trunk modules
keep torchvision's attribute names so that torchvision's ImageNet state_dict files load by key; see
trainers.backbones. Every layer, size and group is listed with its reference in docs/backbones.md.
"""
from __future__ import annotations

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models import vgg
from torchvision.models.inception import InceptionB

from trainers.backbones import CamBackbone, _conv_relu, init_new_layers


def alexnet_gap(num_classes: int) -> CamBackbone:
    """CAM's AlexNet-GAP on torchvision's AlexNet trunk: conv1-conv5, pool5 at stride 1, two grouped
    512-channel convs, GAP, dropout 0.5, fc; 512 x 11 x 11 at 224."""
    features = torchvision.models.alexnet(weights=None).features  # conv1-5 at features.0/3/6/8/10
    # pool5 3x3 at stride 1 instead of 2 (deploy_alexnetplusCAM_imagenet.prototxt, pool5): 13x13 -> 11x11.
    # Replaced in place, so the keys of the layers before it stay torchvision's.
    features[12] = nn.MaxPool2d(kernel_size=3, stride=1)
    extra = nn.Sequential(*_conv_relu(256, 512, groups=2), *_conv_relu(512, 512, groups=2))  # conv6, conv7
    # Trained at one rate (CAM: blobs_lr 1 on every layer; HaS: one SGD state): no fast group.
    return CamBackbone("alexnet_gap", 224, trunk={"features": features}, new={"extra": extra},
                       feature_channels=512, num_classes=num_classes, fast_lr_prefixes=(), pooled_dropout=0.5)


def googlenet_gap(num_classes: int) -> CamBackbone:
    """CAM's GoogLeNet-GAP on torchvision's GoogLeNet: up to inception4e, one grouped 1024-channel conv;
    1024 x 14 x 14 at 224."""
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                       transform_input=False)
    names = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
             "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d", "inception4e"]
    trunk = {n: getattr(net, n) for n in names}  # (B, 832, 14, 14) at 224: maxpool4 and later dropped
    extra = nn.Sequential(*_conv_relu(832, 1024, groups=2))  # CAM_conv: 3x3, pad 1, group 2
    # Trained at one rate (CAM: lr_mult 1 on every layer's weights): no fast group.
    return CamBackbone("googlenet_gap", 224, trunk=trunk, new={"extra": extra},
                       feature_channels=1024, num_classes=num_classes, fast_lr_prefixes=())


def vgg16_gap(num_classes: int, large_feature_map: bool = False) -> CamBackbone:
    """wsolevaluation's VGG16-CAM: conv1-conv5 without pool5 (and without pool4 with a large map), one
    new 1024-channel conv; 1024 x 14 x 14 at 224 (28 x 28 large)."""
    # torchvision's VGG16 trunk without building its 120M-parameter classifier; initialised as
    # torchvision's VGG does (kaiming normal fan_out, zero bias), which is init_new_layers' rule.
    features = vgg.make_layers(vgg.cfgs["D"])[:-1]  # keys features.0..29: pool5 (30) dropped
    init_new_layers(features)
    if large_feature_map:
        features[23] = nn.Identity()  # pool4 too; an Identity keeps conv5's keys (features.24..28)
    extra = nn.Sequential(*_conv_relu(512, 1024))  # conv6
    return CamBackbone("vgg16_gap", 224, trunk={"features": features}, new={"extra": extra},
                       feature_channels=1024, num_classes=num_classes, fast_lr_prefixes=("extra.", "classifier."))


def resnet50_cam(num_classes: int, large_feature_map: bool = False) -> CamBackbone:
    """wsolevaluation's ResNet50-CAM: layer4 at stride 1 (and layer3 too with a large map); 2048 x 14 x 14
    at 224 (28 x 28 large)."""
    net = torchvision.models.resnet50(weights=None)
    # Stride 1 keeps layer4 at layer3's resolution: a 14x14 CAM instead of 7x7 (28x28: layer3 too).
    for layer in (net.layer3, net.layer4) if large_feature_map else (net.layer4,):
        layer[0].conv2.stride = (1, 1)
        layer[0].downsample[0].stride = (1, 1)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    # wsolevaluation trains layer4 (pretrained) and the classifier at 10x.
    return CamBackbone("resnet50_cam", 224, trunk={n: getattr(net, n) for n in names}, new={},
                       feature_channels=2048, num_classes=num_classes, fast_lr_prefixes=("layer4.", "classifier."))


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


def inception_v3_cam(num_classes: int, large_feature_map: bool = False) -> CamBackbone:
    """wsolevaluation's InceptionV3-CAM: to Mixed_6e with Mixed_6a at stride 1, two new convs, three
    dropouts; 1024 x 14 x 14 at 224 (28 x 28 large: no pool before Mixed_6a)."""
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
    if not large_feature_map:  # wsolevaluation's default: a 3x3 stride-2 ceil-mode pool, 28 -> 14
        trunk = {**{n: trunk[n] for n in names[:10]}, "maxpool3": nn.MaxPool2d(3, stride=2, ceil_mode=True),
                 **{n: trunk[n] for n in names[10:]}}
    # Three dropouts as wsolevaluation's forward: before each new conv and after the last one; the last
    # acts on the map before the (1x1 conv) classifier, which commutes with the pooling, so here it
    # ends the new stage (identity in eval: CAMs see the plain map).
    extra = nn.Sequential(nn.Dropout(0.5), *_conv_relu(768, 1024), nn.Dropout(0.5), *_conv_relu(1024, 1024),
                          nn.Dropout(0.5))
    return CamBackbone("inception_v3_cam", 224, trunk=trunk, new={"extra": extra}, feature_channels=1024,
                       num_classes=num_classes, fast_lr_prefixes=("extra.", "classifier."))
