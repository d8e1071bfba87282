"""The fast box protocol gives the same numbers as a straight reimplementation of wsolevaluation."""
import numpy as np
import pytest
import torch

from cam_samples import KINDS, sample_cams
from trainers.boxes import box_curve, cam_thresholds
from trainers.localize import fixed_threshold_boxes, max_box_acc, pxap, quantize_cams
from wsol_reference import (
    reference_best_ious, reference_fixed_threshold_box, reference_max_box_acc, reference_pxap,
)


@pytest.mark.parametrize("height, width, seed", [(64, 64, 0), (37, 53, 1), (224, 224, 2)])
def test_every_threshold_of_every_image_matches_the_reference(height, width, seed):
    count = {64: 126, 37: 90, 224: 27}[height]
    cams, gts = sample_cams(count, height, width, seed)
    thresholds = cam_thresholds(0.01)
    for cam, gt, kind in zip(cams, gts, KINDS * count):
        curve = box_curve(quantize_cams(cam[None])[0], gt, thresholds)
        assert curve.iou_all.tolist() == reference_best_ious(cam, gt, 0.01, multi_contour=True), kind
        assert curve.iou_largest.tolist() == reference_best_ious(cam, gt, 0.01, multi_contour=False), kind


@pytest.mark.parametrize("multi_contour", [True, False])
def test_max_box_acc_at_one_thousandth_matches_the_reference(multi_contour):
    cams, gts = sample_cams(18, 64, 64, seed=3)
    ours = max_box_acc(cams, gts, interval=0.001, multi_contour=multi_contour)
    reference = reference_max_box_acc(cams, gts, interval=0.001, multi_contour=multi_contour)
    assert {delta: ours[delta] for delta in (0.3, 0.5, 0.7)} == reference


def test_float64_cams_match_the_reference_too():
    cams, gts = sample_cams(45, 48, 48, seed=4)
    cams = cams.astype(np.float64) ** 1.7  # values that are not float32-representable
    ours = max_box_acc(cams, gts)
    assert {delta: ours[delta] for delta in (0.3, 0.5, 0.7)} == reference_max_box_acc(cams, gts)


def test_parallel_workers_give_the_same_numbers():
    cams, gts = sample_cams(36, 64, 64, seed=5)
    assert max_box_acc(cams, gts, workers=2) == max_box_acc(cams, gts, workers=1)


def test_fixed_threshold_boxes_match_a_breadth_first_reference():
    cams, _ = sample_cams(90, 32, 32, seed=6)
    for fraction in (0.2, 0.3):
        ours = fixed_threshold_boxes(torch.from_numpy(cams), fraction).tolist()
        assert ours == [reference_fixed_threshold_box(cam, fraction) for cam in cams]


def test_pxap_matches_the_reference_histograms():
    rng = np.random.default_rng(7)
    cams, _ = sample_cams(30, 40, 40, seed=7)
    masks = rng.choice(np.array([0, 1, 255], dtype=np.uint8), size=cams.shape, p=[0.6, 0.3, 0.1])
    for interval in (0.01, 0.001):
        assert pxap(cams, masks, interval=interval) == pytest.approx(reference_pxap(cams, masks, interval), abs=1e-9)
