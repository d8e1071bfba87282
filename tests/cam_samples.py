"""Random and structured CAMs with ground-truth boxes, for the reference comparison and benchmarks."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("noise", "blobs", "ring", "border", "plateaus", "checkerboard", "salt", "constant", "zeros")


def _upsampled_noise(rng, height, width, resolution):
    low = torch.from_numpy(rng.standard_normal((1, 1, resolution, resolution)))
    return F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[0, 0].numpy()


def _blobs(rng, height, width, count, border=False):
    ys, xs = np.mgrid[0:height, 0:width]
    cam = np.zeros((height, width))
    for _ in range(count):
        cy = rng.choice([0, height - 1]) if border else rng.uniform(0, height)
        cx = rng.uniform(0, width)
        sy, sx = rng.uniform(0.05, 0.25) * height, rng.uniform(0.05, 0.25) * width
        cam += rng.uniform(0.3, 1.0) * np.exp(-((ys - cy) ** 2 / (2 * sy ** 2) + (xs - cx) ** 2 / (2 * sx ** 2)))
    return cam + 0.05 * _upsampled_noise(rng, height, width, 14)


def sample_cam(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One map in [0, 1] (min 0, max 1 unless constant) of the given kind."""
    if kind == "noise":
        cam = _upsampled_noise(rng, height, width, int(rng.choice([4, 7, 14, 28])))
    elif kind == "blobs":
        cam = _blobs(rng, height, width, int(rng.integers(1, 4)))
    elif kind == "border":
        cam = _blobs(rng, height, width, int(rng.integers(1, 3)), border=True)
    elif kind == "ring":
        ys, xs = np.mgrid[0:height, 0:width]
        radius = np.hypot(ys - rng.uniform(0.3, 0.7) * height, xs - rng.uniform(0.3, 0.7) * width)
        cam = np.exp(-((radius - rng.uniform(0.15, 0.3) * min(height, width)) ** 2) / (2 * (0.05 * height) ** 2))
    elif kind == "plateaus":  # few distinct levels: many thresholds share a binary map
        cam = np.round(_upsampled_noise(rng, height, width, 7) * 2) / 2
    elif kind == "checkerboard":  # equal-area contours: the largest-contour tie-break matters
        cell = int(rng.integers(2, 6))
        ys, xs = np.mgrid[0:height, 0:width]
        cam = (((ys // cell) + (xs // cell)) % 2).astype(float)
    elif kind == "salt":
        cam = (rng.random((height, width)) > 0.97).astype(float) * rng.random((height, width))
    elif kind == "constant":
        return np.ones((height, width), dtype=np.float32)
    elif kind == "zeros":
        return np.zeros((height, width), dtype=np.float32)
    else:
        raise ValueError(kind)
    cam = cam - cam.min()
    return (cam / cam.max() if cam.max() > 0 else cam).astype(np.float32)


def sample_boxes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One to three ground-truth boxes inside the frame, inclusive x0, y0, x1, y1."""
    boxes = []
    for _ in range(int(rng.integers(1, 4))):
        x0, x1 = np.sort(rng.integers(0, width, 2))
        y0, y1 = np.sort(rng.integers(0, height, 2))
        boxes.append([x0, y0, x1, y1])
    return np.array(boxes, dtype=np.int64)


def sample_cams(count: int, height: int = 224, width: int = 224, seed: int = 0, kinds=KINDS):
    """`count` CAMs cycling through `kinds`, with their ground-truth boxes."""
    rng = np.random.default_rng(seed)
    cams = np.stack([sample_cam(kinds[i % len(kinds)], rng, height, width) for i in range(count)])
    return cams, [sample_boxes(rng, height, width) for _ in range(count)]
