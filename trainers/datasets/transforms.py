"""Image transforms of wsolevaluation, with the boxes and masks mapped through the same geometry.

Train: resize to a square of `resize` (aspect not kept, as wsolevaluation does) or, with mode
'shorter_side', the shorter side to `resize` keeping the aspect ratio (the HaS authors' Torch loader);
then a random crop of `crop`, a random horizontal flip. Eval: resize straight to `crop` (wsolevaluation)
whatever the train mode. Boxes are inclusive pixel boxes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Geometry:
    """Where an original image lands in the network's input: resize, then crop offset, then flip."""

    width: int  # the original image's
    height: int
    resize_width: int  # resized to resize_width x resize_height first
    resize_height: int
    offset_x: int
    offset_y: int
    flip: bool
    size: int  # the output side

    def map_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """(k, 4) original-pixel boxes in the output frame, truncated as wsolevaluation's resize_bbox."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        # x * new_w / w in this order, truncated: exactly wsolevaluation's resize_bbox.
        x0, x1 = ((boxes[:, [0, 2]] * self.resize_width / self.width).astype(np.int64) - self.offset_x).T
        y0, y1 = ((boxes[:, [1, 3]] * self.resize_height / self.height).astype(np.int64) - self.offset_y).T
        if self.flip:
            x0, x1 = self.size - 1 - x1, self.size - 1 - x0
        mapped = np.stack([x0, y0, x1, y1], axis=1)
        return np.clip(mapped, 0, self.size - 1)


def eval_geometry(width: int, height: int, size: int) -> Geometry:
    """Resize straight to size x size: box coordinates scale as int(x * size / width)."""
    return Geometry(width, height, size, size, 0, 0, False, size)


ResizeMode = Literal["square", "shorter_side"]


def resized_size(width: int, height: int, resize: int, mode: ResizeMode = "square") -> tuple[int, int]:
    """(width, height) after the train resize: resize x resize, or the shorter side to `resize` and the
    longer one scaled with it, truncated (torchvision's Resize(int), Torch7's image.scale)."""
    if mode == "square":
        return resize, resize
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def train_geometry(width: int, height: int, resize: int, crop: int, generator: torch.Generator,
                   mode: ResizeMode = "square") -> Geometry:
    """Resize (`resized_size`), a random crop x crop window, a coin-flip horizontal flip."""
    resize_width, resize_height = resized_size(width, height, resize, mode)
    offset_x = int(torch.randint(0, resize_width - crop + 1, (1,), generator=generator))
    offset_y = int(torch.randint(0, resize_height - crop + 1, (1,), generator=generator))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    return Geometry(width, height, resize_width, resize_height, offset_x, offset_y, flip, crop)


def resize_image(image: Tensor, width: int, height: int) -> Tensor:
    """A (3, H, W) uint8 image resized to (3, height, width): torchvision's bilinear, antialiased."""
    from torchvision.transforms.v2.functional import resize  # torchvision takes ~2 s to import: only here

    return resize(image, [height, width], antialias=True)


def apply_geometry(image: Tensor, geometry: Geometry) -> Tensor:
    """A (3, H, W) uint8 image resized, cropped and flipped as `geometry` says."""
    out = resize_image(image, geometry.resize_width, geometry.resize_height)
    if (geometry.resize_width, geometry.resize_height) != (geometry.size, geometry.size):
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
