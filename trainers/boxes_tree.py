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
outside: a reconstruction by erosion from the edge, 4-connected). Each is one outermost component
of {cam >= v} with what is nested in its holes and the hole pixels between them, so the same pass
keeps them as a second, small forest over the first union-find's roots and the hole pixels (a hole
pixel joins it at its filled value, the union-find at its value), and counts the cells each pixel
completes in the filled map where the pixel joins it. OpenCV lists
outermost contours in reverse raster order of their first pixel, each before its holes, so of
equally large ones the last to start wins.

Of two *different* boxes with the same best IoU at one level, the one OpenCV lists first is the
per-image box of the predictions table. OpenCV's list is its contour tree in preorder, siblings in
reverse raster order of where their border starts, and a contour's outermost ancestor starts
before it: the last-starting outermost component of the tied ones comes first when every tied
nested component and hole starts before it, and at IoU 0 every contour ties, so it always does.
Other ties (between contours inside a hole) are handed back and traced with findContours
(trainers.boxes).

Per pixel, the union-find reads its eight neighbours from a state map into an 8-bit mask; tables
give the neighbours to look up (one of each group that touch each other, so mostly one `find` a
pixel) and the growth of the cell area; the current component's attributes stay in locals while
a level's consecutive pixels join it. Compiled with numba (cached on disk after the first call;
a few seconds once per machine); `tree_curve` is one call a CAM. Array indices in the loops are
cast to unsigned (`U`) where they index, and arrays are looped over by index: numba otherwise
emits a negative-index wraparound per access (the loops ran 1.2-2x slower).
"""
from __future__ import annotations

import numba
import numpy as np

_JIT = {"cache": True, "nogil": True}
# Indices in the hot loops are cast to unsigned where they index: numba then leaves out its
# negative-index wraparound (a compare and a branch an access; the loops run 1.2-2x faster).
U = np.uint64
# Pixels of one value are sorted tile by tile (raster order within a tile): consecutive pixels of a
# level then lie close together, mostly in one component (its attributes stay in locals) and in
# cached lines of the maps (16x16 tiles: the union-find 7% faster, 10-15% on CAMs with several blobs).
TILE = 16


@numba.njit(**_JIT)
def _find(parent: np.ndarray, node: int) -> int:
    root = node
    while parent[U(root)] != root:
        root = parent[U(root)]
    while parent[U(node)] != root:  # path compression
        following = parent[U(node)]
        parent[U(node)] = root
        node = following
    return root


@numba.njit(**_JIT)
def value_counts(image: np.ndarray) -> np.ndarray:
    """How many pixels of a uint8 map have each value (256,): np.bincount without its int64 copy.
    Four histograms of every fourth pixel, summed: neighbours often share a value, and one
    histogram would wait on its own last increment (1.8x)."""
    counts = np.zeros((4, 256), np.int64)
    flat = image.ravel()
    quarter = len(flat) // 4
    for position in range(quarter):
        at = 4 * position
        counts[0, U(flat[U(at)])] += 1
        counts[1, U(flat[U(at + 1)])] += 1
        counts[2, U(flat[U(at + 2)])] += 1
        counts[3, U(flat[U(at + 3)])] += 1
    for position in range(4 * quarter, len(flat)):
        counts[0, U(flat[U(position)])] += 1
    return counts[0] + counts[1] + counts[2] + counts[3]


@numba.njit(**_JIT)
def _sorted_pixels(image: np.ndarray, filled: np.ndarray, counts: np.ndarray):
    """Counting sorts (pixels as y << 16 | x; `counts` = value_counts(image)): every pixel by value,
    each value's pixels that are not hole pixels first (in TILE order) and then its hole pixels
    (filled > image); and the hole pixels by filled value. Returns the first (order), the values'
    starts (257,) and where their hole pixels start (256,), the second and its values' starts (257,)."""
    height, width = image.shape
    starts = np.zeros(257, np.int64)
    for value in range(256):
        starts[value + 1] = starts[value] + counts[value]
    front, back = starts[:256].copy(), starts[1:].copy()
    by_filled = np.zeros(257, np.int64)
    order = np.empty(height * width, np.int32)
    flat_image, flat_filled = image.ravel(), filled.ravel()
    for tile_y in range(0, height, TILE):  # tile by tile: see TILE
        for tile_x in range(0, width, TILE):
            for y in range(tile_y, min(tile_y + TILE, height)):
                row = y * width
                for x in range(tile_x, min(tile_x + TILE, width)):
                    value, top = U(flat_image[U(row + x)]), U(flat_filled[U(row + x)])
                    if top > value:
                        back[value] -= 1
                        order[U(back[value])] = y << 16 | x
                        by_filled[top + U(1)] += 1
                    else:
                        order[U(front[value])] = y << 16 | x
                        front[value] += 1
    for value in range(256):
        by_filled[value + 1] += by_filled[value]
    holes_by_filled = np.empty(by_filled[256], np.int32)
    slot = by_filled[:256].copy()
    for value in range(256):
        for position in range(back[value], starts[value + 1]):
            packed = order[U(position)]
            top = U(filled[U(packed >> 16), U(packed & 0xFFFF)])
            holes_by_filled[U(slot[top])] = packed
            slot[top] += 1
    return order, starts, back, holes_by_filled, by_filled


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


# The eight neighbours of a pixel, around it: NW, N, NE, E, SE, S, SW, W (dx, dy).
RING = ((-1, -1), (0, -1), (1, -1), (1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0))
# Root attributes, one row of int32 per root (one cache line a root instead of one per array).
LEFT, TOP, RIGHT, BOTTOM, FIRST, SIZE, AREA2 = range(7)


def _ring_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per set of added neighbours (a bit per RING position): one neighbour of each group of them
    that are 8-adjacent to each other (those are in one component already: one find a group instead
    of one a neighbour), and how much twice the cell area grows when the pixel joins them (each of
    its four cells with two of its other three corners in gets its third or fourth: +1/2 area)."""
    adjacent = [[i != j and max(abs(RING[i][0] - RING[j][0]), abs(RING[i][1] - RING[j][1])) == 1
                 for j in range(8)] for i in range(8)]
    cells = ((0, 1, 7), (1, 2, 3), (3, 4, 5), (5, 6, 7))  # the other corners of the four cells
    groups = np.zeros((256, 4), np.int64)
    n_groups = np.zeros(256, np.int64)
    area_gain = np.zeros(256, np.int32)
    for mask in range(256):
        unseen = {i for i in range(8) if mask >> i & 1}
        while unseen:
            seed = min(unseen)
            groups[mask, n_groups[mask]] = seed
            n_groups[mask] += 1
            stack = [seed]
            unseen.discard(seed)
            while stack:
                i = stack.pop()
                for j in [j for j in unseen if adjacent[i][j]]:
                    unseen.discard(j)
                    stack.append(j)
        area_gain[mask] = sum(sum(mask >> i & 1 for i in cell) >= 2 for cell in cells)
    return groups, n_groups, area_gain


GROUPS, N_GROUPS, AREA_GAIN = _ring_tables()


@numba.njit(**_JIT)
def _merge(forest, hole_area2, a: int, b: int) -> int:
    """Union of two roots of the filled map's forest: `a` goes under `b`, its hole cells with it."""
    forest[U(a)] = b
    hole_area2[U(b)] += hole_area2[U(a)]
    return b


@numba.njit(**_JIT)
def _join(parent, attrs, a: int, b: int) -> int:
    """Union of two roots (by size); the surviving root carries the box, first pixel and area."""
    keep, gone = (a, b) if attrs[a, SIZE] >= attrs[b, SIZE] else (b, a)
    parent[gone] = keep
    attrs[keep, SIZE] += attrs[gone, SIZE]
    attrs[keep, LEFT] = min(attrs[keep, LEFT], attrs[gone, LEFT])
    attrs[keep, TOP] = min(attrs[keep, TOP], attrs[gone, TOP])
    attrs[keep, RIGHT] = max(attrs[keep, RIGHT], attrs[gone, RIGHT])
    attrs[keep, BOTTOM] = max(attrs[keep, BOTTOM], attrs[gone, BOTTOM])
    attrs[keep, FIRST] = min(attrs[keep, FIRST], attrs[gone, FIRST])
    attrs[keep, AREA2] += attrs[gone, AREA2]
    return keep


@numba.njit(inline="always", **_JIT)
def _unpack(packed: int, padded: int):
    """y, x and the padded map's index of a pixel sorted as y << 16 | x."""
    y, x = packed >> 16, packed & 0xFFFF
    return y, x, (y + 1) * padded + x + 1


IN, OPEN = 1, 256  # a pixel's state: in {image >= v}; in {filled >= v} only (a hole pixel)


@numba.njit(inline="always", **_JIT)
def _ring(state, pixel: int, offsets) -> int:
    """The RING neighbours' states as two 8-bit masks in one number: bits 0-7 in, 8-15 open."""
    above, below = pixel + offsets[1], pixel + offsets[5]
    return (state[U(above - 1)] | state[U(above)] << 1 | state[U(above + 1)] << 2 | state[U(pixel + 1)] << 3
            | state[U(below + 1)] << 4 | state[U(below)] << 5 | state[U(below - 1)] << 6 | state[U(pixel - 1)] << 7)


@numba.njit(inline="always", **_JIT)
def _store(attrs, root: int, left: int, top: int, right: int, bottom: int, first: int, size: int, area2: int) -> None:
    at = U(root)
    attrs[at, LEFT], attrs[at, TOP], attrs[at, RIGHT], attrs[at, BOTTOM] = left, top, right, bottom
    attrs[at, FIRST], attrs[at, SIZE], attrs[at, AREA2] = first, size, area2


@numba.njit(inline="always", **_JIT)
def _load(attrs, root: int):
    """A root's row as _store takes it: left, top, right, bottom, first, size, area2."""
    at = U(root)
    return (attrs[at, LEFT], attrs[at, TOP], attrs[at, RIGHT], attrs[at, BOTTOM], attrs[at, FIRST],
            attrs[at, SIZE], attrs[at, AREA2])


@numba.njit(**_JIT)
def _add_level(parent, state, attrs, forest, open_at, candidates, n_candidates: int, pixels, width: int,
               offsets, hole: bool) -> int:
    """Add one level's pixels (sorted as y << 16 | x; all hole pixels or none) to the 8-connected
    union-find of {image >= v} over the padded map (`state`: IN or OPEN a pixel, two bytes, so that
    the neighbours are read from the cache; `offsets`: the RING neighbours' index steps); the roots
    they start go to `candidates`. Returns their new count and how many pixels have open neighbours.

    A pixel that is not a `hole` pixel joins {filled >= v} now too: it brings the cells it completes
    there to its component's area, and its open neighbours (`open_at[pixel]`, a RING mask) are left
    to _join_open to join with its group of the forest. A hole pixel is there already. (No forest
    joins in this loop: a call to them here, though rare, made numba compile it 1.6x slower.)

    Consecutive pixels of a level mostly join the same component: its attributes are kept in
    locals until another root comes (or a join, or the level's end), instead of seven
    read-modify-writes of its row a pixel (13% of the union-find's time)."""
    padded = width + 2
    cached = -1  # the root whose attributes are in the locals below
    left = top = right = bottom = first = size = area2 = 0
    touching = 0
    for position in range(len(pixels)):
        y, x, pixel = _unpack(pixels[U(position)], padded)
        ring = _ring(state, pixel, offsets)
        mask, open_mask = ring & 0xFF, ring >> 8
        state[U(pixel)] = IN
        root = -1
        for group in range(N_GROUPS[U(mask)]):
            other = _find(parent, pixel + offsets[U(GROUPS[U(mask), U(group)])])
            if root < 0:
                root = other
            elif other != root:
                if cached >= 0:
                    _store(attrs, cached, left, top, right, bottom, first, size, area2)
                    cached = -1
                root = _join(parent, attrs, root, other)
        if root < 0 or root != cached:
            if cached >= 0:
                _store(attrs, cached, left, top, right, bottom, first, size, area2)
            if root < 0:  # a new component
                root = pixel
                if not hole:  # (a hole pixel's node is in the forest already)
                    forest[U(pixel)] = pixel
                candidates[U(n_candidates)] = pixel
                n_candidates += 1
                left = right = x
                top = bottom = y
                first, size, area2 = y * width + x, 0, 0
            else:
                left, top, right, bottom, first, size, area2 = _load(attrs, root)
            cached = root
        parent[U(pixel)] = root
        left, right, top, bottom = min(left, x), max(right, x), min(top, y), max(bottom, y)
        first = min(first, y * width + x)
        size += 1
        if not hole:
            area2 += AREA_GAIN[U(mask | open_mask)]
            open_at[U(pixel)] = open_mask
            touching += open_mask != 0
    if cached >= 0:
        _store(attrs, cached, left, top, right, bottom, first, size, area2)
    return n_candidates, touching


@numba.njit(**_JIT)
def _join_open(parent, forest, hole_area2, open_at, pixels, offsets, padded: int) -> None:
    """Join the forest's group of each of `pixels` (sorted as y << 16 | x, just added) with those of its
    open neighbours, which are their own nodes."""
    for position in range(len(pixels)):
        pixel = _unpack(pixels[U(position)], padded)[2]
        open_mask = open_at[U(pixel)]
        if not open_mask:
            continue
        group = _find(forest, _find(parent, pixel))
        for index in range(N_GROUPS[U(open_mask)]):
            other = _find(forest, pixel + offsets[U(GROUPS[U(open_mask), U(index)])])
            if other != group:
                group = _merge(forest, hole_area2, group, other)


@numba.njit(**_JIT)
def _live_roots(parent, forest, hole_area2, candidates, n_candidates: int) -> int:
    """Keep the candidates that are still roots at the front; their count. The groups of those that
    were joined to another root are joined to that root's in the forest."""
    kept = 0
    for position in range(n_candidates):
        node = candidates[U(position)]
        if parent[U(node)] == node:
            candidates[U(kept)] = node
            kept += 1
            continue
        group, other = _find(forest, node), _find(forest, _find(parent, node))
        if group != other:
            _merge(forest, hole_area2, group, other)
    return kept


@numba.njit(inline="always", **_JIT)
def _open(parent, state, forest, hole_area2, pixel: int, offsets) -> None:
    """A hole pixel joins {filled >= v} at its filled value (it is not in {image >= v} yet): a node of
    the forest with the cells it completes, joined with its neighbours there (those in {image >= v}
    through their component's root)."""
    ring = _ring(state, pixel, offsets)
    mask, open_mask = ring & 0xFF, ring >> 8
    state[U(pixel)] = OPEN
    forest[U(pixel)] = pixel
    hole_area2[U(pixel)] = AREA_GAIN[U(mask | open_mask)]  # (0 before: never a root of the first union-find)
    group = pixel
    for index in range(N_GROUPS[U(mask)]):
        other = _find(forest, _find(parent, pixel + offsets[U(GROUPS[U(mask), U(index)])]))
        if other != group:
            group = _merge(forest, hole_area2, group, other)
    # open neighbours: their own nodes (the same loop as _join_open's; a shared helper called from
    # here, where this function is inlined into the main loop, made that loop 12% slower)
    for index in range(N_GROUPS[U(open_mask)]):
        other = _find(forest, pixel + offsets[U(GROUPS[U(open_mask), U(index)])])
        if other != group:
            group = _merge(forest, hole_area2, group, other)


@numba.njit(inline="always", **_JIT)
def _outermost(first: int, filled, value: int, width: int) -> bool:
    """Whether the component of {image >= value} whose first pixel (raster index) is `first` is
    outermost: the pixel above it is outside (filled = fill_holes(image) is below value there), not
    in a hole; on the top row it is outside."""
    return first < width or filled.flat[U(first - width)] < value


@numba.njit(**_JIT)
def _best_component(attrs, roots, filled, value: int, width: int, height: int, gt, box, ties):
    """The best IoU of a box of the components `roots` of {image >= value}; its box into `box`, and
    into `ties`: whether equally good boxes differ, the first pixel of the last-starting outermost
    component among them (-1: none; `filled` = fill_holes(image) tells: the pixel above an outermost
    component's first pixel is outside), and that of the last-starting nested one (-1: none).

    Of equally good boxes `box` is the lead's when there is one (OpenCV lists outermost contours in
    reverse raster order of their first pixel, each before what it encloses), else the first seen.
    """
    top_iou = -1.0
    differ = False
    lead_first = nested_first = -1
    lead_x0 = lead_y0 = lead_x1 = lead_y1 = 0
    for position in range(len(roots)):
        node = roots[U(position)]
        at = U(node)
        x0, y0 = attrs[at, LEFT], attrs[at, TOP]
        x1, y1 = min(attrs[at, RIGHT] + 1, width - 1), min(attrs[at, BOTTOM] + 1, height - 1)
        iou = _best_iou(x0, y0, x1, y1, gt)
        if iou < top_iou:
            continue
        start = attrs[at, FIRST]
        outermost = _outermost(start, filled, value, width)
        if iou > top_iou:  # a new best
            top_iou = iou
            box[0], box[1], box[2], box[3] = x0, y0, x1, y1
            differ = False
            lead_first = nested_first = -1
        else:
            differ = differ or x0 != box[0] or y0 != box[1] or x1 != box[2] or y1 != box[3]
        if not outermost:
            nested_first = max(nested_first, start)
        elif start > lead_first:
            lead_first = start
            lead_x0, lead_y0, lead_x1, lead_y1 = x0, y0, x1, y1
    if differ and lead_first >= 0:
        box[0], box[1], box[2], box[3] = lead_x0, lead_y0, lead_x1, lead_y1
    ties[0], ties[1], ties[2] = differ, lead_first, nested_first
    return top_iou


@numba.njit(**_JIT)
def _largest_filled(attrs, forest, hole_area2, roots, groups, group_area, filled, value: int, width: int,
                    height: int, box) -> None:
    """The box of the component of {filled >= v} with the largest cell area (into `box`), the last to
    start in raster order of equally large ones. Each holds one outermost component of
    {image >= v} (its box and first pixel) and what is nested in it; its cell area is its
    components' AREA2 and its group's hole cells. `groups`, `group_area`: scratch space."""
    for position in range(len(roots)):
        groups[U(position)] = group = _find(forest, roots[U(position)])
        group_area[U(group)] = hole_area2[U(group)]
    for position in range(len(roots)):
        group_area[U(groups[U(position)])] += attrs[U(roots[U(position)]), AREA2]
    top_area = top_first = -1
    for position in range(len(roots)):
        at = U(roots[U(position)])
        start = attrs[at, FIRST]
        if not _outermost(start, filled, value, width):
            continue
        area2 = group_area[U(groups[U(position)])]
        if area2 > top_area or (area2 == top_area and start > top_first):
            top_area, top_first = area2, start
            box[0], box[1] = attrs[at, LEFT], attrs[at, TOP]
            box[2], box[3] = min(attrs[at, RIGHT] + 1, width - 1), min(attrs[at, BOTTOM] + 1, height - 1)


@numba.njit(**_JIT)
def upper_components(image: np.ndarray, filled: np.ndarray, values: np.ndarray, gt: np.ndarray, sorted_pixels):
    """The 8-connected components of {image >= v} and of {filled >= v} (filled = fill_holes(image))
    for every v of `values` (ascending, each present), from one pass down the values
    (`sorted_pixels` = _sorted_pixels(image, filled, value_counts(image))).

    Per v: the best IoU of a component box of {image >= v} and that box, and what decides OpenCV's
    order of equally good different boxes (see _best_component); the box of the component of
    {filled >= v} with the largest cell area (V1) and its IoU.

    {filled >= v} is {image >= v} and the hole pixels with image < v <= filled. Its components are
    groups of those of {image >= v} (an outermost one and what is nested in its holes) with the hole
    pixels between them: a second forest over the first one's roots and the hole pixels, joined
    where the first joins and where a hole pixel touches the rest (a hole pixel enters it at its
    filled value, the first union-find at its value); the cells each pixel completes in
    {filled >= v} are counted where it enters.
    """
    height, width = image.shape
    order, starts, closing, hole_order, hole_starts = sorted_pixels
    # Union-finds over the map padded with a pixel that is never added on every side: no bounds to
    # check. A component's row of attributes is at its root's padded index; FIRST is a raster index.
    padded = width + 2
    size = (height + 2) * padded
    offsets = np.empty(8, np.int64)
    for step in range(8):
        offsets[step] = RING[step][1] * padded + RING[step][0]
    parent = np.empty(size, np.int32)
    state = np.zeros(size, np.uint16)
    attrs = np.empty((size, 8), np.int32)
    forest = np.empty(size, np.int32)  # the filled map's groups: over roots of `parent` and hole pixels
    hole_area2 = np.zeros(size, np.int32)  # per group root: twice the cell area its hole pixels completed
    candidates = np.empty(height * width, np.int32)  # every root made, dropped once merged
    groups = np.empty(height * width, np.int32)
    open_at = np.empty(size, np.uint8)  # per pixel: its open neighbours when it was added
    group_area = np.empty(size, np.int64)
    n_candidates = 0
    n_values = len(values)
    out_iou = np.zeros(n_values)
    out_box = np.zeros((n_values, 4), np.int64)
    out_ties = np.zeros((n_values, 3), np.int64)  # per level: boxes differ, lead's and nested's first pixel
    out_largest = np.zeros(n_values)
    out_largest_box = np.zeros((n_values, 4), np.int64)
    index = n_values - 1
    for value in range(255, -1, -1):
        if index < 0:
            break
        n_candidates, touching = _add_level(parent, state, attrs, forest, open_at, candidates, n_candidates,
                                            order[starts[value]:closing[value]], width, offsets, False)
        n_candidates = _add_level(parent, state, attrs, forest, open_at, candidates, n_candidates,
                                  order[closing[value]:starts[value + 1]], width, offsets, True)[0]  # hole pixels
        if touching:  # some of these pixels have open neighbours
            _join_open(parent, forest, hole_area2, open_at, order[starts[value]:closing[value]], offsets, padded)
        for position in range(hole_starts[value], hole_starts[value + 1]):
            _open(parent, state, forest, hole_area2, _unpack(hole_order[U(position)], padded)[2], offsets)
        if value != values[index]:
            continue
        n_candidates = _live_roots(parent, forest, hole_area2, candidates, n_candidates)
        roots = candidates[:n_candidates]
        out_iou[index] = _best_component(attrs, roots, filled, value, width, height, gt, out_box[index], out_ties[index])
        _largest_filled(attrs, forest, hole_area2, roots, groups, group_area, filled, value, width, height,
                        out_largest_box[index])
        box = out_largest_box[index]
        out_largest[index] = _best_iou(box[0], box[1], box[2], box[3], gt)
        index -= 1
    return out_iou, out_box, out_ties, out_largest, out_largest_box


@numba.njit(**_JIT)
def _add_holes(parent, attrs, candidates, n_candidates: int, pixels, width: int) -> int:
    """Add one level's hole pixels (sorted as y << 16 | x; never on the edge) to the 4-connected
    union-find of the holes (`parent` -1 where a pixel is not in); the roots they start go to
    `candidates`, whose new count is returned. As in _add_level, the current hole's attributes stay
    in locals while consecutive pixels join it."""
    cached = -1
    left = top = right = bottom = first = size = 0
    for position in range(len(pixels)):
        packed = pixels[U(position)]
        y, x = packed >> 16, packed & 0xFFFF
        pixel = y * width + x
        root = -1
        for neighbour in (pixel - width, pixel + width, pixel - 1, pixel + 1):
            linked = parent[U(neighbour)]
            if linked < 0 or linked == root:
                continue
            other = _find(parent, neighbour)
            if root < 0:
                root = other
            elif other != root:
                if cached >= 0:
                    _store(attrs, cached, left, top, right, bottom, first, size, 0)
                    cached = -1
                root = _join(parent, attrs, root, other)
        if root < 0 or root != cached:
            if cached >= 0:
                _store(attrs, cached, left, top, right, bottom, first, size, 0)
            if root < 0:  # a new hole
                root = pixel
                candidates[U(n_candidates)] = pixel
                n_candidates += 1
                left, top, right, bottom, first, size = x, y, x, y, pixel, 0
            else:
                left, top, right, bottom, first, size, _ = _load(attrs, root)
            cached = root
        parent[U(pixel)] = root
        left, right, top, bottom = min(left, x), max(right, x), min(top, y), max(bottom, y)
        first = min(first, pixel)
        size += 1
    if cached >= 0:
        _store(attrs, cached, left, top, right, bottom, first, size, 0)
    return n_candidates


@numba.njit(**_JIT)
def hole_components(image: np.ndarray, filled: np.ndarray, values: np.ndarray, gt: np.ndarray, sorted_pixels):
    """The holes of {image >= v} for every v of `values` (ascending): 4-connected regions of
    {image < v} off the image's edge. Per v: best IoU of a hole border's box (-1 without holes),
    that box, whether a hole with a different box has the same IoU, and the first pixel of the
    last-starting hole with that IoU.

    `filled` = fill_holes(image). A pixel is in a hole at level v exactly when image < v <= filled,
    and `filled` is the same over a hole (two pixels joined below v have the same lowest path to the
    edge), so the holes are the 4-connected components of the pixels with filled > image, each
    alive for image < v <= its filled value: a union-find over those pixels only (a few percent of a
    smooth CAM) instead of a min-tree over the whole map with the edge as one more node."""
    height, width = image.shape
    high = filled.ravel()
    count = height * width
    order, starts, closing, hole_pixels, _ = sorted_pixels
    parent = np.full(count, -1, np.int32)  # -1: not a hole pixel, or not in yet
    attrs = np.empty((count, 8), np.int32)  # (AREA2 is not used for holes)
    candidates = np.empty(max(len(hole_pixels), 1), np.int32)
    n_candidates = 0
    n_values = len(values)
    out_iou = np.full(n_values, -1.0)
    out_box = np.zeros((n_values, 4), np.int64)
    out_tied = np.zeros(n_values, np.bool_)
    out_last = np.full(n_values, -1, np.int64)  # the first pixel of the last-starting best hole
    added = 0  # every value below this one is in
    for index in range(n_values):
        while added < values[index]:
            n_candidates = _add_holes(parent, attrs, candidates, n_candidates,
                                      order[closing[added]:starts[added + 1]], width)  # its hole pixels
            added += 1
        value = values[index]
        kept = 0
        best = -1.0
        for position in range(n_candidates):
            node = candidates[U(position)]
            at = U(node)
            # merged into another root, or joined the outside below this level (for good: the
            # holes it could meet later would have its filled value too)
            if parent[at] != node or high[at] < value:
                continue
            candidates[U(kept)] = node
            kept += 1
            x0, y0 = attrs[at, LEFT] - 1, attrs[at, TOP] - 1
            x1, y1 = min(attrs[at, RIGHT] + 2, width - 1), min(attrs[at, BOTTOM] + 2, height - 1)
            iou = _best_iou(x0, y0, x1, y1, gt)
            if iou > best:
                best = iou
                out_tied[index] = False
                out_box[index, 0], out_box[index, 1], out_box[index, 2], out_box[index, 3] = x0, y0, x1, y1
                out_last[index] = attrs[at, FIRST]
                continue
            if iou < best:
                continue
            out_last[index] = max(out_last[index], attrs[at, FIRST])
            if x0 != out_box[index, 0] or y0 != out_box[index, 1] or x1 != out_box[index, 2] or y1 != out_box[index, 3]:
                out_tied[index] = True
        n_candidates = kept
        out_iou[index] = best
    return out_iou, out_box, out_tied, out_last


@numba.njit(**_JIT)
def fill_holes(image: np.ndarray) -> np.ndarray:
    """Per pixel, the lowest v at which it is not yet in the outside region of {image < v}, minus one:
    max(image, the lowest 'highest value' of a 4-connected path to the edge). {fill >= v} is
    {image >= v} with its holes filled.

    That is the reconstruction by erosion of the map from its edge (the edge keeps its values, the
    inside starts at 255 and comes down to max(image, its lowest neighbour) until nothing changes),
    computed as Vincent's hybrid (1993): a raster scan from the top left, one from the bottom right,
    then the pixels whose lower value has yet to reach a neighbour (few on smooth CAMs) lower what
    they reach in increasing order of value (half the time of a priority flood over every pixel)."""
    height, width = image.shape
    filled = image.copy()
    if height < 3 or width < 3:
        return filled  # every pixel is on the edge
    low, high = image.ravel(), filled.ravel()
    for y in range(1, height - 1):  # from the top left: the inside starts at 255, so min(above, left)
        left = high[U(y * width)]
        for pixel in range(y * width + 1, (y + 1) * width - 1):
            left = high[U(pixel)] = max(min(high[U(pixel - width)], left), low[U(pixel)])
    count = height * width
    queue = np.empty(count, np.int32)  # the pixels that can lower a raised neighbour
    size = 0
    for y in range(height - 2, 0, -1):  # from the bottom right, queueing what can lower a raised pixel
        right = high[U((y + 1) * width - 1)]
        right_raised = False
        for pixel in range((y + 1) * width - 2, y * width, -1):
            below = high[U(pixel + width)]
            value = max(min(high[U(pixel)], below, right), low[U(pixel)])
            high[U(pixel)] = value
            if (right_raised and right > value) or (below > low[U(pixel + width)] and below > value):
                queue[U(size)] = pixel
                size += 1
            right_raised = value > low[U(pixel)]
            right = value
    # The raised pixels come down in increasing order of value: a stack per value, of entries that
    # may be stale (the old entry of a pixel lowered since no longer matches its value). A pixel
    # taken out at its value is final and lowers each neighbour once at most (to its final value):
    # each pixel is lowered once (the FIFO queue this replaces lowered them 3.4 times on average).
    capacity = size + count
    entry_pixel = np.empty(capacity, np.int32)
    entry_next = np.empty(capacity, np.int32)
    heads = np.full(256, -1, np.int32)
    n_entries = 0
    lowest = 255
    for position in range(size):
        pixel = queue[U(position)]
        value = high[U(pixel)]
        lowest = min(lowest, value)
        entry_pixel[U(n_entries)], entry_next[U(n_entries)] = pixel, heads[U(value)]
        heads[U(value)] = n_entries
        n_entries += 1
    for level in range(lowest, 256):
        while heads[U(level)] >= 0:
            entry = heads[U(level)]
            heads[U(level)] = entry_next[U(entry)]
            pixel = entry_pixel[U(entry)]
            if high[U(pixel)] != level:
                continue  # stale
            for neighbour in (pixel - width, pixel + width, pixel - 1, pixel + 1):
                # (an edge pixel keeps its value, high == low: never lowered)
                at = U(neighbour)
                if high[at] > level and high[at] > low[at]:
                    value = max(level, low[at])
                    high[at] = value
                    entry_pixel[U(n_entries)], entry_next[U(n_entries)] = neighbour, heads[U(value)]
                    heads[U(value)] = n_entries
                    n_entries += 1
    return filled


@numba.njit(**_JIT)
def _level_boxes(image: np.ndarray, values: np.ndarray, gt: np.ndarray, counts: np.ndarray):
    filled = fill_holes(image)
    sorted_pixels = _sorted_pixels(image, filled, counts)
    iou, box, ties, largest_iou, largest_box = upper_components(image, filled, values, gt, sorted_pixels)
    hole_iou, hole_box, hole_tied, hole_last = hole_components(image, filled, values, gt, sorted_pixels)
    tied = np.zeros(len(values), np.bool_)
    for index in range(len(values)):
        differ, lead, nested = ties[index, 0] > 0, ties[index, 1], ties[index, 2]
        lead_first = lead >= 0 and nested < lead  # no nested best component comes before the lead
        if hole_iou[index] > iou[index]:
            iou[index] = hole_iou[index]
            box[index] = hole_box[index]
            tied[index] = hole_tied[index]
        elif hole_iou[index] == iou[index]:
            same_box = not differ and not hole_tied[index] and (hole_box[index] == box[index]).all()
            tied[index] = not same_box and not (lead_first and hole_last[index] < lead) and iou[index] > 0
        else:
            tied[index] = differ and not lead_first and iou[index] > 0
    return iou, box, largest_iou, tied, largest_box


@numba.njit(**_JIT)
def distinct_levels(image: np.ndarray, thresholds: np.ndarray):
    """The distinct non-empty binary maps of a uint8 CAM's curve as their lowest pixel value v
    (foreground = pixels >= v, ascending), and per threshold the index of its map (-1: the empty map).

    The protocol's foreground at threshold tau is pixels > int(tau * max); two cut-offs with no pixel
    value between them give the same map."""
    return _distinct_levels(value_counts(image), thresholds)


@numba.njit(**_JIT)
def _distinct_levels(counts: np.ndarray, thresholds: np.ndarray):
    """distinct_levels from the map's value_counts."""
    n_levels = 0
    key_of = np.zeros(256, np.int64)  # per cut-off c: how many levels are <= c; the map is the rest
    for value in range(256):
        n_levels += counts[value] > 0
        key_of[value] = n_levels
    levels = np.empty(n_levels, np.int64)
    top = 0
    for value in range(256):
        if counts[value]:
            levels[key_of[value] - 1] = value
            top = value
    used = np.zeros(n_levels + 1, np.bool_)
    keys = np.empty(len(thresholds), np.int64)
    for index in range(len(thresholds)):
        cutoff = int(thresholds[index] * top)
        keys[index] = 0 if cutoff < 0 else n_levels if cutoff > 255 else key_of[cutoff]
        used[keys[index]] = True
    rank = np.full(n_levels + 1, -1, np.int64)  # the empty map keeps -1
    n_values = 0
    for key in range(n_levels):
        if used[key]:
            rank[key] = n_values
            n_values += 1
    values = np.empty(n_values, np.int64)
    for key in range(n_levels):
        if used[key]:
            values[rank[key]] = levels[key]
    return values, rank[keys]


@numba.njit(**_JIT)
def tree_curve(image: np.ndarray, thresholds: np.ndarray, gt: np.ndarray, min_maps: int):
    """One uint8 CAM's curve at every threshold, in one call: its distinct maps (distinct_levels),
    then _level_boxes per distinct map.

    Returns the distinct maps' levels (ascending) and per threshold the index of its level (-1: the
    empty map); then, unless there are fewer than `min_maps` levels (then empty arrays): per
    threshold V2's IoU and box and V1's IoU, and per level whether OpenCV's order of equally good
    different boxes is left to the caller."""
    counts = value_counts(image)
    values, level_of = _distinct_levels(counts, thresholds)
    n_values = len(values)
    if n_values < min_maps:
        return values, level_of, np.empty(0), np.empty((0, 4), np.int64), np.empty(0), np.empty(0, np.bool_)
    iou, box, largest, tied, _ = _level_boxes(image, values, gt, counts)
    empty_iou = _best_iou(0, 0, 0, 0, gt)
    iou_all = np.full(len(thresholds), empty_iou)
    box_all = np.zeros((len(thresholds), 4), np.int64)
    iou_largest = np.full(len(thresholds), empty_iou)
    for index in range(len(thresholds)):
        level = level_of[index]
        if level >= 0:
            iou_all[index], box_all[index], iou_largest[index] = iou[level], box[level], largest[level]
    return values, level_of, iou_all, box_all, iou_largest, tied


def level_boxes(scoremap_u8: np.ndarray, values: np.ndarray, gt_boxes: np.ndarray):
    """Per distinct foreground level v (ascending, each a value of the map): V2's best IoU and box,
    V1's IoU, which levels need OpenCV to order two different boxes of equal IoU, and V1's box.

    Of equally good different boxes OpenCV returns the first it lists: its contour tree in preorder,
    siblings in reverse raster order of where their border starts (a component's first pixel, the
    pixel left of a hole's first). A contour's outermost ancestor starts before it, so the
    last-starting outermost component among the best (the lead) comes first when every nested one
    and every hole among them starts before the lead; when the best IoU is 0, every contour is among
    the best and so is the lead of them all. Other ties are handed back.
    """
    image = np.ascontiguousarray(scoremap_u8, dtype=np.uint8)
    if max(image.shape) >= 1 << 15:
        raise ValueError(f"CAM shape {image.shape}: sides up to 32767 pixels are allowed")
    values = np.ascontiguousarray(values, dtype=np.int64)
    gt = np.ascontiguousarray(gt_boxes, dtype=np.int64).reshape(-1, 4)
    return _level_boxes(image, values, gt, value_counts(image))


__all__ = ["distinct_levels", "fill_holes", "hole_components", "level_boxes", "tree_curve", "upper_components",
           "value_counts"]
