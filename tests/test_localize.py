"""Hand-computed cases of the localization metrics (boxes, fixed threshold, PxAP) and bad input."""
import numpy as np
import pytest
import torch

from trainers.boxes import box_iou
from trainers.localize import fixed_threshold_boxes, max_box_acc, pxap


def blank(height=10, width=10):
    return np.zeros((height, width), dtype=np.float32)


def test_one_box_gets_the_protocols_x_plus_w_box():
    # Block at rows 2-5, cols 3-7. boundingRect gives x=3, y=2, w=5, h=4 and the protocol's box is
    # (x, y, x + w, y + h) = (3, 2, 8, 6): one pixel wider and taller than the block.
    # IoU with the block itself [3, 2, 7, 5]: 20 / (30 + 20 - 20) = 2/3.
    cam = blank()
    cam[2:6, 3:8] = 1.0
    result = max_box_acc(cam[None], [np.array([[3, 2, 7, 5]])])
    assert result[0.3] == 100.0 and result[0.5] == 100.0 and result[0.7] == 0.0
    assert box_iou(np.array([3, 2, 8, 6]), np.array([3, 2, 7, 5]))[0, 0] == pytest.approx(2 / 3)


def test_box_on_the_border_is_clipped_to_the_last_pixel():
    # Block at rows 6-9, cols 5-9: x + w = 10 and y + h = 10 are clipped to 9, so the box is exact.
    cam = blank()
    cam[6:10, 5:10] = 1.0
    assert max_box_acc(cam[None], [np.array([[5, 6, 9, 9]])])[0.7] == 100.0


def test_two_ground_truth_boxes_any_match_counts():
    # Blob A (1.0) at rows/cols 0-3, blob B (0.5 -> uint8 127) at rows/cols 6-8.
    # For tau <= 0.49 (cut-off int(tau * 255) <= 124 < 127) both blobs are contours:
    #   A -> (0, 0, 4, 4), B -> (6, 6, 9, 9) (x + w = 9 = W - 1, no clipping needed).
    # IoU(B box, [6, 6, 8, 8]) = 9 / 16; IoU(A box, [0, 0, 3, 3]) = 16 / 25. A is the largest contour.
    cam = blank()
    cam[0:4, 0:4] = 1.0
    cam[6:9, 6:9] = 0.5
    only_b = [np.array([[6, 6, 8, 8]])]
    v2 = max_box_acc(cam[None], only_b)
    assert (v2[0.3], v2[0.5], v2[0.7]) == (100.0, 100.0, 0.0)
    assert v2["best_threshold"][0.5] == 0.0  # the lowest of the equally good thresholds
    v1 = max_box_acc(cam[None], only_b, multi_contour=False)
    assert (v1[0.3], v1[0.5], v1[0.7]) == (0.0, 0.0, 0.0)  # the largest contour is A
    both = [np.array([[6, 6, 8, 8], [0, 0, 3, 3]])]
    v1_both = max_box_acc(cam[None], both, multi_contour=False)
    assert (v1_both[0.3], v1_both[0.5], v1_both[0.7]) == (100.0, 100.0, 0.0)


def test_ring_hole_outline_decides_v2():
    # A square ring: outer rows/cols 2-17, hole rows/cols 6-13. RETR_TREE gives two contours:
    #   outer -> (2, 2, 18, 18); the hole's outline runs on the ring pixels 5..14 -> (5, 5, 15, 15).
    # Against an object in the hole [6, 6, 13, 13]: outer IoU 64 / 289 = 0.22, hole IoU 64 / 121 = 0.53.
    cam = blank(20, 20)
    cam[2:18, 2:18] = 1.0
    cam[6:14, 6:14] = 0.0
    gt = [np.array([[6, 6, 13, 13]])]
    v2 = max_box_acc(cam[None], gt, multi_contour=True)
    v1 = max_box_acc(cam[None], gt, multi_contour=False)
    assert (v2[0.3], v2[0.5], v2[0.7]) == (100.0, 100.0, 0.0)
    assert (v1[0.3], v1[0.5], v1[0.7]) == (0.0, 0.0, 0.0)


def test_empty_cam_gives_the_protocols_origin_box():
    # No pixel above any cut-off: the protocol's box is (0, 0, 0, 0), a single pixel at the origin.
    zeros = blank()[None]
    assert max_box_acc(zeros, [np.array([[5, 5, 8, 8]])])[0.3] == 0.0
    assert max_box_acc(zeros, [np.array([[0, 0, 0, 0]])])[0.7] == 100.0  # IoU 1 with that pixel


def test_constant_one_cam_boxes_the_whole_image():
    ones = np.ones((1, 10, 10), dtype=np.float32)
    assert max_box_acc(ones, [np.array([[0, 0, 9, 9]])])[0.7] == 100.0


def test_accuracy_is_the_percentage_of_images_at_the_best_threshold():
    # Image 1 is right only for tau <= 0.49, image 2 only for tau >= 0.5: no threshold serves both.
    first = blank()
    first[0:4, 0:4] = 1.0
    first[6:9, 6:9] = 0.5
    second = blank()
    second[0:4, 0:4] = 1.0
    second[0:8, 0:8] = np.maximum(second[0:8, 0:8], 0.5)
    gts = [np.array([[6, 6, 8, 8]]), np.array([[0, 0, 3, 3]])]
    # second: tau <= 0.49 -> one 8x8 block, box (0, 0, 8, 8), IoU 16 / 81 < 0.3; tau >= 0.5 -> (0, 0, 4, 4), 16 / 25.
    result = max_box_acc(np.stack([first, second]), gts)
    assert result[0.5] == 50.0
    single = max_box_acc(np.stack([first, first, second]), [gts[0], gts[0], gts[1]])
    assert single[0.5] == pytest.approx(200 / 3)


def test_interval_one_thousandth_uses_a_thousand_thresholds():
    cam = blank()
    cam[0:4, 0:4] = 1.0
    cam[6:9, 6:9] = 0.5
    result = max_box_acc(cam[None], [np.array([[6, 6, 8, 8]])], interval=0.001)
    assert result[0.5] == 100.0 and result["best_threshold"][0.5] == 0.0


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(0)
    cams = rng.random((4, 16, 16)).astype(np.float32)
    gts = [np.array([[2, 2, 9, 9]])] * 4
    assert max_box_acc(torch.from_numpy(cams), gts) == max_box_acc(cams, gts)


def test_fixed_threshold_box_is_the_largest_region_above_the_fraction():
    # Above 0.2: region A (3x3 at value 0.5) and region B (2x5 = 10 pixels at 1.0); B is larger.
    cam = blank()
    cam[0:3, 0:3] = 0.5
    cam[5:7, 2:7] = 1.0
    cam[9, 9] = 0.2  # not above 0.2 * max
    assert fixed_threshold_boxes(cam[None], 0.2).tolist() == [[2, 5, 6, 6]]
    assert fixed_threshold_boxes(blank()[None], 0.2).tolist() == [[0, 0, 0, 0]]  # nothing above


def test_diagonal_pixels_are_one_region():
    cam = blank()
    for i in range(4):
        cam[i, i] = 1.0
    cam[8:10, 0:2] = 1.0  # 4 pixels, as many as the diagonal; the first in raster order wins
    assert fixed_threshold_boxes(cam[None], 0.2).tolist() == [[0, 0, 3, 3]]


def test_pxap_of_a_hand_computed_case():
    # Object pixels score 1.0 and 0.0, background 0.5, the ignored pixel 0.2.
    # Descending: >= 1.0: P 1, R 1/2; >= 0.5: P 1/2, R 1/2; >= 0: P 2/3, R 1.
    # AP = 1 * 1/2 + 2/3 * 1/2 = 5/6.
    cams = np.array([[[1.0, 0.5], [0.0, 0.2]]], dtype=np.float32)
    masks = np.array([[[1, 0], [1, 255]]], dtype=np.uint8)
    assert pxap(cams, masks) == pytest.approx(500 / 6)


def test_pxap_of_a_perfect_map_is_100():
    masks = np.zeros((1, 8, 8), dtype=np.uint8)
    masks[0, 2:5, 2:5] = 1
    assert pxap(masks.astype(np.float32), masks) == pytest.approx(100.0)


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("cams, boxes, message", [
    (np.full((1, 4, 4), 1.5), [[0, 0, 1, 1]], r"cams: values must lie in \[0, 1\].*max 1.5"),
    (np.full((1, 4, 4), np.nan), [[0, 0, 1, 1]], r"cams: values must lie in \[0, 1\]"),
    (np.zeros((4, 4)), [[0, 0, 1, 1]], r"cams: shape \(4, 4\) is not \(N, H, W\)"),
    (np.zeros((2, 4, 4)), [[[0, 0, 1, 1]]], r"gt_boxes: 1 box lists for 2 CAMs"),
    (np.zeros((1, 4, 4)), [[[0, 0, 1]]], r"gt_boxes\[0\]: shape \(1, 3\) is not \(k, 4\)"),
    (np.zeros((1, 4, 4)), [np.zeros((0, 4))], r"gt_boxes\[0\]: shape \(0, 4\) is not \(k, 4\) with k >= 1"),
    (np.zeros((1, 4, 4)), [[[3, 0, 1, 1]]], r"gt_boxes\[0\]: \[\[3, 0, 1, 1\]\] is not x0, y0, x1, y1"),
    (np.zeros((1, 4, 4)), [[[0.5, 0, 1, 1]]], r"gt_boxes\[0\]: .* are not integer pixel coordinates"),
])
def test_bad_cams_and_boxes_are_refused(cams, boxes, message):
    with pytest.raises(ValueError, match=message):
        max_box_acc(cams, [np.asarray(b) for b in boxes])


@pytest.mark.parametrize("kwargs, message", [
    ({"interval": 0}, r"interval: 0 is not allowed; a step in \(0, 1\)"),
    ({"interval": 1.5}, r"interval: 1.5 is not allowed"),
    ({"iou_thresholds": (0.5, 1.2)}, r"iou_thresholds: \(0.5, 1.2\) is not allowed"),
    ({"workers": 0}, r"workers: 0 is not allowed; an int >= 1"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        max_box_acc(np.zeros((1, 4, 4)), [np.array([[0, 0, 1, 1]])], **kwargs)


def test_pxap_mask_shape_mismatch_and_missing_objects_are_refused():
    with pytest.raises(ValueError, match=r"masks: shape \(1, 3, 3\) does not match the CAMs \(1, 4, 4\)"):
        pxap(np.zeros((1, 4, 4)), np.zeros((1, 3, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="have no object pixel"):
        pxap(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), dtype=np.uint8))


def test_center_gaussian_baseline_finds_a_centred_box_and_nothing_else():
    from trainers.localize import center_gaussian_cams

    cams = center_gaussian_cams(2, 32)
    assert cams.shape == (2, 32, 32) and float(cams.max()) == 1.0 and float(cams.min()) == 0.0
    assert torch.equal(cams[0], cams[0].flip(0)) and torch.equal(cams[0], cams[0].T)  # centred, isotropic
    centred, corner = np.array([[8, 8, 23, 23]]), np.array([[0, 0, 7, 7]])
    assert max_box_acc(cams, [centred, corner])[0.5] == 50.0  # the centred box is found, the corner one never
