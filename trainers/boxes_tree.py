"""Contour-free box curves: every CAM threshold's contour boxes from union-find passes over one map.

wsolevaluation thresholds a uint8 CAM at `int(tau * max)` and runs OpenCV's findContours
(RETR_TREE) for every tau. The contours of a binary map are of two kinds, and neither needs tracing:

- the outer border of each 8-connected foreground component: its bounding rect is the component's
  bounding box;
- the border of each hole, a 4-connected background region that does not reach the image's edge
  (OpenCV pads the map with background): the border runs on the foreground pixels around the
  hole, so its bounding rect is the hole's bounding box grown by one pixel on every side.

Across the thresholds of one map, the foreground components are the nodes of a max-tree (pixels
added in decreasing value, 8-connected union-find) and the holes those of a min-tree (increasing
value, 4-connected) over the pixels the hole-filled map (`fill_holes`) raises, each hole alive up
to its filled value. One pass of each gives every level's boxes: MaxBoxAccV2's curve.

MaxBoxAcc (V1) keeps the contour of the largest `cv2.contourArea` (polygon area through the border
pixels' centres; the first in OpenCV's order on ties). A hole's border lies inside its component's
outer border, so the largest is always an outermost component's outer border, and its polygon
area is that of the component with its holes filled: counted over the unit cells between four
pixel centres, a cell with all four corners inside counts 1, with three 1/2, else 0. The filled
components of every level are those of `fill_holes(cam)` (the level at which a pixel joins the
outside: a reconstruction by erosion from the edge, 4-connected), one more max-tree pass, with the cell counts
as an attribute. OpenCV lists outermost contours in reverse raster order of their first pixel, each
before its holes, so of equally large ones the last to start wins.

The only thing not decided here is which of two *different* boxes with the same best IoU at one
level comes first in OpenCV's list (the per-image box of the predictions table): such levels,
rare on real CAMs, are handed back and traced with findContours (trainers.boxes).

Compiled with numba (cached on disk after the first call; a few seconds once per machine).
"""
from __future__ import annotations

import numba
import numpy as np

_JIT = {"cache": True, "nogil": True}


@numba.njit(**_JIT)
def _find(parent: np.ndarray, node: int) -> int:
    root = node
    while parent[root] != root:
        root = parent[root]
    while parent[node] != root:  # path compression
        following = parent[node]
        parent[node] = root
        node = following
    return root


@numba.njit(**_JIT)
def _by_value(flat: np.ndarray):
    """Pixel indices sorted by value (raster order within a value) and each value's start (257,)."""
    starts = np.zeros(257, np.int64)
    for value in flat:
        starts[value + 1] += 1
    for value in range(256):
        starts[value + 1] += starts[value]
    order = np.empty(len(flat), np.int64)
    fill = starts[:256].copy()
    for index in range(len(flat)):
        order[fill[flat[index]]] = index
        fill[flat[index]] += 1
    return order, starts


@numba.njit(**_JIT)
def _best_iou(x0: int, y0: int, x1: int, y1: int, gt: np.ndarray) -> float:
    """Max IoU of one box with the (k, 4) ground truth, exactly as trainers.boxes.box_iou computes it."""
    best = 0.0
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    for row in range(gt.shape[0]):
        gx0, gy0, gx1, gy1 = gt[row, 0], gt[row, 1], gt[row, 2], gt[row, 3]
        inter_w = max(0, min(x1, gx1) - max(x0, gx0) + 1)
        inter_h = max(0, min(y1, gy1) - max(y0, gy0) + 1)
        inter = inter_w * inter_h
        union = area + (gx1 - gx0 + 1) * (gy1 - gy0 + 1) - inter
        iou = 0.0 if union <= 0 else inter / union
        if iou > best:
            best = iou
    return best


@numba.njit(**_JIT)
def _join(parent, size, left, top, right, bottom, first, area2, a: int, b: int) -> int:
    """Union of two roots (by size); the surviving root carries the box, first pixel and area."""
    keep, gone = (a, b) if size[a] >= size[b] else (b, a)
    parent[gone] = keep
    size[keep] += size[gone]
    left[keep] = min(left[keep], left[gone])
    right[keep] = max(right[keep], right[gone])
    top[keep] = min(top[keep], top[gone])
    bottom[keep] = max(bottom[keep], bottom[gone])
    first[keep] = min(first[keep], first[gone])
    area2[keep] += area2[gone]
    return keep


@numba.njit(**_JIT)
def _add(parent, size, left, top, right, bottom, first, area2, pixel: int, root: int, x: int, y: int) -> bool:
    """Put a new pixel into the component `root` (-1: none yet, it starts its own). True if new."""
    if root < 0:
        parent[pixel] = pixel
        size[pixel] = 1
        left[pixel] = right[pixel] = x
        top[pixel] = bottom[pixel] = y
        first[pixel] = pixel
        area2[pixel] = 0
        return True
    parent[pixel] = root
    size[root] += 1
    left[root] = min(left[root], x)
    right[root] = max(right[root], x)
    top[root] = min(top[root], y)
    bottom[root] = max(bottom[root], y)
    first[root] = min(first[root], pixel)
    return False


@numba.njit(**_JIT)
def upper_components(image: np.ndarray, filled: np.ndarray, values: np.ndarray, gt: np.ndarray, best: bool,
                     largest: bool):
    """The 8-connected components of {image >= v} for every v of `values` (ascending, each present).

    Per v: with `best`, the best IoU of a component's box and its box, the first in OpenCV's order
    of equally good different boxes when they are all outermost components (`filled` =
    fill_holes(image) tells: the pixel above an outermost component's first pixel is outside), else
    a flag for the caller to trace that level; with `largest`, the IoU of the box of the component
    with the largest cell area, the last to start in raster order of equally large ones, and that box.
    """
    height, width = image.shape
    flat = image.ravel()
    count = height * width
    order, starts = _by_value(flat)
    parent = np.full(count, -1, np.int32)  # -1: not added yet
    size = np.empty(count, np.int32)
    left = np.empty(count, np.int32)
    top = np.empty(count, np.int32)
    right = np.empty(count, np.int32)
    bottom = np.empty(count, np.int32)
    first = np.empty(count, np.int32)  # the component's first pixel in raster order
    area2 = np.empty(count, np.int32)  # twice the cell area (largest=True)
    cell_w = max(width - 1, 0)
    corners = np.zeros(max(height - 1, 0) * cell_w, np.uint8)
    candidates = np.empty(count, np.int32)  # every root made, dropped once merged
    offsets = np.array([-width - 1, -width, -width + 1, -1, 1, width - 1, width, width + 1], np.int64)
    n_candidates = 0
    n_values = len(values)
    out_iou = np.zeros(n_values)
    out_box = np.zeros((n_values, 4), np.int64)
    out_tied = np.zeros(n_values, np.bool_)
    out_largest = np.zeros(n_values)
    out_largest_box = np.zeros((n_values, 4), np.int64)
    index = n_values - 1
    for value in range(255, -1, -1):
        if index < 0:
            break
        for position in range(starts[value], starts[value + 1]):
            pixel = order[position]
            y = pixel // width
            x = pixel - y * width
            root = -1
            if 0 < y < height - 1 and 0 < x < width - 1:  # inside: eight neighbours, no bounds to check
                for step in range(8):
                    neighbour = pixel + offsets[step]
                    linked = parent[neighbour]
                    if linked < 0 or linked == root:  # not added yet, or already in this component
                        continue
                    other = _find(parent, neighbour)
                    if root < 0:
                        root = other
                    elif other != root:
                        root = _join(parent, size, left, top, right, bottom, first, area2, root, other)
            else:
                for ny in range(max(y - 1, 0), min(y + 2, height)):
                    row = ny * width
                    for nx in range(max(x - 1, 0), min(x + 2, width)):
                        if parent[row + nx] < 0:  # not added yet (the pixel itself included)
                            continue
                        other = _find(parent, row + nx)
                        if root < 0:
                            root = other
                        elif other != root:
                            root = _join(parent, size, left, top, right, bottom, first, area2, root, other)
            if _add(parent, size, left, top, right, bottom, first, area2, pixel, root, x, y):
                root = pixel
                candidates[n_candidates] = pixel
                n_candidates += 1
            if largest:  # the cells this pixel is a corner of: a third corner adds 1/2, the fourth 1/2
                for cy in range(max(y - 1, 0), min(y + 1, height - 1)):
                    for cx in range(max(x - 1, 0), min(x + 1, width - 1)):
                        cell = cy * cell_w + cx
                        corners[cell] += 1
                        if corners[cell] >= 3:
                            area2[root] += 1
        if value != values[index]:
            continue
        kept = 0
        top_iou = -1.0
        differ = nested = False
        lead_first = -1
        lead_x0 = lead_y0 = lead_x1 = lead_y1 = 0
        top_area = -1
        top_first = -1
        for position in range(n_candidates):
            node = candidates[position]
            if parent[node] != node:
                continue
            candidates[kept] = node
            kept += 1
            x0, y0 = left[node], top[node]
            x1, y1 = min(right[node] + 1, width - 1), min(bottom[node] + 1, height - 1)
            if largest and (area2[node] > top_area or (area2[node] == top_area and first[node] > top_first)):
                top_area, top_first = area2[node], first[node]
                out_largest_box[index, 0], out_largest_box[index, 1] = x0, y0
                out_largest_box[index, 2], out_largest_box[index, 3] = x1, y1
            if not best:
                continue
            iou = _best_iou(x0, y0, x1, y1, gt)
            if iou < top_iou:
                continue
            start = first[node]
            outermost = start < width or filled.flat[start - width] < value
            if iou > top_iou:  # a new best: the first box seen, and the outermost one to list first
                top_iou = iou
                out_box[index, 0], out_box[index, 1], out_box[index, 2], out_box[index, 3] = x0, y0, x1, y1
                differ, nested = False, not outermost
                lead_first = start if outermost else -1
                lead_x0, lead_y0, lead_x1, lead_y1 = x0, y0, x1, y1
                continue
            differ = differ or x0 != out_box[index, 0] or y0 != out_box[index, 1] \
                or x1 != out_box[index, 2] or y1 != out_box[index, 3]
            if not outermost:
                nested = True
            elif start > lead_first:  # OpenCV lists outermost contours in reverse raster order
                lead_first = start
                lead_x0, lead_y0, lead_x1, lead_y1 = x0, y0, x1, y1
        if best and differ:
            if nested:
                out_tied[index] = True
            else:
                out_box[index, 0], out_box[index, 1], out_box[index, 2], out_box[index, 3] = \
                    lead_x0, lead_y0, lead_x1, lead_y1
        n_candidates = kept
        out_iou[index] = top_iou
        if largest:
            box = out_largest_box[index]
            out_largest[index] = _best_iou(box[0], box[1], box[2], box[3], gt)
        index -= 1
    return out_iou, out_box, out_tied, out_largest, out_largest_box


@numba.njit(**_JIT)
def hole_components(image: np.ndarray, filled: np.ndarray, values: np.ndarray, gt: np.ndarray):
    """The holes of {image >= v} for every v of `values` (ascending): 4-connected regions of
    {image < v} off the image's edge. Per v: best IoU of a hole border's box (-1 without holes),
    that box, and whether a hole with a different box has the same IoU.

    `filled` = fill_holes(image). A pixel is in a hole at level v exactly when image < v <= filled,
    and `filled` is the same over a hole (two pixels joined below v have the same lowest path to the
    edge), so the holes are the 4-connected components of the pixels with filled > image, each
    alive for image < v <= its filled value: a union-find over those pixels only (a few percent of a
    smooth CAM) instead of a min-tree over the whole map with the edge as one more node."""
    height, width = image.shape
    flat = image.ravel()
    high = filled.ravel()
    count = height * width
    starts = np.zeros(257, np.int64)
    for pixel in range(count):  # a counting sort of the hole pixels by value, raster order within one
        if high[pixel] > flat[pixel]:
            starts[flat[pixel] + 1] += 1
    for value in range(256):
        starts[value + 1] += starts[value]
    order = np.empty(starts[256], np.int64)
    slot = starts[:256].copy()
    for pixel in range(count):
        if high[pixel] > flat[pixel]:
            order[slot[flat[pixel]]] = pixel
            slot[flat[pixel]] += 1
    parent = np.full(count, -1, np.int32)  # -1: not a hole pixel, or not in yet
    size = np.empty(count, np.int32)
    left = np.empty(count, np.int32)
    top = np.empty(count, np.int32)
    right = np.empty(count, np.int32)
    bottom = np.empty(count, np.int32)
    unused = np.empty(count, np.int32)  # first pixel and area: not needed for holes
    candidates = np.empty(max(len(order), 1), np.int32)
    offsets = np.array([-width, width, -1, 1], np.int64)
    n_candidates = 0
    n_values = len(values)
    out_iou = np.full(n_values, -1.0)
    out_box = np.zeros((n_values, 4), np.int64)
    out_tied = np.zeros(n_values, np.bool_)
    added = 0  # every value below this one is in
    for index in range(n_values):
        while added < values[index]:
            for position in range(starts[added], starts[added + 1]):
                pixel = order[position]  # never on the edge (filled = image there): four neighbours
                y = pixel // width
                x = pixel - y * width
                root = -1
                for step in range(4):
                    neighbour = pixel + offsets[step]
                    linked = parent[neighbour]
                    if linked < 0 or linked == root:
                        continue
                    other = _find(parent, neighbour)
                    if root < 0:
                        root = other
                    elif other != root:
                        root = _join(parent, size, left, top, right, bottom, unused, unused, root, other)
                if _add(parent, size, left, top, right, bottom, unused, unused, pixel, root, x, y):
                    candidates[n_candidates] = pixel
                    n_candidates += 1
            added += 1
        value = values[index]
        kept = 0
        best = -1.0
        for position in range(n_candidates):
            node = candidates[position]
            # merged into another root, or joined the outside below this level (for good: the
            # holes it could meet later would have its filled value too)
            if parent[node] != node or high[node] < value:
                continue
            candidates[kept] = node
            kept += 1
            x0, y0 = left[node] - 1, top[node] - 1
            x1, y1 = min(right[node] + 2, width - 1), min(bottom[node] + 2, height - 1)
            iou = _best_iou(x0, y0, x1, y1, gt)
            if iou > best:
                best = iou
                out_tied[index] = False
                out_box[index, 0], out_box[index, 1], out_box[index, 2], out_box[index, 3] = x0, y0, x1, y1
            elif iou == best and (x0 != out_box[index, 0] or y0 != out_box[index, 1]
                                  or x1 != out_box[index, 2] or y1 != out_box[index, 3]):
                out_tied[index] = True
        n_candidates = kept
        out_iou[index] = best
    return out_iou, out_box, out_tied


@numba.njit(**_JIT)
def fill_holes(image: np.ndarray) -> np.ndarray:
    """Per pixel, the lowest v at which it is not yet in the outside region of {image < v}, minus one:
    max(image, the lowest 'highest value' of a 4-connected path to the edge). {fill >= v} is
    {image >= v} with its holes filled.

    That is the reconstruction by erosion of the map from its edge (the edge keeps its values, the
    inside starts at 255 and comes down to max(image, its lowest neighbour) until nothing changes),
    computed as Vincent's hybrid (1993): a raster scan from the top left, one from the bottom right,
    and a queue for the pixels whose lower value has yet to reach a neighbour (few on smooth CAMs;
    half the time of a priority flood over every pixel)."""
    height, width = image.shape
    filled = image.copy()
    if height < 3 or width < 3:
        return filled  # every pixel is on the edge
    filled[1:-1, 1:-1] = 255
    for y in range(1, height - 1):
        for x in range(1, width - 1):
            filled[y, x] = max(image[y, x], min(filled[y, x], filled[y - 1, x], filled[y, x - 1]))
    count = height * width
    queue = np.empty(count, np.int64)  # a ring of pixels, each in it at most once (queued)
    queued = np.zeros((height, width), np.bool_)
    head = size = 0
    for y in range(height - 2, 0, -1):
        for x in range(width - 2, 0, -1):
            value = max(image[y, x], min(filled[y, x], filled[y + 1, x], filled[y, x + 1]))
            filled[y, x] = value
            below, after = filled[y + 1, x], filled[y, x + 1]
            if (below > value and below > image[y + 1, x]) or (after > value and after > image[y, x + 1]):
                queue[size] = y * width + x
                size += 1
                queued[y, x] = True
    while size:
        pixel = queue[head]
        head = head + 1 if head + 1 < count else 0
        size -= 1
        y = pixel // width
        x = pixel - y * width
        queued[y, x] = False
        value = filled[y, x]
        for step in range(4):
            ny = y + (-1, 1, 0, 0)[step]
            nx = x + (0, 0, -1, 1)[step]
            if ny <= 0 or ny >= height - 1 or nx <= 0 or nx >= width - 1:
                continue  # the edge keeps its values
            if filled[ny, nx] > value and filled[ny, nx] > image[ny, nx]:
                filled[ny, nx] = max(value, image[ny, nx])
                if not queued[ny, nx]:
                    queued[ny, nx] = True
                    queue[(head + size) % count] = ny * width + nx
                    size += 1
    return filled


def level_boxes(scoremap_u8: np.ndarray, values: np.ndarray, gt_boxes: np.ndarray):
    """Per distinct foreground level v (ascending, each a value of the map): V2's best IoU and box,
    V1's IoU, and which levels need OpenCV to order two different boxes of equal IoU."""
    image = np.ascontiguousarray(scoremap_u8, dtype=np.uint8)
    values = np.ascontiguousarray(values, dtype=np.int64)
    gt = np.ascontiguousarray(gt_boxes, dtype=np.int64).reshape(-1, 4)
    filled = fill_holes(image)
    if np.array_equal(filled, image):  # no level has a hole: one pass gives V2 and V1
        iou, box, tied, largest_iou, _ = upper_components(image, filled, values, gt, True, True)
        return iou, box, largest_iou, tied
    iou, box, tied, _, _ = upper_components(image, filled, values, gt, True, False)
    largest_iou = upper_components(filled, filled, values, gt, False, True)[3]
    hole_iou, hole_box, hole_tied = hole_components(image, filled, values, gt)
    holes_win = hole_iou > iou
    equal = hole_iou == iou
    tied = np.where(holes_win, hole_tied, tied | (equal & (hole_tied | (hole_box != box).any(axis=1))))
    return np.maximum(iou, hole_iou), np.where(holes_win[:, None], hole_box, box), largest_iou, tied


__all__ = ["fill_holes", "hole_components", "level_boxes", "upper_components"]
