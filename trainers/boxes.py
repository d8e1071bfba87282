"""Boxes from CAMs: the wsolevaluation contour protocol at every threshold of a CAM's curve.

The published evaluator thresholds the uint8 CAM at `int(tau * max)` for every tau of the curve
(100 or 1000 of them) and runs OpenCV's findContours each time. A uint8 map has at most 256
distinct values, and two cut-offs with no pixel value between them give the same binary map and
so the same boxes (`distinct_maps`). The boxes of all those maps come from union-find passes over
the CAM (trainers.boxes_tree, the default), or from findContours once per distinct map
(`traced_level_boxes`, on the smallest window that holds its foreground). Both are identical to
the published protocol (tests/test_localize_reference.py, tests/test_boxes_tree.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from trainers.boxes_tree import distinct_levels, tree_curve

EMPTY_BOX = np.zeros(4, dtype=np.int64)  # the protocol's box when a map has no contour


def box_iou(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """(n, k) IoU of x0, y0, x1, y1 boxes with inclusive pixel coordinates; empty unions give 0."""
    a = np.asarray(boxes, dtype=np.int64).reshape(-1, 1, 4)
    b = np.asarray(gt_boxes, dtype=np.int64).reshape(1, -1, 4)
    inter_w = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    inter_h = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    degenerate = union <= 0
    return np.where(degenerate, 0.0, inter / np.where(degenerate, 1, union))


def cam_thresholds(interval: float) -> np.ndarray:
    """The CAM thresholds of the curve, exactly as the protocol builds them: np.arange(0, 1, interval)."""
    if not 0 < interval < 1:
        raise ValueError(f"interval: {interval!r} is not allowed; a step in (0, 1), e.g. 0.01 or 0.001")
    return np.arange(0, 1, interval)


@dataclass(frozen=True)
class BoxCurve:
    """One image's boxes at every CAM threshold of the curve."""

    iou_all: np.ndarray  # (T,) float64 best IoU over all contours (MaxBoxAccV2)
    box_all: np.ndarray  # (T, 4) int64 the contour box that reaches iou_all (first one on ties)
    iou_largest: np.ndarray  # (T,) float64 IoU of the largest contour's box (MaxBoxAcc)


# Below this many distinct binary maps, findContours per map costs less than the tree's nearly
# fixed passes (224 px CAMs, 2026-12-06: the tree ~1.1 ms a CAM, findContours ~30 us a map; a CAM
# of 7-14 maps 0.5-0.6 ms traced, 0.8-1.0 ms in the tree).
TREE_FROM_MAPS = 30


def box_curve(scoremap_u8: np.ndarray, gt_boxes: np.ndarray, thresholds: np.ndarray,
              method: str = "auto") -> BoxCurve:
    """Boxes and IoUs of one uint8 CAM at every threshold; `gt_boxes` is (k, 4) in the CAM's frame.

    method "tree": the contour-free union-find passes of trainers.boxes_tree (levels where two
    different boxes tie for the best IoU inside a hole are traced, for OpenCV's order); "traced":
    findContours once per distinct binary map; "auto": tree from TREE_FROM_MAPS distinct maps on.
    All give the protocol's numbers and boxes exactly.
    """
    if scoremap_u8.dtype != np.uint8:
        raise ValueError(f"scoremap dtype {scoremap_u8.dtype}: a uint8 CAM is expected (trainers.localize.quantize_cams)")
    gt_boxes = np.asarray(gt_boxes, dtype=np.int64).reshape(-1, 4)
    if method not in ("auto", "tree", "traced"):
        raise ValueError(f"method: {method!r} is not allowed; 'auto', 'tree' or 'traced'")
    image = np.ascontiguousarray(scoremap_u8)
    thresholds = np.ascontiguousarray(thresholds, dtype=np.float64)
    if method == "traced":
        values, level_of = distinct_levels(image, thresholds)
    else:
        if max(image.shape) >= 1 << 15:  # the tree sorts pixels as y << 16 | x
            raise ValueError(f"CAM shape {image.shape}: sides up to 32767 pixels are allowed")
        values, level_of, iou_all, box_all, iou_largest, tied = tree_curve(
            image, thresholds, gt_boxes, TREE_FROM_MAPS if method == "auto" else 0)
        if len(iou_all) == len(thresholds):
            if tied.any():  # OpenCV's order decides: trace those levels
                traced = np.zeros((len(values), 4), dtype=np.int64)
                traced[tied] = traced_level_boxes(image, values[tied], gt_boxes)[1]
                redo = (level_of >= 0) & tied[level_of]
                box_all[redo] = traced[level_of[redo]]
            return BoxCurve(iou_all, box_all, iou_largest)
    # findContours once per distinct map (auto: too few maps for the tree's fixed cost)
    iou_all, iou_largest = np.empty(len(values) + 1), np.empty(len(values) + 1)  # + the empty map, last
    box_all = np.tile(EMPTY_BOX, (len(values) + 1, 1))
    iou_all[-1] = iou_largest[-1] = box_iou(EMPTY_BOX, gt_boxes).max()
    if len(values):
        iou_all[:-1], box_all[:-1], iou_largest[:-1] = traced_level_boxes(image, values, gt_boxes)
    return BoxCurve(iou_all[level_of], box_all[level_of], iou_largest[level_of])  # -1: the empty map


def distinct_maps(scoremap_u8: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct non-empty binary maps of the curve as their lowest pixel value v (foreground =
    pixels >= v, ascending), and per threshold the index of its map (len(values): the empty map).

    The protocol's foreground at threshold tau is pixels > int(tau * max); two cut-offs with no
    pixel value between them give the same map (trainers.boxes_tree.distinct_levels).
    """
    values, level_of = distinct_levels(np.ascontiguousarray(scoremap_u8), np.asarray(thresholds, dtype=np.float64))
    return values, np.where(level_of < 0, len(values), level_of)


def traced_level_boxes(scoremap_u8: np.ndarray, values: np.ndarray, gt_boxes: np.ndarray):
    """Per level v of `values` (ascending, each a pixel value): the best IoU of a contour box of
    {map >= v} and that box (the first in OpenCV's order on ties), and the largest contour's IoU.

    findContours runs once per level, on the smallest window that holds its foreground.
    """
    height, width = scoremap_u8.shape
    y0, y1 = _span_of_values(scoremap_u8.max(axis=1), values)
    x0, x1 = _span_of_values(scoremap_u8.max(axis=0), values)
    # A window one pixel wider than the foreground: the scan order, and so the contours and their
    # order, are those of the whole map, shifted by the window's origin.
    y0, x0 = np.maximum(y0 - 1, 0), np.maximum(x0 - 1, 0)
    y1, x1 = np.minimum(y1 + 2, height), np.minimum(x1 + 2, width)

    contours: list[np.ndarray] = []
    counts = []
    for value, top, bottom, left, right in zip(values.tolist(), y0.tolist(), y1.tolist(), x0.tolist(), x1.tolist()):
        window = (scoremap_u8[top:bottom, left:right] >= value).view(np.uint8)
        found = cv2.findContours(window, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        contours.extend(found)
        counts.append(len(found))  # >= 1: every level is a pixel value, so its map is not empty
    counts = np.array(counts, dtype=np.int64)
    origins = np.stack([x0, y0], axis=1)
    n_maps = len(values)
    iou_all, iou_largest = np.zeros(n_maps), np.zeros(n_maps)
    box_all = np.tile(EMPTY_BOX, (n_maps, 1))
    _contour_results(contours, counts, origins, gt_boxes, width, height, iou_all, box_all, iou_largest)
    return iou_all, box_all, iou_largest


def box_curves(maps: np.ndarray, gt_boxes: list[np.ndarray], thresholds: np.ndarray, method: str = "auto"):
    """(iou_all (N, T), box_all (N, T, 4), iou_largest (N, T)) of uint8 maps (N, H, W)."""
    curves = [box_curve(m, g, thresholds, method) for m, g in zip(maps, gt_boxes)]
    return (np.stack([c.iou_all for c in curves]), np.stack([c.box_all for c in curves]),
            np.stack([c.iou_largest for c in curves]))


def _span_of_values(line_max: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each value v: first and last index i with line_max[i] >= v (v <= line_max.max())."""
    first = np.full(257, len(line_max), dtype=np.int64)
    last = np.full(257, -1, dtype=np.int64)
    index = np.arange(len(line_max))
    np.minimum.at(first, line_max, index)
    np.maximum.at(last, line_max, index)
    # Lines reaching v are those whose max is >= v: a suffix minimum / maximum over the values.
    first = np.minimum.accumulate(first[::-1])[::-1]
    last = np.maximum.accumulate(last[::-1])[::-1]
    return first[values], last[values]


def _contour_results(contours, counts, origins, gt_boxes, width, height, iou_all, box_all, iou_largest) -> None:
    """Fill the per-map results of the maps that have contours, in one vectorised pass."""
    lengths = np.array(list(map(len, contours)), dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    points = np.concatenate(contours).reshape(-1, 2)  # int32; products stay far below 2**31
    xs, ys = points[:, 0], points[:, 1]

    # Bounding rect of each contour, then the protocol's box: x0, y0, x + w, y + h clipped to W-1, H-1.
    has = counts > 0
    contour_origin = np.repeat(origins[has], counts[has], axis=0)
    x_min = np.minimum.reduceat(xs, starts) + contour_origin[:, 0]
    y_min = np.minimum.reduceat(ys, starts) + contour_origin[:, 1]
    x_end = np.minimum(np.maximum.reduceat(xs, starts) + 1 + contour_origin[:, 0], width - 1)
    y_end = np.minimum(np.maximum.reduceat(ys, starts) + 1 + contour_origin[:, 1], height - 1)
    boxes = np.stack([x_min, y_min, x_end, y_end], axis=1)
    best_iou = box_iou(boxes, gt_boxes).max(axis=1)  # (n_contours,)

    # Twice the polygon area (shoelace), as cv2.contourArea measures it: exact in integers.
    following = np.arange(1, len(xs) + 1)
    following[starts + lengths - 1] = starts
    twice_area = np.abs(np.add.reduceat((xs * ys[following] - xs[following] * ys).astype(np.int64), starts))

    group_starts = np.concatenate(([0], np.cumsum(counts[has])[:-1]))
    group_of = np.repeat(np.arange(len(group_starts)), counts[has])
    order = np.arange(len(boxes))
    best_in_group = np.maximum.reduceat(best_iou, group_starts)
    first_best = np.minimum.reduceat(np.where(best_iou == best_in_group[group_of], order, len(order)), group_starts)
    largest_area = np.maximum.reduceat(twice_area, group_starts)
    first_largest = np.minimum.reduceat(np.where(twice_area == largest_area[group_of], order, len(order)), group_starts)

    iou_all[has] = best_in_group
    box_all[has] = boxes[first_best]
    iou_largest[has] = best_iou[first_largest]


def largest_component_boxes(foreground: np.ndarray) -> np.ndarray:
    """(N, 4) inclusive box of the largest 8-connected region of each (N, H, W) bool map; none: 0,0,0,0.

    Of equally large regions, the one whose first pixel comes first in raster order.
    """
    boxes = np.zeros((len(foreground), 4), dtype=np.int64)
    for index, mask in enumerate(foreground):
        count, labels, stats, _ = cv2.connectedComponentsWithStats(
            np.ascontiguousarray(mask).view(np.uint8), connectivity=8
        )
        if count == 1:
            continue  # nothing above the threshold
        areas = stats[1:, cv2.CC_STAT_AREA]
        tied = 1 + np.flatnonzero(areas == areas.max())
        # OpenCV's label order is its own; of equally large regions take the first in raster order.
        label = tied[0] if len(tied) == 1 else labels.ravel()[np.flatnonzero(np.isin(labels.ravel(), tied))[0]]
        x, y, w, h, _ = stats[label]
        boxes[index] = (x, y, x + w - 1, y + h - 1)
    return boxes
