"""CAM backbones: a conv trunk whose last feature map, averaged, feeds one linear classifier.

Every backbone is a `CamBackbone`; the class activation map of class k is the feature map weighted
by the classifier row k: `einsum('bchw,bc->bhw', forward_features(x), classifier.weight[targets])`.
Trunk modules keep torchvision's attribute names, so torchvision's ImageNet state_dict files load
by key into the trunk and skip torchvision's own head.
"""
from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from trainers.registry import Registry

log = logging.getLogger(__name__)

# tiny_cnn widths of its four conv blocks; the last one is the CAM feature map's channel count.
TINY_CNN_CHANNELS = (16, 32, 64, 128)
# tiny_cnn max-pools 2x2 after this many leading blocks: stride 4, a 16x16 map at 64x64 input.
TINY_CNN_POOLED_BLOCKS = 2


@dataclass(frozen=True)
class WeightsReport:
    """What a weights file contributed to a model."""

    path: str
    loaded: list[str]  # model keys taken from the file
    skipped: list[str]  # file keys with no model key of the same name and shape
    left_at_init: list[str]  # model keys the file did not provide


class CamBackbone(nn.Module):
    """Named trunk stages run in order, then new stages, then GAP and a linear classifier."""

    def __init__(
        self,
        name: str,
        input_size: int,
        trunk: Mapping[str, nn.Module],
        new: Mapping[str, nn.Module],
        feature_channels: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.name = name
        self.input_size = input_size
        self.feature_channels = feature_channels
        # Registered under their own names (not inside a container) so state_dict keys match torchvision's.
        for stage_name, module in {**trunk, **new}.items():
            self.add_module(stage_name, module)
        self.stage_names = (*trunk, *new)
        self.classifier = nn.Linear(feature_channels, num_classes)
        self.new_module_names = (*new, "classifier")
        for module_name in self.new_module_names:
            init_new_layers(getattr(self, module_name))
        self.weights_report: WeightsReport | None = None

    def forward_features(self, x: Tensor) -> Tensor:
        """The last conv feature map (after its ReLU, before pooling): (B, C, h, w)."""
        for stage_name in self.stage_names:
            x = getattr(self, stage_name)(x)
        return x

    def forward_head(self, features: Tensor) -> Tensor:
        """Class logits (B, K) of a feature map (B, C, h, w)."""
        return self.classifier(features.mean((2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, K) of images (B, 3, H, W)."""
        return self.forward_head(self.forward_features(x))

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters of the layers not in the torchvision trunk (the 10x learning-rate group)."""
        return [p for n, p in self.named_parameters() if n.split(".")[0] in self.new_module_names]

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Parameters of the torchvision trunk's own layers."""
        return [p for n, p in self.named_parameters() if n.split(".")[0] not in self.new_module_names]


def init_new_layers(module: nn.Module) -> None:
    """Initialise new layers as the original CAM/HaS/wsolevaluation code does."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True)]


BACKBONES: Registry[Callable[[int], CamBackbone]] = Registry("backbone")

# torchvision's ImageNet weights of each trunk (enum, member); the file is looked up in the hub cache,
# never fetched. V1 for ResNet50: the original weights wsolevaluation fine-tunes from (V2 is another recipe).
_IMAGENET_WEIGHTS = {
    "alexnet_gap": ("AlexNet_Weights", "IMAGENET1K_V1"),
    "googlenet_gap": ("GoogLeNet_Weights", "IMAGENET1K_V1"),
    "vgg16_gap": ("VGG16_Weights", "IMAGENET1K_V1"),
    "resnet50_cam": ("ResNet50_Weights", "IMAGENET1K_V1"),
    "inception_v3_cam": ("Inception_V3_Weights", "IMAGENET1K_V1"),
}


def _torchvision_builder(name: str) -> Callable[[int], CamBackbone]:
    """The builder of a torchvision-based backbone, importing torchvision (~2 s) only when called."""

    def build(num_classes: int) -> CamBackbone:
        from trainers import backbones_torchvision

        return getattr(backbones_torchvision, name)(num_classes)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name}: built by trainers.backbones_torchvision.{name}"
    return build


@BACKBONES.register("tiny_cnn")
def tiny_cnn(num_classes: int) -> CamBackbone:
    """A small conv net for CPU runs at 64x64: a 128-channel 16x16 feature map."""
    layers: list[nn.Module] = []
    in_channels = 3
    for i, out_channels in enumerate(TINY_CNN_CHANNELS):
        # No conv bias: BatchNorm's shift replaces it.
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                   nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        if i < TINY_CNN_POOLED_BLOCKS:
            layers.append(nn.MaxPool2d(2))
        in_channels = out_channels
    return CamBackbone("tiny_cnn", 64, trunk={}, new={"features": nn.Sequential(*layers)},
                       feature_channels=in_channels, num_classes=num_classes)


for _name in _IMAGENET_WEIGHTS:  # the backbones of the papers, all built on torchvision's models
    BACKBONES.register(_name)(_torchvision_builder(_name))


def imagenet_weights_path(name: str) -> Path:
    """Where torchvision's ImageNet file of a backbone's trunk is expected in the torch hub cache."""
    BACKBONES[name]  # unknown names fail with the list of valid ones
    if name not in _IMAGENET_WEIGHTS:
        raise ValueError(f"backbone {name!r} has no ImageNet weights; "
                         f"backbones with them: {', '.join(_IMAGENET_WEIGHTS)}")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(imagenet_weights_url(name))


def imagenet_weights_url(name: str) -> str:
    """Where torchvision publishes the ImageNet file of a backbone's trunk (never fetched here)."""
    import torchvision

    enum, member = _IMAGENET_WEIGHTS[name]
    return getattr(torchvision.models, enum)[member].url


def build_backbone(
    name: str, num_classes: int, weights: str | os.PathLike[str] | None = None
) -> CamBackbone:
    """A backbone by name; weights: None (random init), "imagenet", or a local state_dict file."""
    builder = BACKBONES[name]
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if weights is None:
        return builder(int(num_classes))
    if isinstance(weights, str) and weights == "imagenet":
        path = imagenet_weights_path(name)
        if not path.is_file():
            url = imagenet_weights_url(name)
            raise FileNotFoundError(
                f"ImageNet weights of backbone {name!r} not found at {path}; nothing is downloaded: "
                f"put {url} there (the directory follows $TORCH_HOME, see torch.hub.get_dir())")
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file for backbone {name!r} not found: {path}")
    model = builder(int(num_classes))
    model.weights_report = load_matching_weights(model, path)
    return model


def load_matching_weights(model: CamBackbone, path: str | os.PathLike[str]) -> WeightsReport:
    """Copy into the model every tensor of a state_dict file whose key and shape match; others stay."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper_key in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(state, Mapping) and isinstance(state.get(wrapper_key), Mapping):
            state = state[wrapper_key]
    if not isinstance(state, Mapping):
        raise ValueError(f"weights file {path} holds a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    matched = {k: v for k, v in state.items()
               if k in own and isinstance(v, Tensor) and v.shape == own[k].shape}
    # BatchNorm's num_batches_tracked scalars can match by accident; require a real parameter.
    parameter_names = {n for n, _ in model.named_parameters()}
    if not parameter_names & matched.keys():
        raise ValueError(
            f"weights file {path} has no parameter matching backbone {model.name!r} by name and shape; "
            f"file keys e.g. {list(state)[:4]}, model keys e.g. {list(own)[:4]}")
    model.load_state_dict(matched, strict=False)
    report = WeightsReport(
        path=str(path),
        loaded=list(matched),
        skipped=[k for k in state if k not in matched],
        left_at_init=[k for k in own if k not in matched],
    )
    log.info("%s: loaded %d tensors from %s, skipped %d, left %d at init", model.name,
             len(report.loaded), path, len(report.skipped), len(report.left_at_init))
    return report
