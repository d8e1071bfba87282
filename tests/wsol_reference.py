"""Slow, obviously-correct reference of the wsolevaluation metrics, written from the protocol.

One OpenCV threshold + findContours per image per CAM threshold, exactly as the published
evaluator does it; the project's fast implementation must give identical numbers.
"""
from __future__ import annotations

import cv2
import numpy as np


def reference_iou(box: list[int], gt: list[int]) -> float:
    """IoU with inclusive pixel coordinates (+1), degenerate unions count as 0."""
    ix = max(0, min(box[2], gt[2]) - max(box[0], gt[0]) + 1)
    iy = max(0, min(box[3], gt[3]) - max(box[1], gt[1]) + 1)
    inter = ix * iy
    union = (box[2] - box[0] + 1) * (box[3] - box[1] + 1) + (gt[2] - gt[0] + 1) * (gt[3] - gt[1] + 1) - inter
    return 0.0 if union <= 0 else inter / union


def reference_boxes(scoremap: np.ndarray, threshold: float, multi_contour: bool) -> list[list[int]]:
    """Boxes of the contours of the uint8 map thresholded at int(threshold * max)."""
    return reference_boxes_u8((scoremap * 255).astype(np.uint8), threshold, multi_contour)


def reference_boxes_u8(image: np.ndarray, threshold: float, multi_contour: bool) -> list[list[int]]:
    """The same from a map already in uint8, in OpenCV's contour order."""
    height, width = image.shape
    _, binary = cv2.threshold(image, int(threshold * np.max(image)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return [[0, 0, 0, 0]]
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return boxes


def reference_curve_u8(image: np.ndarray, gts, thresholds):
    """Per threshold: the best IoU of any contour box, that box (the first in OpenCV's order of the
    equally good ones), and the IoU of the largest contour's box."""
    gts = [[int(v) for v in gt] for gt in np.asarray(gts).reshape(-1, 4)]
    iou_all, box_all, iou_largest = [], [], []
    for threshold in thresholds:
        boxes = reference_boxes_u8(image, threshold, True)
        ious = [max(reference_iou(box, gt) for gt in gts) for box in boxes]
        best = max(ious)
        iou_all.append(best)
        box_all.append(boxes[ious.index(best)])
        largest = reference_boxes_u8(image, threshold, False)[0]
        iou_largest.append(max(reference_iou(largest, gt) for gt in gts))
    return iou_all, box_all, iou_largest


def reference_best_ious(cam, gts, interval=0.01, multi_contour=True) -> list[float]:
    """The best IoU of the image's boxes with any ground-truth box, at each CAM threshold."""
    gts = [[int(v) for v in gt] for gt in np.asarray(gts).reshape(-1, 4)]
    return [
        max(reference_iou(box, gt) for box in reference_boxes(np.asarray(cam), threshold, multi_contour) for gt in gts)
        for threshold in np.arange(0, 1, interval)
    ]


def reference_max_box_acc(cams, gt_boxes, interval=0.01, iou_thresholds=(0.3, 0.5, 0.7), multi_contour=True):
    """{iou_threshold: MaxBoxAcc in percent} over the CAM thresholds np.arange(0, 1, interval)."""
    correct = {delta: np.zeros(len(np.arange(0, 1, interval))) for delta in iou_thresholds}
    for cam, gts in zip(cams, gt_boxes):
        for t_index, best in enumerate(reference_best_ious(cam, gts, interval, multi_contour)):
            for delta in iou_thresholds:
                if best >= delta:
                    correct[delta][t_index] += 1
    return {delta: float((correct[delta] * 100.0 / len(cams)).max()) for delta in iou_thresholds}


def reference_pxap(cams, masks, interval=0.01) -> float:
    """Pixel average precision x 100; masks hold 1 (object), 0 (background), 255 (ignored)."""
    edges = np.append(np.arange(0, 1, interval), [1.0, 2.0, 3.0])
    true_hist = np.zeros(len(edges) - 1)
    false_hist = np.zeros(len(edges) - 1)
    for cam, mask in zip(cams, masks):
        cam, mask = np.asarray(cam), np.asarray(mask)
        true_hist += np.histogram(cam[mask == 1], bins=edges)[0]
        false_hist += np.histogram(cam[mask == 0], bins=edges)[0]
    tp = true_hist[::-1].cumsum()
    fn = true_hist.sum() - tp
    fp = false_hist[::-1].cumsum()
    nonzero = (tp + fp) != 0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return float((precision[1:] * np.diff(recall))[nonzero[1:]].sum() * 100)


def reference_fixed_threshold_box(cam: np.ndarray, fraction: float) -> list[int]:
    """Inclusive box around the largest 8-connected region of cam > fraction * max (BFS, no OpenCV)."""
    foreground = cam > fraction * cam.max()
    height, width = foreground.shape
    seen = np.zeros_like(foreground)
    best: list[tuple[int, int]] = []
    for y in range(height):
        for x in range(width):
            if not foreground[y, x] or seen[y, x]:
                continue
            region, stack = [], [(y, x)]
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                region.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < height and 0 <= nx < width and foreground[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
            if len(region) > len(best):
                best = region
    if not best:
        return [0, 0, 0, 0]
    ys, xs = zip(*best)
    return [min(xs), min(ys), max(xs), max(ys)]
