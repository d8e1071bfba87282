"""One run's configuration: typed, frozen dataclasses with every default in one place.

Built from a plain dict (YAML, overrides) by `RunConfig.from_dict`; an unknown key or a wrong type
raises ConfigError with the key's dotted path and the allowed values.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainers.backbones import BACKBONES, LARGE_FEATURE_MAP_BACKBONES
from trainers.config_parse import ConfigError, build, flatten, load_yaml, parse_override, set_dotted, to_dict
from trainers.datasets.synthetic import SyntheticSpec
from trainers.fills import FILL_STRATEGIES
from trainers.hide import format_mixture, parse_mixture, validate_p_hide


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class DataConfig:
    name: str = "synthetic"  # "synthetic" (embedded, no files) or a label for a wsolevaluation-layout folder
    root: str | None = None  # images root of a folder dataset (image ids are relative to it); $VARS and ~
    #   are expanded on the node that reads it (the data lives on each worker node, not on the driver)
    metadata: str | None = None  # its metadata root with train/val/test; default: <root>/metadata
    resize_size: int = 256  # train: resize to a square of this side (wsolevaluation) ...
    resize: Literal["square", "shorter_side"] = "square"  # ... or its shorter side to it, aspect kept (HaS Torch)
    crop_size: int = 224  # ... then random-crop this; eval: resize straight to this (wsolevaluation), any mode
    batch_size: int = 128
    workers: int = 2  # DataLoader processes for folder datasets
    cache: bool = True  # folder datasets: each image decoded and resized once per node, kept on its disk
    #   (trainers/datasets/cache.py; the pixels of a full decode and resize, to the bit); False: decoded
    #   every epoch, large photos at a reduced scale (trainers/datasets/decode.py; pixels within rounding)
    cache_dir: str | None = None  # where, on each node: default $HAS_SWEEP_CACHE, else
    #   $XDG_CACHE_HOME/has-sweep/images or ~/.cache/has-sweep/images
    strict: bool = True  # bad metadata lines refuse training; False skips those images and says how many
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)

    def __post_init__(self) -> None:
        _require(self.name == "synthetic" or self.root is not None,
                 f"root: required for the folder dataset {self.name!r} (the images root)")
        _require(self.crop_size >= 8 and self.resize_size >= self.crop_size,
                 f"crop_size {self.crop_size} / resize_size {self.resize_size}: need 8 <= crop_size <= resize_size")
        _require(self.batch_size >= 1, f"batch_size: {self.batch_size} is not allowed; an int >= 1")
        _require(self.workers >= 0, f"workers: {self.workers} is not allowed; an int >= 0")

    def folders(self) -> tuple[Path, Path]:
        """(images root, metadata root) on this node: environment variables and ~ expanded here."""
        root = Path(os.path.expandvars(os.path.expanduser(self.root or "")))
        metadata = Path(os.path.expandvars(os.path.expanduser(self.metadata))) if self.metadata else root / "metadata"
        return root, metadata

    @property
    def input_size(self) -> int:
        """Side of the square images the network sees (train crops and eval images)."""
        return self.synthetic.image_size if self.name == "synthetic" else self.crop_size


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "tiny_cnn"
    weights: str | None = None  # None (random init), "imagenet" (torch hub cache, downloaded if missing) or a file
    # Learning-rate multiplier of the backbone's fast group: wsolevaluation's lr_classifier_ratio (10 there)
    # on its 10x group (ResNet50: layer4 + classifier); backbones without one ignore it (docs/backbones.md).
    fast_lr_mult: float = 1.0
    # wsolevaluation's --large_feature_map (off there by default): 28x28 maps at 224 instead of 14x14,
    # for the backbones in LARGE_FEATURE_MAP_BACKBONES only.
    large_feature_map: bool = False

    def __post_init__(self) -> None:
        _require(self.backbone in BACKBONES,
                 f"backbone: {self.backbone!r} is not allowed; allowed: {', '.join(BACKBONES.names())}")
        _require(self.fast_lr_mult > 0, f"fast_lr_mult: {self.fast_lr_mult} must be > 0")
        _require(not self.large_feature_map or self.backbone in LARGE_FEATURE_MAP_BACKBONES,
                 f"large_feature_map: true is not allowed with backbone {self.backbone!r}; allowed with: "
                 f"{', '.join(LARGE_FEATURE_MAP_BACKBONES)} (or false)")


@dataclass(frozen=True)
class HasConfig:
    mixture: Any = "none"  # patch sizes in input pixels: 'none', '16', 'mixed:0,16,32', {16: 1, 32: 3}
    p_hide: float = 0.5  # the paper's: each patch hidden independently with this probability
    fill: str = "dataset_mean"  # the paper's fill; see trainers/fills.py

    def __post_init__(self) -> None:
        # Stored in its canonical readable form: hashable, and the same string in every report.
        object.__setattr__(self, "mixture", format_mixture(parse_mixture(self.mixture, "mixture")))
        validate_p_hide(self.p_hide)
        _require(self.fill in FILL_STRATEGIES,
                 f"fill: {self.fill!r} is not allowed; allowed: {', '.join(FILL_STRATEGIES.names())}")

    @property
    def sizes(self) -> dict[int, float]:
        return parse_mixture(self.mixture)

    @property
    def enabled(self) -> bool:
        return self.p_hide > 0 and any(size > 0 for size in self.sizes)


@dataclass(frozen=True)
class OptimConfig:
    # Defaults: the recipe that trains tiny_cnn on the synthetic set (docs/synthetic.md).
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.2
    momentum: float = 0.9  # SGD momentum (AdamW: beta1)
    weight_decay: float = 5e-4
    nesterov: bool = True
    epochs: int = 12
    schedule: Literal["cosine", "step", "multistep", "constant"] = "cosine"
    warmup_fraction: float = 0.15  # linear warm-up from lr/10 over this share of the steps
    step_epochs: int = 0  # schedule 'step': multiply by gamma every this many epochs (0: epochs // 3)
    gamma: float = 0.1
    # schedule 'multistep': stage k starts at epoch milestones[k-1] (0-based: milestone 14 = the 15th epoch)
    milestones: tuple[int, ...] = ()
    lr_factors: tuple[float, ...] = ()  # lr multiplier of each stage (one more than milestones; default gamma ** k)
    weight_decay_factors: tuple[float, ...] = ()  # weight_decay multiplier of each stage (default 1 throughout)
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"lr: {self.lr} is not allowed; a number > 0")
        _require(self.epochs >= 1, f"epochs: {self.epochs} is not allowed; an int >= 1")
        _require(0 <= self.warmup_fraction < 1,
                 f"warmup_fraction: {self.warmup_fraction} is not allowed; a share of the steps in [0, 1)")
        _require(self.weight_decay >= 0, f"weight_decay: {self.weight_decay} must be >= 0")
        _require(0 <= self.momentum < 1, f"momentum: {self.momentum} must be in [0, 1)")
        _require(0 <= self.label_smoothing < 1, f"label_smoothing: {self.label_smoothing} must be in [0, 1)")
        self._check_stages()

    def _check_stages(self) -> None:
        staged = {"milestones": self.milestones, "lr_factors": self.lr_factors,
                  "weight_decay_factors": self.weight_decay_factors}
        if self.schedule != "multistep":
            for name, value in staged.items():
                _require(not value, f"{name}: {list(value)} is only for schedule 'multistep' (schedule is "
                                    f"{self.schedule!r}); allowed here: []")
            return
        _require(len(self.milestones) > 0, "milestones: [] is not allowed with schedule 'multistep'; "
                                           "a list of epochs where the next stage starts, e.g. [30, 60]")
        previous = 0
        for epoch in self.milestones:
            _require(previous < epoch < self.epochs,
                     f"milestones: {list(self.milestones)} is not allowed; increasing epochs in 1..{self.epochs - 1} "
                     f"(0-based epoch where the next stage starts; epochs is {self.epochs})")
            previous = epoch
        stages = len(self.milestones) + 1
        for name in ("lr_factors", "weight_decay_factors"):
            value = getattr(self, name)
            _require(not value or len(value) == stages,
                     f"{name}: {list(value)} is not allowed; one factor per stage: {stages} for "
                     f"{len(self.milestones)} milestones (or [] for the default)")
        _require(all(f > 0 for f in self.lr_factors),
                 f"lr_factors: {list(self.lr_factors)} is not allowed; factors > 0")
        _require(all(f >= 0 for f in self.weight_decay_factors),
                 f"weight_decay_factors: {list(self.weight_decay_factors)} is not allowed; factors >= 0")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1  # evaluate on val every this many epochs (and always after the last)
    interval: float = 0.01  # CAM threshold step on val during training
    test_interval: float = 0.001  # the final test evaluation: wsolevaluation's step
    iou_thresholds: tuple[float, ...] = (0.3, 0.5, 0.7)
    loc_fraction: float = 0.2  # GT-known / top-1 loc: CAM threshold as a fraction of its max (paper)
    workers: int = 1  # processes of the box metric (1: in the training process)
    overlay_count: int = 16  # images in the CAM overlay grid of each evaluation

    def __post_init__(self) -> None:
        _require(self.every >= 1, f"every: {self.every} is not allowed; an int >= 1")
        for name in ("interval", "test_interval"):
            value = getattr(self, name)
            _require(0 < value < 1, f"{name}: {value} is not allowed; a step in (0, 1)")
        _require(len(self.iou_thresholds) > 0 and all(0 < d <= 1 for d in self.iou_thresholds),
                 f"iou_thresholds: {list(self.iou_thresholds)} is not allowed; values in (0, 1]")
        _require(0 <= self.loc_fraction < 1, f"loc_fraction: {self.loc_fraction} must be in [0, 1)")
        _require(self.workers >= 1, f"workers: {self.workers} is not allowed; an int >= 1")


# Keys that change how a run executes, not what it computes: a resume may change them.
RUNTIME_KEYS = frozenset({"data.workers", "data.cache_dir", "eval.workers", "device", "output_dir", "threads", "compile",
                          "keep_checkpoints", "progress", "fault_drill_epoch"})


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    has: HasConfig = field(default_factory=HasConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"  # auto: the GPU when there is one
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 autocast on GPUs and on CPUs with bf16 instructions, else off
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    sync_batchnorm: bool = True  # DDP on GPUs: BatchNorm statistics over the global batch (CPU: per rank)
    threads: int = 0  # torch intra-op threads (0: torch's default)
    output_dir: str = "runs/default"
    keep_checkpoints: int = 2  # epoch checkpoints kept on disk (the newest)
    progress: bool = True  # progress bar on the console
    fault_drill_epoch: int = 0  # > 0: a fresh (not resumed) run fails once after this epoch, to drill recovery

    def __post_init__(self) -> None:
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 f"device: {self.device!r} is not allowed; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
        _require(self.keep_checkpoints >= 1, f"keep_checkpoints: {self.keep_checkpoints} must be >= 1")
        _require(self.threads >= 0, f"threads: {self.threads} must be >= 0")
        largest = max(self.has.sizes)
        _require(largest <= self.data.input_size,
                 f"has.mixture: patch size {largest} is larger than the input {self.data.input_size}x"
                 f"{self.data.input_size}; allowed sizes: 0..{self.data.input_size}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> RunConfig:
        """A validated config from a plain dict plus 'dotted.key=value' overrides."""
        merged = _deep_copy(data or {})
        for text in overrides:
            key, value = parse_override(text)
            set_dotted(merged, key, value, cls)
        return build(cls, merged)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """A RunConfig from a YAML file (or the defaults) and overrides; errors name the file."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = load_yaml(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    try:
        return RunConfig.from_dict(data, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path is not None else str(error)) from None


def config_differences(a: RunConfig, b: RunConfig, ignore: frozenset[str] = RUNTIME_KEYS) -> dict[str, tuple]:
    """{dotted key: (a's value, b's value)} for every key that differs, runtime keys excluded."""
    flat_a, flat_b = flatten(a.to_dict()), flatten(b.to_dict())
    return {k: (flat_a.get(k), flat_b.get(k)) for k in sorted(flat_a.keys() | flat_b.keys())
            if k not in ignore and flat_a.get(k) != flat_b.get(k)}


__all__ = ["ConfigError", "DataConfig", "EvalConfig", "HasConfig", "ModelConfig", "OptimConfig", "RunConfig",
           "config_differences", "load_config"]
