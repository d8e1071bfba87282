"""The data of one run: train / val / test sources, classes and the normalisation statistics.

Normalisation follows the backbone (trainers.backbones.input_normalization): the mean/std its weights
expect, or, for a backbone without pretrained weights (None), the dataset's own statistics. The fills'
statistics are the dataset's, expressed in that normalised space, so a `dataset_mean` fill is the same
pixel colour whatever the backbone. A folder dataset's statistics are taken to be ImageNet's (as
wsolevaluation does); the synthetic set's are measured on its train split.

- `synthetic`: the embedded set (trainers/datasets/synthetic.py), generated in memory from a seed.
- any other name: a folder in the wsolevaluation layout (CUB, ILSVRC, OpenImages, or your own data
  converted with `python -m trainers.datasets convert-voc`), checked before training.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from trainers.backbones import input_normalization
from trainers.datasets.cache import ImageCache, cache_folder
from trainers.datasets.metadata import SPLITS
from trainers.datasets.sources import FolderDataset, FolderSource, MemorySource, SplitSource
from trainers.fills import IMAGENET_MEAN, IMAGENET_STD, FillStats


@dataclass
class RunData:
    train: SplitSource
    val: SplitSource
    test: SplitSource
    num_classes: int
    class_names: list[str]
    input_size: int
    mean: tuple[float, float, float]  # normalisation, [0, 1] pixel units
    std: tuple[float, float, float]
    fill_stats: FillStats  # the dataset's statistics in the normalised space (what fills use)
    notes: tuple[str, ...] = ()  # what the data check had to say (lenient mode: skipped images)


def build_data(config, seed: int = 0, *, backbone: str) -> RunData:
    """The RunData of a DataConfig, normalised as `backbone`'s weights expect."""
    if config.name == "synthetic":
        return _synthetic_data(config.synthetic, backbone)
    return _folder_data(config, seed, backbone)


def normalization_and_fill_stats(
    dataset_mean: Sequence[float], dataset_std: Sequence[float], backbone: str
) -> tuple[tuple[float, ...], tuple[float, ...], FillStats]:
    """(mean, std, fill stats) of a dataset fed to `backbone`: its weights' normalisation, else the
    dataset's own; the fill stats are the dataset's statistics in that normalised space."""
    declared = input_normalization(backbone)
    mean, std = declared if declared is not None else (tuple(dataset_mean), tuple(dataset_std))
    return mean, std, FillStats.from_normalization(dataset_mean, dataset_std, mean, std)


@lru_cache(maxsize=8)
def _synthetic_split(spec, split: str):
    from trainers.datasets.synthetic import generate_synthetic

    return generate_synthetic(spec, split)


def _synthetic_data(spec, backbone: str) -> RunData:
    sources = {}
    for split in SPLITS:
        data = _synthetic_split(spec, split)
        ids = [f"synthetic/{split}/{i:05d}" for i in range(len(data.labels))]
        sources[split] = MemorySource(split, data.images, data.labels, [b[None].numpy() for b in data.boxes],
                                      data.masks, ids)
    stats = _synthetic_split(spec, "train")
    # tiny_cnn: normalised with its own statistics, the dataset mean is 0 (the paper's fill).
    mean, std, fill_stats = normalization_and_fill_stats(stats.mean, stats.std, backbone)
    names = [f"class {k}" for k in range(spec.num_classes)]
    return RunData(sources["train"], sources["val"], sources["test"], spec.num_classes, names, spec.image_size,
                   mean, std, fill_stats)


def _folder_data(config, seed: int, backbone: str) -> RunData:
    from trainers.datasets.check import check_dataset, require_clean

    root, metadata = config.folders()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a folder (the images root of dataset {config.name!r})")
    if not metadata.is_dir():
        raise FileNotFoundError(f"data.metadata: {metadata} is not a folder with train/val/test metadata")
    report = check_dataset(root, metadata, splits=SPLITS, decode=False, workers=1)
    missing = [split for split in SPLITS if split not in report.splits]
    if missing:
        raise FileNotFoundError(f"data.metadata: {metadata} has no {', '.join(missing)} split folder; "
                                "a run needs train, val and test (<metadata>/<split>/image_ids.txt ...)")
    report, note = require_clean(report, strict=config.strict)  # strict: DatasetError naming every bad line
    records = {split: report.records(split) for split in SPLITS}
    cache = ImageCache(cache_folder(config.cache_dir)) if config.cache else None
    sources = {}
    for split in SPLITS:
        dataset = FolderDataset(root, records[split], train=split == "train", resize=config.resize_size,
                                crop=config.crop_size, seed=seed, resize_mode=config.resize, cache=cache)
        sources[split] = FolderSource(split, dataset, config.workers, pin_memory=torch.cuda.is_available())
    labels = [r.label for split in SPLITS for r in records[split]]
    num_classes = max(labels) + 1
    names_file = root / "classes.txt"
    names = names_file.read_text().split("\n")[:num_classes] if names_file.is_file() else []
    names = names if len(names) == num_classes else [f"class {k}" for k in range(num_classes)]
    # wsolevaluation takes the data's statistics to be ImageNet's and hides with their mean (0 when the
    # backbone normalises with ImageNet's statistics too).
    mean, std, fill_stats = normalization_and_fill_stats(IMAGENET_MEAN, IMAGENET_STD, backbone)
    return RunData(sources["train"], sources["val"], sources["test"], num_classes, names, config.crop_size,
                   mean, std, fill_stats, (note,))
