"""Image transforms of wsolevaluation, with the boxes and masks mapped through the same geometry.

Train: resize to a square of `resize` (aspect not kept, as wsolevaluation does), random crop of
`crop`, random horizontal flip. Eval: resize straight to `crop`. Boxes are inclusive pixel boxes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Geometry:
    """Where an original image lands in the network's input: resize, then crop offset, then flip."""

    width: int  # the original image's
    height: int
    resize: int  # resized to resize x resize first
    offset_x: int
    offset_y: int
    flip: bool
    size: int  # the output side

    def map_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """(k, 4) original-pixel boxes in the output frame, truncated as wsolevaluation's resize_bbox."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        # x * new_w / w in this order, truncated: exactly wsolevaluation's resize_bbox.
        x0, x1 = ((boxes[:, [0, 2]] * self.resize / self.width).astype(np.int64) - self.offset_x).T
        y0, y1 = ((boxes[:, [1, 3]] * self.resize / self.height).astype(np.int64) - self.offset_y).T
        if self.flip:
            x0, x1 = self.size - 1 - x1, self.size - 1 - x0
        mapped = np.stack([x0, y0, x1, y1], axis=1)
        return np.clip(mapped, 0, self.size - 1)


def eval_geometry(width: int, height: int, size: int) -> Geometry:
    """Resize straight to size x size: box coordinates scale as int(x * size / width)."""
    return Geometry(width, height, size, 0, 0, False, size)


def train_geometry(width: int, height: int, resize: int, crop: int, generator: torch.Generator) -> Geometry:
    """Resize to resize x resize, a random crop x crop window, a coin-flip horizontal flip."""
    offsets = torch.randint(0, resize - crop + 1, (2,), generator=generator)
    flip = bool(torch.rand((), generator=generator) < 0.5)
    return Geometry(width, height, resize, int(offsets[0]), int(offsets[1]), flip, crop)


def apply_geometry(image: Tensor, geometry: Geometry) -> Tensor:
    """A (3, H, W) uint8 image resized, cropped and flipped as `geometry` says."""
    from torchvision.transforms.v2.functional import resize  # torchvision takes ~2 s to import: only here

    out = resize(image, [geometry.resize, geometry.resize], antialias=True)
    if geometry.resize != geometry.size:
        top, left, size = geometry.offset_y, geometry.offset_x, geometry.size
        out = out[:, top:top + size, left:left + size]
    return out.flip(-1) if geometry.flip else out


def map_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A mask resized to size x size with nearest neighbours (wsolevaluation's cv2 INTER_NEAREST)."""
    import cv2

    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed that depends on nothing else: resumable and independent of workers."""
    return (seed * 1_000_003 + epoch * 9_176_483 + index * 2_654_435_761) % (2 ** 63 - 1)
