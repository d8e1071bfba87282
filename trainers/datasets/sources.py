"""Batches of one split, from memory (the synthetic set) or from image files (wsolevaluation layout).

A source yields `Batch`es of uint8 images for given split positions; the engine moves them to the
device and normalises there. Randomness (crop, flip) is drawn from a seed of (run seed, epoch,
position): the same batches come out whatever the worker count, and after a resume.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from trainers.datasets.cache import ImageCache, crop_and_flip
from trainers.datasets.decode import decode_rgb, decode_train_crop
from trainers.datasets.transforms import (Geometry, ResizeMode, apply_geometry, eval_geometry, map_mask, sample_seed,
                                          train_geometry)


@dataclass
class Batch:
    """Images (B, 3, H, W) uint8 with labels, split positions and, where known, boxes and masks."""

    images: Tensor
    labels: Tensor  # (B,) int64
    indices: Tensor  # (B,) int64 positions in the split
    boxes: list[np.ndarray] | None = None  # (k, 4) inclusive x0, y0, x1, y1 in the input frame
    masks: Tensor | None = None  # (B, H, W) uint8: 1 object, 0 background, 255 ignored


class SplitSource:
    """One split: its size, image ids, labels, and batches of any subset of its positions."""

    name: str
    image_ids: list[str]
    labels: Tensor
    has_boxes: bool
    has_masks: bool

    def __len__(self) -> int:
        return len(self.image_ids)

    def batches(self, indices: Tensor, batch_size: int, *, train: bool, epoch: int, seed: int) -> Iterator[Batch]:
        raise NotImplementedError


class MemorySource(SplitSource):
    """A split held in memory as tensors; train batches are flipped on a per-image coin."""

    def __init__(self, name: str, images: Tensor, labels: Tensor, boxes: Sequence[np.ndarray] | None,
                 masks: Tensor | None, image_ids: Sequence[str]) -> None:
        self.name = name
        self.images, self.labels, self.masks = images, labels, masks
        self.boxes = None if boxes is None else [np.asarray(b, dtype=np.int64).reshape(-1, 4) for b in boxes]
        self.image_ids = list(image_ids)
        self.has_boxes, self.has_masks = boxes is not None, masks is not None

    def batches(self, indices: Tensor, batch_size: int, *, train: bool, epoch: int, seed: int) -> Iterator[Batch]:
        flips = None
        if train:  # one coin per image of the split, from (seed, epoch) only
            coins = torch.Generator().manual_seed(sample_seed(seed, epoch, len(self)))
            flips = torch.rand(len(self), generator=coins) < 0.5
        width = self.images.shape[-1]
        for chunk in indices.split(batch_size):
            images = self.images[chunk]
            masks = None if self.masks is None else self.masks[chunk]
            boxes = None if self.boxes is None else [self.boxes[i].copy() for i in chunk.tolist()]
            if flips is not None:
                flip = flips[chunk]
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
                if masks is not None:
                    masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
                if boxes is not None:
                    for box, flipped in zip(boxes, flip.tolist()):
                        if flipped:
                            box[:, [0, 2]] = width - 1 - box[:, [2, 0]]
            yield Batch(images, self.labels[chunk], chunk, boxes, masks)


class FolderDataset(Dataset):
    """Images of a wsolevaluation split (records from trainers.datasets.metadata) with their geometry.

    With a `cache`, each image is decoded and resized once per node (trainers/datasets/cache.py) and
    every read crops the kept image: the pixels of full decode + resize + crop + flip, exactly.
    """

    def __init__(self, root: str | Path, records: Sequence, *, train: bool, resize: int, crop: int, seed: int,
                 resize_mode: ResizeMode = "square", cache: ImageCache | None = None) -> None:
        self.root = Path(root)
        self.records = list(records)
        self.train, self.resize, self.crop, self.seed = train, resize, crop, seed
        self.resize_mode = resize_mode  # of training images; evaluation always resizes to crop x crop
        self.cache = cache
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        """The sample at a position, drawn for `self.epoch`, or at (epoch, position)."""
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        record = self.records[index]
        if self.cache is not None:
            image, geometry = self._cached(self.root / record.image_id, epoch, index)
        elif self.train:  # decoded at the detail the crop keeps, only the crop resampled (decode.py)
            image, geometry = decode_train_crop(self.root / record.image_id, self._train_draw(epoch, index))
        else:
            image = decode_rgb(self.root / record.image_id)
            geometry = eval_geometry(image.shape[2], image.shape[1], self.crop)
            image = apply_geometry(image, geometry)
        sample = {"image": image, "label": record.label, "index": index}
        if record.boxes:
            sample["boxes"] = geometry.map_boxes(np.array(record.boxes))
        if record.mask_paths:
            sample["mask"] = torch.from_numpy(self._mask(record, geometry))
        return sample

    def _train_draw(self, epoch: int, index: int) -> Callable[[int, int], Geometry]:
        """The train geometry of (epoch, position) for an image's (width, height): crop and flip drawn
        from their own seed, whichever path decodes the image."""
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return lambda width, height: train_geometry(width, height, self.resize, self.crop, generator, self.resize_mode)

    def _cached(self, path: Path, epoch: int, index: int):
        """(image, geometry) from the image resized once: train crops and flips it, eval takes it whole."""
        if not self.train:
            pixels, width, height = self.cache.resized(path, self.crop, "square")
            return torch.from_numpy(pixels), eval_geometry(width, height, self.crop)
        pixels, width, height = self.cache.resized(path, self.resize, self.resize_mode)
        geometry = self._train_draw(epoch, index)(width, height)
        return crop_and_flip(pixels, geometry.offset_x, geometry.offset_y, self.crop, geometry.flip), geometry

    def _mask(self, record, geometry) -> np.ndarray:
        """1 object (any instance), 255 ignored (ignore box minus objects), 0 background; as wsolevaluation."""
        import cv2

        def load(relative: str) -> np.ndarray:
            pixels = cv2.imread(str(self.root / relative), cv2.IMREAD_GRAYSCALE)
            if pixels is None:
                raise RuntimeError(f"{self.root / relative}: cannot read the mask")
            return map_mask(pixels, self.crop) > 0

        objects = np.any([load(p) for p in record.mask_paths], axis=0)
        ignored = load(record.ignore_path) & ~objects if record.ignore_path else np.zeros_like(objects)
        mask = objects.astype(np.uint8) + 255 * ignored.astype(np.uint8)
        return mask[:, ::-1].copy() if geometry.flip else mask


def collate(samples: list[dict]) -> Batch:
    boxes = [s["boxes"] for s in samples] if all("boxes" in s for s in samples) else None
    masks = torch.stack([s["mask"] for s in samples]) if all("mask" in s for s in samples) else None
    return Batch(torch.stack([s["image"] for s in samples]), torch.tensor([s["label"] for s in samples]),
                 torch.tensor([s["index"] for s in samples]), boxes, masks)


class _Positions(Sampler):
    """The (epoch, position) items of the current pass, set before each pass (read in this process)."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class FolderSource(SplitSource):
    """A split of image files; decoded and transformed in DataLoader worker processes.

    Training keeps its workers from one epoch to the next (each item carries its epoch, so they
    need nothing else from this process): no fork of the training process per epoch. Evaluation
    starts its workers for the pass only, as they would sit idle between validations.
    """

    def __init__(self, name: str, dataset: FolderDataset, workers: int, pin_memory: bool) -> None:
        self.name = name
        self.dataset = dataset
        self.workers, self.pin_memory = workers, pin_memory
        self._positions = _Positions()
        self._train_loader: DataLoader | None = None
        self.image_ids = [r.image_id for r in dataset.records]
        self.labels = torch.tensor([r.label for r in dataset.records], dtype=torch.long)
        self.has_boxes = all(r.boxes for r in dataset.records) and bool(dataset.records)
        self.has_masks = all(r.mask_paths for r in dataset.records) and bool(dataset.records)

    def batches(self, indices: Tensor, batch_size: int, *, train: bool, epoch: int, seed: int) -> Iterator[Batch]:
        items = [(epoch, index) for index in indices.tolist()]
        if not train:
            yield from DataLoader(self.dataset, batch_size=batch_size, sampler=items, num_workers=self.workers,
                                  collate_fn=collate, pin_memory=self.pin_memory)
            return
        if self._train_loader is None or self._train_loader.batch_size != batch_size:
            self._train_loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self._positions,
                                            num_workers=self.workers, collate_fn=collate, pin_memory=self.pin_memory,
                                            persistent_workers=self.workers > 0)
        self._positions.items = items
        yield from self._train_loader
