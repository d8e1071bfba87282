"""Evaluate weights without training: the metrics, CAM overlays, per-image Parquet and curves that
training writes at its evaluations, for a checkpoint, a state_dict file or ImageNet weights.

    python -m trainers --eval-only model.weights=runs/a            # its latest checkpoint, its config
    python -m trainers --eval-only model.weights=runs/a/checkpoints/epoch_0004 --splits test
    python -m trainers --eval-only --config my.yaml model.weights=imagenet model.backbone=efficientnet_lite0_cam \\
        --cam-class predicted                                      # an ImageNet head on another dataset

The head must be the one the metrics are about: its classes are the dataset's (same count), or with
`--cam-class predicted` any head, each image's CAM then being of the head's top-1 class (class-agnostic
localisation: box and mask metrics only). A head the weights do not have is never made up at random.
Results go to `<output_dir>/eval/<epoch_NNNN | imagenet | file stem>` (or --eval-dir), written whole or not at all, never over an earlier one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from trainers import checkpoint as ckpt
from trainers.backbones import CamBackbone, build_backbone
from trainers.cam import class_activation_maps
from trainers.config import RunConfig
from trainers.engine import Trainer

log = logging.getLogger(__name__)

SPLITS = ("val", "test")
CAM_CLASSES = ("label", "predicted")
# Metrics that compare the head's prediction with the label: meaningless when the head's classes are not
# the dataset's (--cam-class predicted), so left out there.
_LABEL_METRICS = ("cls_top1", "loc_top1")


class EvalOnlyError(ValueError):
    """Weights that cannot be evaluated as asked; the message says why and what to do."""


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from: a checkpoint folder (with its config), a state_dict file, or ImageNet."""

    kind: str  # "checkpoint" | "file" | "imagenet"
    path: Path | None
    config: RunConfig | None  # a checkpoint's own config
    epoch: int  # a checkpoint's epoch, else 0


def resolve_weights(weights: str | None) -> WeightsSource:
    """model.weights as given: 'imagenet', a state_dict file, an epoch checkpoint folder, or a run's output_dir
    (its latest checkpoint)."""
    if weights is None:
        raise EvalOnlyError("model.weights: --eval-only needs weights to evaluate; allowed: a checkpoint folder "
                            "(epoch_NNNN), a run's output_dir (its latest checkpoint), a state_dict file, or 'imagenet'")
    if weights == "imagenet":
        return WeightsSource("imagenet", None, None, 0)
    path = Path(weights)
    if path.is_file():
        return WeightsSource("file", path, None, 0)
    if path.is_dir():
        folder = path
        if not (path / "state.pt").is_file():
            found = ckpt.list_checkpoints(path / "checkpoints") or ckpt.list_checkpoints(path)
            if not found:
                raise EvalOnlyError(f"model.weights: {path} is neither an epoch checkpoint (no state.pt) nor a run's "
                                    f"output_dir (no finished checkpoint in {path / 'checkpoints'})")
            folder = found[-1]
        state = ckpt.read_state(folder)
        return WeightsSource("checkpoint", folder, RunConfig.from_dict(state["config"]), int(state["epoch"]))
    raise EvalOnlyError(f"model.weights: {path} does not exist; allowed: a checkpoint folder, a run's output_dir, "
                        "a state_dict file, or 'imagenet'")


def default_name(source: WeightsSource) -> str:
    """The folder name of an evaluation under <output_dir>/eval: epoch_NNNN, imagenet, or the file's stem."""
    if source.kind == "checkpoint":
        return ckpt.epoch_dir_name(source.epoch)
    return "imagenet" if source.kind == "imagenet" else source.path.stem


def config_for(config_file: str | None, overrides: Sequence[str]) -> RunConfig:
    """The run config of an evaluation: the config file (or the defaults) with the overrides; with no config
    file and a checkpoint as model.weights, the checkpoint's own config with the overrides."""
    from trainers.config import load_config

    config = load_config(config_file, overrides)
    if config_file is None:
        source = resolve_weights(config.model.weights)
        if source.config is not None:
            config = RunConfig.from_dict(source.config.to_dict(), overrides)
    return config


def eval_config(config: RunConfig, source: WeightsSource) -> RunConfig:
    """The config to evaluate with: a checkpoint's architecture always, model.weights cleared (the weights
    are loaded whole, by load_whole)."""
    if source.config is not None:
        saved = source.config.model
        if (config.model.backbone, config.model.large_feature_map) != (saved.backbone, saved.large_feature_map):
            log.warning("eval-only: model %s (large_feature_map %s) from the checkpoint, not %s", saved.backbone,
                        saved.large_feature_map, config.model.backbone)
        config = replace(config, model=replace(config.model, backbone=saved.backbone,
                                               large_feature_map=saved.large_feature_map))
    return replace(config, model=replace(config.model, weights=None), fault_drill_epoch=0)


def load_whole(config: RunConfig, source: WeightsSource) -> CamBackbone:
    """The backbone with every parameter from the weights (head included), or one clear error."""
    model = config.model
    if source.kind == "checkpoint":
        state = ckpt.read_state(source.path)["model"]
        net = build_backbone(model.backbone, int(state["classifier.weight"].shape[0]),
                             large_feature_map=model.large_feature_map)
        net.load_state_dict(state)
        return net
    weights = "imagenet" if source.kind == "imagenet" else source.path
    classes = _head_classes(model.backbone, weights, model.large_feature_map)
    net = build_backbone(model.backbone, classes, weights, model.large_feature_map)
    # every parameter and BatchNorm statistic from the file (the batch counters matter for nothing here)
    missing = [key for key in net.weights_report.left_at_init if not key.endswith("num_batches_tracked")]
    if missing:
        raise EvalOnlyError(
            f"model.weights: {net.weights_report.path} gives backbone {model.backbone!r} no {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''} ({len(missing)} tensors): evaluating would use freshly "
            "initialised layers; fine-tune first (python -m trainers ...) and evaluate its checkpoint")
    return net


def _head_classes(backbone: str, weights, large_feature_map: bool) -> int:
    """The class count of the classifier in a weights file (after the backbone's head aliases)."""
    probe = build_backbone(backbone, 1, large_feature_map=large_feature_map)
    if weights == "imagenet":
        from trainers.backbones import fetch_imagenet_weights
        weights = fetch_imagenet_weights(backbone)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    for key, value in state.items():
        for prefix, replacement in probe.head_aliases.items():
            if key.startswith(prefix):
                key = replacement + key[len(prefix):]
        if key == "classifier.weight" and value.ndim == 2 and value.shape[1] == probe.feature_channels:
            return int(value.shape[0])
    raise EvalOnlyError(f"model.weights: {weights} has no classifier for backbone {backbone!r} (no key "
                        f"classifier.weight of {probe.feature_channels} inputs{' or its aliases ' + str(list(probe.head_aliases)) if probe.head_aliases else ''}): "
                        "evaluating would use a random head; fine-tune first and evaluate its checkpoint")


class _EvalOnlyTrainer(Trainer):
    """A Trainer whose evaluation may take each image's CAM from the head's top-1 class."""

    cam_class = "label"

    def eval_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cam_class == "label":
            return super().eval_step(images, labels)
        features = self.net.forward_features(self.normalize(images))
        logits = self.net.forward_head(features)
        cams = class_activation_maps(features, self.net.classifier.weight, logits.argmax(1),
                                     (self.data.input_size, self.data.input_size))
        return cams, logits


def prediction_names(count: int) -> list[str]:
    """Names of a head's classes for captions: ImageNet's for a 1000-class head, else the indices."""
    if count == 1000:
        from torchvision.models import ResNet50_Weights
        return [name for name in ResNet50_Weights.IMAGENET1K_V1.meta["categories"]]
    return [str(i) for i in range(count)]


def evaluate_weights(config: RunConfig, splits: Sequence[str] = SPLITS, *, cam_class: str = "label",
                     eval_dir: str | os.PathLike[str] | None = None) -> tuple[dict[str, float], Path]:
    """Evaluate config.model.weights on `splits`; writes metrics.json, config.yaml and artifacts/ to eval_dir
    (default <output_dir>/eval/<weights>) and returns the metrics under training's names ('test/maxboxacc_v2', ...)
    and that folder."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise EvalOnlyError(f"--splits: {','.join(splits)!r} is not allowed; allowed: a comma list of {', '.join(SPLITS)}")
    if cam_class not in CAM_CLASSES:
        raise EvalOnlyError(f"--cam-class: {cam_class!r} is not allowed; allowed: {', '.join(CAM_CLASSES)}")
    source = resolve_weights(config.model.weights)
    config = eval_config(config, source)
    target = Path(eval_dir) if eval_dir is not None else Path(config.output_dir) / "eval" / default_name(source)
    if target.exists():
        raise EvalOnlyError(f"{target} already holds an evaluation; nothing was overwritten: choose another "
                            "--eval-dir or remove it")
    net = load_whole(config, source)
    trainer = _EvalOnlyTrainer(config)
    classes = net.classifier.out_features
    if cam_class == "label" and classes != trainer.data.num_classes:
        raise EvalOnlyError(
            f"model.weights: the head has {classes} classes, the dataset {trainer.data.num_classes} "
            f"({', '.join(trainer.data.class_names[:5])}{' ...' if trainer.data.num_classes > 5 else ''}): its scores "
            "are not about the dataset's labels. Fine-tune first, or --cam-class predicted for the CAM of the "
            "head's top-1 class (box and mask metrics only)")
    trainer.cam_class = cam_class
    trainer.net = trainer.model = net.to(trainer.device, memory_format=trainer.memory_format)
    trainer.epoch = source.epoch
    if cam_class == "predicted":
        trainer.prediction_names = prediction_names(classes)

    staging = target.with_name(f".{target.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)  # left by a crash: never published
    staging.mkdir(parents=True)
    metrics: dict[str, float] = {"epoch": float(source.epoch)}
    for split in splits:
        interval = config.eval.interval if split == "val" else config.eval.test_interval
        start = time.perf_counter()
        print(f"eval-only: {split}: {len(getattr(trainer.data, split))} images ...", file=sys.stderr, flush=True)
        metrics.update(trainer.evaluate(split, interval, staging / "artifacts"))
        print(f"eval-only: {split}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if cam_class == "predicted":
        metrics = {k: v for k, v in metrics.items() if k.split("/")[-1] not in _LABEL_METRICS}
    (staging / "config.yaml").write_text(config.to_yaml())
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    (staging / "weights.json").write_text(json.dumps(
        {"kind": source.kind, "path": None if source.path is None else str(source.path), "epoch": source.epoch,
         "cam_class": cam_class, "head_classes": classes}, indent=1))
    os.replace(staging, target)
    return metrics, target
