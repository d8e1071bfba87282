"""Localization metrics of CAMs: the wsolevaluation box and mask protocols, and the HaS paper's.

- MaxBoxAcc / MaxBoxAccV2 (Choe et al. 2020): best CAM threshold of the box-accuracy curve.
- GT-known loc / top-1 loc (Singh & Lee 2017): one fixed threshold, largest connected component.
- PxAP: pixel average precision pooled over the split, ignore pixels excluded.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch

from trainers.boxes import box_curves, box_iou, cam_thresholds, largest_component_boxes

IOU_THRESHOLDS = (0.3, 0.5, 0.7)  # MaxBoxAccV2 averages the three
PAPER_LOC_FRACTION = 0.2  # HaS / CAM: 20 % of the CAM's maximum (AlexNet-GAP; 0.3 for GoogLeNet-GAP)
PAPER_IOU = 0.5  # GT-known loc, top-1 loc and MaxBoxAcc (V1)


def quantize_cams(cams, name: str = "cams") -> np.ndarray:
    """(N, H, W) uint8 maps, int(cam * 255) as the protocol binarises them; CAMs must lie in [0, 1]."""
    if isinstance(cams, torch.Tensor):
        values = cams.detach()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        low, high = (float(v) for v in torch.aminmax(values)) if values.numel() else (0.0, 0.0)
    else:
        values = np.asarray(cams)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if values.ndim != 3:
        raise ValueError(f"{name}: shape {tuple(values.shape)} is not (N, H, W)")
    if not (0.0 <= low and high <= 1.0):  # also false for NaN
        raise ValueError(f"{name}: values must lie in [0, 1] (min-max normalised CAMs); got min {low}, max {high}")
    if isinstance(values, torch.Tensor):
        return (values * 255).to(torch.uint8).cpu().numpy()
    return (values * 255).astype(np.uint8)


def check_gt_boxes(gt_boxes: Sequence, count: int, name: str = "gt_boxes") -> list[np.ndarray]:
    """Each image's ground-truth boxes as a (k, 4) int64 array x0, y0, x1, y1 (inclusive, k >= 1)."""
    if len(gt_boxes) != count:
        raise ValueError(f"{name}: {len(gt_boxes)} box lists for {count} CAMs; one (k, 4) list per CAM")
    checked = []
    for index, boxes in enumerate(gt_boxes):
        array = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
        if array.shape == (4,):
            array = array[None]
        if array.ndim != 2 or array.shape[1] != 4 or len(array) == 0:
            raise ValueError(f"{name}[{index}]: shape {array.shape} is not (k, 4) with k >= 1 boxes x0, y0, x1, y1")
        if not np.issubdtype(array.dtype, np.integer):
            if not np.issubdtype(array.dtype, np.number) or not np.array_equal(array, np.round(array)):
                raise ValueError(f"{name}[{index}]: {array.tolist()} are not integer pixel coordinates")
        array = array.astype(np.int64)
        if (array < 0).any() or (array[:, 2] < array[:, 0]).any() or (array[:, 3] < array[:, 1]).any():
            raise ValueError(f"{name}[{index}]: {array.tolist()} is not x0, y0, x1, y1 with 0 <= x0 <= x1, 0 <= y0 <= y1")
        checked.append(array)
    return checked


class BoxCurves:
    """Box curves of many images, in this process or in `workers` processes (spawned once, reused)."""

    def __init__(self, thresholds: np.ndarray, workers: int = 1) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: {workers!r} is not allowed; an int >= 1 (1 = this process)")
        self.thresholds = thresholds
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, maps: np.ndarray, gt_boxes: list[np.ndarray]):
        """(iou_all (N, T), box_all (N, T, 4), iou_largest (N, T)) for uint8 maps (N, H, W)."""
        if self.workers == 1 or len(maps) < 2 * self.workers:
            return box_curves(maps, gt_boxes, self.thresholds)
        if self._pool is None:  # spawned workers import trainers.boxes: numpy and OpenCV, no torch
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
        bounds = np.linspace(0, len(maps), self.workers * 4 + 1).astype(int)
        jobs = [self._pool.submit(box_curves, maps[a:b], gt_boxes[a:b], self.thresholds)
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        parts = [job.result() for job in jobs]
        return tuple(np.concatenate(column) for column in zip(*parts))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def max_box_acc(
    cams,
    gt_boxes: Sequence,
    *,
    interval: float = 0.01,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
    multi_contour: bool = True,
    workers: int = 1,
) -> dict:
    """{iou_threshold: MaxBoxAcc in percent, ..., "best_threshold": {iou_threshold: CAM threshold}}.

    `cams` (N, H, W) in [0, 1]; `gt_boxes` one (k, 4) integer array per CAM in its pixel frame.
    multi_contour=True is MaxBoxAccV2's box search (every contour), False is MaxBoxAcc's (largest).
    """
    maps = quantize_cams(cams)
    boxes = check_gt_boxes(gt_boxes, len(maps))
    deltas = _check_iou_thresholds(iou_thresholds)
    thresholds = cam_thresholds(interval)
    runner = BoxCurves(thresholds, workers)
    try:
        iou_all, _, iou_largest = runner(maps, boxes)
    finally:
        runner.close()
    return summarize_curves(iou_all if multi_contour else iou_largest, thresholds, deltas)


def summarize_curves(ious: np.ndarray, thresholds: np.ndarray, deltas: Sequence[float]) -> dict:
    """MaxBoxAcc per IoU threshold (percent) and its best CAM threshold, from (N, T) best IoUs."""
    result: dict = {}
    best: dict[float, float] = {}
    for delta in deltas:
        accuracy = (ious >= delta).sum(axis=0).astype(np.float64) * 100.0 / float(len(ious))
        result[delta] = float(accuracy.max())
        best[delta] = float(thresholds[int(np.argmax(accuracy))])  # the lowest of equally good thresholds
    result["best_threshold"] = best
    return result


def _check_iou_thresholds(iou_thresholds: Sequence[float]) -> tuple[float, ...]:
    deltas = tuple(float(d) for d in iou_thresholds)
    if not deltas or any(not 0 < d <= 1 for d in deltas):
        raise ValueError(f"iou_thresholds: {tuple(iou_thresholds)!r} is not allowed; values in (0, 1], e.g. (0.3, 0.5, 0.7)")
    return deltas


def fixed_threshold_boxes(cams, fraction: float = PAPER_LOC_FRACTION) -> np.ndarray:
    """(N, 4) box of the largest connected region of cam > fraction * max (the HaS/CAM protocol)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"loc_fraction: {fraction!r} is not allowed; a fraction of the CAM maximum in [0, 1)")
    if isinstance(cams, torch.Tensor):
        foreground = (cams > fraction * cams.amax(dim=(1, 2), keepdim=True)).cpu().numpy()
    else:
        cams = np.asarray(cams)
        foreground = cams > fraction * cams.max(axis=(1, 2), keepdims=True)
    return largest_component_boxes(foreground)


class PixelHistogram:
    """Histograms of CAM scores at object and background pixels, pooled over a split (PxAP)."""

    def __init__(self, thresholds: np.ndarray) -> None:
        # Bins [0, t1), ..., [t_last, 1), [1, 2), [2, 3] as the protocol sets them.
        self.edges = np.append(thresholds, [1.0, 2.0, 3.0])
        self.object = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.background = np.zeros(len(self.edges) - 1, dtype=np.int64)

    def update(self, cams: torch.Tensor, masks: torch.Tensor) -> None:
        """Add (N, H, W) CAMs in [0, 1] at masks of 1 (object), 0 (background), 255 (ignored)."""
        edges = torch.as_tensor(self.edges, dtype=torch.float64, device=cams.device)
        # float64 on both sides compares exactly as np.histogram does with float64 edges.
        bins = torch.bucketize(cams.detach().double(), edges, right=True) - 1
        masks = masks.to(cams.device)
        size = len(self.object)
        self.object += torch.bincount(bins[masks == 1], minlength=size).cpu().numpy()
        self.background += torch.bincount(bins[masks == 0], minlength=size).cpu().numpy()

    def merge(self, other: PixelHistogram) -> None:
        self.object += other.object
        self.background += other.background

    def average_precision(self, split: str = "") -> float:
        """Area under the pixel precision-recall curve, in percent."""
        tp = self.object[::-1].cumsum().astype(np.float64)
        fp = self.background[::-1].cumsum().astype(np.float64)
        if tp[-1] <= 0:
            raise ValueError(f"pxap: the masks of split {split!r} have no object pixel; PxAP needs some")
        predicted = tp + fp
        precision = tp / np.where(predicted > 0, predicted, 1)  # where 0, recall does not move either
        recall = tp / tp[-1]
        return float((precision[1:] * np.diff(recall))[predicted[1:] != 0].sum() * 100)


def pxap(cams, masks, *, interval: float = 0.01) -> float:
    """PxAP in percent of (N, H, W) CAMs against masks of 1 (object), 0 (background), 255 (ignored)."""
    cams = torch.as_tensor(cams)
    masks = torch.as_tensor(masks)
    quantize_cams(cams)  # the same range check as the box metrics
    if masks.shape != cams.shape:
        raise ValueError(f"masks: shape {tuple(masks.shape)} does not match the CAMs {tuple(cams.shape)}")
    histogram = PixelHistogram(cam_thresholds(interval))
    histogram.update(cams, masks)
    return histogram.average_precision()


def center_gaussian_cams(count: int, size: int) -> torch.Tensor:
    """(count, size, size) isotropic Gaussian maps centred in the image: Choe et al.'s center baseline.

    Every threshold gives one centred box; MaxBoxAcc of these maps is what knowing nothing but
    "objects tend to be in the middle" achieves.
    """
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    squared = axis[None, :] ** 2 + axis[:, None] ** 2
    cam = torch.exp(-squared / (2 * (size / 4) ** 2))
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    return cam.expand(count, size, size).contiguous()


__all__ = [
    "IOU_THRESHOLDS", "PAPER_IOU", "PAPER_LOC_FRACTION", "BoxCurves", "PixelHistogram", "box_iou",
    "center_gaussian_cams", "check_gt_boxes", "fixed_threshold_boxes", "max_box_acc", "pxap", "quantize_cams",
    "summarize_curves",
]
