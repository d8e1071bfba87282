"""The contour-free box curves give the published protocol's IoUs and boxes at every threshold.

Each case is checked threshold by threshold against tests/wsol_reference.py (OpenCV's threshold and
findContours per threshold, as wsolevaluation), on realistic CAMs and on maps built to break a
union-find: plateaus, one-pixel lines, diagonal-only links, nested holes, maps touching the border,
single pixels, ties between different boxes.
"""
import cv2
import numpy as np
import pytest

from cam_samples import sample_boxes, sample_cams
from trainers.boxes import box_curve, cam_thresholds, distinct_maps
from trainers.boxes_tree import fill_holes, level_boxes
from trainers.localize import quantize_cams
from wsol_reference import reference_boxes_u8, reference_curve_u8

ADVERSARIAL = ("noise", "lines", "diagonal", "nested", "border", "sparse", "mirrored")


def adversarial_map(kind: str, rng: np.random.Generator) -> np.ndarray:
    height, width = (int(v) for v in rng.integers(1, 25, 2))
    top = int(rng.choice([1, 2, 3, 7, 255]))
    image = np.zeros((height, width), dtype=np.int64)
    if kind == "noise":  # plateaus of a few values, every connectivity case
        image = rng.integers(0, top + 1, (height, width))
    elif kind == "lines":  # one-pixel lines: horizontal, vertical, diagonal
        for _ in range(int(rng.integers(1, 6))):
            y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
            dy, dx = [(0, 1), (1, 0), (1, 1), (1, -1)][int(rng.integers(0, 4))]
            value = int(rng.integers(1, top + 1))
            while 0 <= y < height and 0 <= x < width and rng.random() < 0.9:
                image[y, x] = value
                y, x = y + dy, x + dx
    elif kind == "diagonal":  # pixels linked only through their corners
        ys, xs = np.mgrid[0:height, 0:width]
        image = ((ys + xs) % 2 == 0) * rng.integers(1, top + 1, (height, width))
        image[rng.random((height, width)) < 0.2] = 0
    elif kind == "nested":  # rings inside holes inside rings
        ys, xs = np.mgrid[0:height, 0:width]
        ring = np.minimum(np.minimum(ys, height - 1 - ys), np.minimum(xs, width - 1 - xs))
        values = rng.integers(0, top + 1, int(ring.max()) + 1)
        values[1::2] = 0
        image = values[ring]
    elif kind == "border":  # blocks on the edges
        for _ in range(int(rng.integers(1, 5))):
            y0, x0 = int(rng.integers(0, height)), int(rng.choice([0, max(width - 3, 0)]))
            image[y0:y0 + int(rng.integers(1, 6)), x0:x0 + 3] = int(rng.integers(1, top + 1))
    elif kind == "sparse":  # isolated pixels: contours of area 0, order decides the largest
        image[rng.random((height, width)) < 0.15] = rng.integers(1, top + 1)
    elif kind == "mirrored":  # a map and its mirror image: equal IoUs of different boxes
        half = rng.integers(0, top + 1, (height, max(width // 2, 1))) * (rng.random((height, max(width // 2, 1))) < 0.4)
        image = np.concatenate([half, half[:, ::-1]], axis=1)
    return image.astype(np.uint8)


def check_against_reference(image, gt, thresholds):
    curve = box_curve(image, gt, thresholds, method="tree")
    iou_all, box_all, iou_largest = reference_curve_u8(image, gt, thresholds)
    assert curve.iou_all.tolist() == iou_all
    assert curve.box_all.tolist() == box_all
    assert curve.iou_largest.tolist() == iou_largest


@pytest.mark.parametrize("kind", ADVERSARIAL)
def test_adversarial_maps_match_the_reference_at_every_threshold(kind):
    rng = np.random.default_rng(ADVERSARIAL.index(kind))
    thresholds = cam_thresholds(0.01)
    for case in range(60):
        image = adversarial_map(kind, rng)
        gt = sample_boxes(rng, *image.shape)
        if kind == "mirrored":  # a box centred on the mirror line: the two halves tie
            height, width = image.shape
            gt = np.array([[width // 2 - 1 - case % 3, 0, width - width // 2 + case % 3, height - 1]]).clip(0, max(width - 1, 0))
        check_against_reference(image, gt, thresholds)


def test_realistic_cams_match_the_reference_at_one_thousandth():
    cams, gts = sample_cams(27, 48, 48, seed=11)
    thresholds = cam_thresholds(0.001)
    for image, gt in zip(quantize_cams(cams), gts):
        check_against_reference(image, gt, thresholds)


def test_full_size_cams_match_the_traced_contours():
    # 224 x 224 at every threshold is slow for the per-threshold reference; the traced method runs
    # findContours once per distinct map and is itself checked against the reference.
    cams, gts = sample_cams(18, 224, 224, seed=12)
    thresholds = cam_thresholds(0.001)
    for image, gt in zip(quantize_cams(cams), gts):
        tree, traced = box_curve(image, gt, thresholds, method="tree"), box_curve(image, gt, thresholds, method="traced")
        assert tree.iou_all.tolist() == traced.iou_all.tolist()
        assert tree.box_all.tolist() == traced.box_all.tolist()
        assert tree.iou_largest.tolist() == traced.iou_largest.tolist()


def test_fill_holes_by_hand():
    # A ring of 5 around a 0 centre, on a background of 1: the centre reaches the edge only over
    # the ring (its fill is 5); the 2 inside the ring is raised to 5 too; the rest keeps its value.
    image = np.array([
        [1, 1, 1, 1, 1],
        [1, 5, 5, 5, 1],
        [1, 5, 0, 5, 1],
        [1, 5, 2, 5, 3],
        [1, 5, 5, 5, 1],
    ], dtype=np.uint8)
    filled = image.copy()
    filled[2:4, 2] = 5
    assert fill_holes(image).tolist() == filled.tolist()
    # Diagonal gaps do not let the background out (it is 4-connected): a diamond of 9 keeps its 0.
    diamond = np.zeros((5, 5), dtype=np.uint8)
    for y, x in [(1, 2), (2, 1), (2, 3), (3, 2)]:
        diamond[y, x] = 9
    assert fill_holes(diamond)[2, 2] == 9


def cell_area(inside: np.ndarray) -> float:
    """Unit cells between four pixel centres: 1 with all four corners inside, 1/2 with three."""
    corners = inside[:-1, :-1].astype(int) + inside[1:, :-1] + inside[:-1, 1:] + inside[1:, 1:]
    return float((corners == 4).sum() + 0.5 * (corners == 3).sum())


def test_largest_component_is_opencvs_largest_contour():
    # The cell area of the component with its holes filled is cv2.contourArea's polygon area of its
    # outer border; the box of the largest (the last in raster order on ties) is OpenCV's choice.
    rng = np.random.default_rng(13)
    single = 0
    for kind in ADVERSARIAL * 20:
        binary = (adversarial_map(kind, rng) > 0).astype(np.uint8)
        if not binary.any():
            continue
        contours, hierarchy = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2:]
        outer = [c for c, h in zip(contours, hierarchy[0]) if h[3] < 0]
        if len(outer) == 1:
            single += 1
            assert cv2.contourArea(outer[0]) == cell_area(fill_holes(binary) > 0), kind
        box = level_boxes(binary, np.array([1]), np.zeros((1, 4), dtype=np.int64))[4]
        assert box[0].tolist() == reference_boxes_u8(binary, 0.0, multi_contour=False)[0], kind
    assert single > 20


def test_largest_filled_component_at_every_level_is_opencvs_largest_contour():
    # V1's box level by level, on maps whose levels have holes with components nested in them: the
    # filled map's components are built level by level from the components and the hole pixels.
    ring = np.zeros((12, 24), dtype=np.uint8)
    ring[1:9, 1:9] = 3
    ring[2:8, 2:8] = 0  # a one-pixel ring: its own cells are 2, its filled area 49
    ring[4:6, 4:6] = 5  # nested in its hole
    ring[2:7, 14:19] = 3  # a block of 16 cells: larger than the ring's pixels, not its filled area
    rng = np.random.default_rng(17)
    maps = [ring] + [adversarial_map(kind, rng) for kind in ("nested", "noise", "diagonal", "lines") * 30]
    checked = 0
    for image in maps:
        values = np.unique(image[image > 0]).astype(np.int64)
        if not len(values):
            continue
        largest = level_boxes(image, values, np.zeros((1, 4), dtype=np.int64))[4]
        for value, box in zip(values, largest):
            binary = (image >= value).astype(np.uint8)
            assert box.tolist() == reference_boxes_u8(binary, 0.0, multi_contour=False)[0], (image.tolist(), value)
            checked += 1
    assert level_boxes(ring, np.array([3, 5]), np.zeros((1, 4), dtype=np.int64))[4].tolist() == [[1, 1, 9, 9], [4, 4, 6, 6]]
    assert checked > 300


def test_tied_boxes_are_ordered_as_opencv_lists_them():
    # Two equal blocks, mirror images of each other; the ground truth overlaps each protocol box
    # ([1, 2, 4, 5] and [8, 2, 11, 5]) by 2 x 3 pixels: equal IoUs, different boxes. OpenCV lists
    # outer contours in reverse raster order of their first pixel: the right-hand block comes first,
    # decided without tracing.
    image = np.zeros((8, 12), dtype=np.uint8)
    image[2:5, 1:4] = 200
    image[2:5, 8:11] = 200
    gt = np.array([[3, 2, 9, 4]])
    values, _ = distinct_maps(image, cam_thresholds(0.5))
    iou, box, _, tied, _ = level_boxes(image, values, gt)
    assert tied.tolist() == [False] and iou.tolist() == [6 / 31] and box.tolist() == [[8, 2, 11, 5]]
    assert box_curve(image, gt, cam_thresholds(0.5), method="tree").box_all.tolist() == [[8, 2, 11, 5], [8, 2, 11, 5]]


def test_ties_at_iou_zero_go_to_the_last_outermost_component():
    # A ring with a block in its hole, a ground-truth box far from both: IoU 0 for the ring, its
    # hole and the block, so every contour ties and OpenCV's first is the last-starting outermost
    # component (here the only one): the ring's outer border, decided without tracing.
    image = np.zeros((16, 16), dtype=np.uint8)
    image[1:12, 1:12] = 100
    image[3:10, 3:10] = 0
    image[5:8, 5:8] = 100
    gt = np.array([[14, 14, 15, 15]])
    values, _ = distinct_maps(image, cam_thresholds(0.5))
    iou, box, _, tied, _ = level_boxes(image, values, gt)
    assert tied.tolist() == [False] and iou.tolist() == [0.0] and box.tolist() == [[1, 1, 12, 12]]
    check_against_reference(image, gt, cam_thresholds(0.5))


@pytest.mark.parametrize("kind", ("noise", "nested", "diagonal", "sparse"))
def test_maps_far_from_the_ground_truth_match_the_reference_without_tracing(kind):
    # Every box misses the ground truth: every level is an all-way tie at IoU 0, nested components
    # and holes included, and OpenCV's first contour decides the box at every threshold.
    rng = np.random.default_rng(17 + ADVERSARIAL.index(kind))
    thresholds = cam_thresholds(0.01)
    for _ in range(60):
        image = adversarial_map(kind, rng)
        height, width = image.shape
        canvas = np.zeros((height + 6, width + 6), dtype=np.uint8)
        canvas[:height, :width] = image
        gt = np.array([[width + 4, height + 4, width + 5, height + 5]])
        values, _ = distinct_maps(canvas, thresholds)
        assert not level_boxes(canvas, values, gt)[3].any()
        check_against_reference(canvas, gt, thresholds)


def test_ties_between_nested_components_are_traced():
    # Two equal blocks in the hole of a ring, a ground-truth box between them: IoU 3/28 for each
    # block ([5, 6, 8, 9] and [12, 6, 15, 9]), less for the ring ([1, 1, 19, 15]: 15/285) and its
    # hole ([2, 2, 17, 13]: 15/192). Both blocks are nested: OpenCV lists them after the ring and
    # its hole, the later-starting one first; that order is left to findContours.
    image = np.zeros((16, 20), dtype=np.uint8)
    image[1:15, 1:19] = 100
    image[3:13, 3:17] = 0
    image[6:9, 5:8] = 100
    image[6:9, 12:15] = 100
    gt = np.array([[8, 6, 12, 8]])
    values, _ = distinct_maps(image, cam_thresholds(0.5))
    iou, _, _, tied, _ = level_boxes(image, values, gt)
    assert tied.tolist() == [True] and iou.tolist() == [3 / 28]
    check_against_reference(image, gt, cam_thresholds(0.5))
    assert box_curve(image, gt, cam_thresholds(0.5), method="tree").box_all[0].tolist() == [12, 6, 15, 9]


def reference_fill(image: np.ndarray) -> np.ndarray:
    """fill_holes by its definition, level by level: {fill >= v} is everything but the 4-connected
    regions of {image < v} that reach the edge (OpenCV's connected components)."""
    filled = np.zeros_like(image)
    for value in range(1, 256):
        background = (image < value).astype(np.uint8)
        labels = cv2.connectedComponents(background, connectivity=4)[1]
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        edge_background = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
        outside = np.isin(labels, edge[edge_background > 0]) & (background > 0)
        filled[~outside] = value
    return filled


def test_fill_holes_is_its_definition_on_adversarial_and_realistic_maps():
    rng = np.random.default_rng(5)
    maps = [adversarial_map(kind, rng) for kind in ADVERSARIAL for _ in range(15)]
    maps += list(quantize_cams(sample_cams(6, 64, 48, seed=13)[0]))
    rings = np.zeros((9, 9), dtype=np.uint8)  # a hole inside a ring inside a hole inside a ring
    rings[1:8, 1:8], rings[2:7, 2:7], rings[3:6, 3:6], rings[4, 4] = 200, 10, 90, 3
    maps.append(rings)
    for image in maps:
        assert fill_holes(image).tolist() == reference_fill(image).tolist(), image.tolist()
    # everything inside the outer ring reaches the edge only over it; the edge keeps its 0
    assert (fill_holes(rings)[1:8, 1:8] == 200).all() and fill_holes(rings).sum() == 49 * 200
