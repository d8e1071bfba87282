"""Specification of the split evaluator: flat metric names, exact values, batching and merging."""
import numpy as np
import pytest
import torch

from cam_samples import sample_cams
from trainers.evaluator import LocalizationEvaluator
from trainers.localize import max_box_acc, pxap


def block_cam():
    cam = torch.zeros(10, 10)
    cam[2:6, 3:8] = 1.0
    return cam


def hand_batch():
    # A: block on its box, class right. B: empty CAM, class wrong. C: block on its box, class wrong.
    cams = torch.stack([block_cam(), torch.zeros(10, 10), block_cam()])
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    targets = torch.tensor([1, 1, 1])
    boxes = [np.array([[3, 2, 7, 5]]), np.array([[5, 5, 8, 8]]), np.array([[3, 2, 7, 5]])]
    return cams, logits, targets, boxes


def test_hand_computed_metrics_under_flat_names():
    evaluator = LocalizationEvaluator("val")
    evaluator.update(*hand_batch(), image_ids=["a", "b", "c"])
    metrics = evaluator.compute()
    # cls: A only. GT-known: fixed box of A and C is the block itself (IoU 1); B's is (0, 0, 0, 0).
    # Contour box of the block is (3, 2, 8, 6): IoU 2/3, right at 0.3 and 0.5, wrong at 0.7.
    assert metrics == pytest.approx({
        "val/cls_top1": 100 / 3,
        "val/loc_gt_known": 200 / 3,
        "val/loc_top1": 100 / 3,
        "val/maxboxacc": 200 / 3,
        "val/maxboxacc_v2_iou30": 200 / 3,
        "val/maxboxacc_v2_iou50": 200 / 3,
        "val/maxboxacc_v2_iou70": 0.0,
        "val/cam_threshold_iou30": 0.0,
        "val/cam_threshold_iou50": 0.0,
        "val/cam_threshold_iou70": 0.0,
        "val/maxboxacc_v2": (200 / 3 + 200 / 3 + 0) / 3,
    })


def test_per_image_rows_hold_the_fixed_and_the_best_threshold_boxes():
    evaluator = LocalizationEvaluator("test")
    evaluator.update(*hand_batch(), image_ids=["a", "b", "c"])
    rows = evaluator.per_image()
    assert rows["image_id"].tolist() == ["a", "b", "c"]
    assert rows["cls_correct"].tolist() == [True, False, False]
    assert [rows[f"fixed_{k}"].tolist() for k in ("x0", "y0", "x1", "y1")] == [[3, 0, 3], [2, 0, 2], [7, 0, 7], [5, 0, 5]]
    assert rows["gt_known_correct"].tolist() == [True, False, True]
    assert rows["top1_loc_correct"].tolist() == [True, False, False]
    assert [rows[f"best_{k}"].tolist() for k in ("x0", "y0", "x1", "y1")] == [[3, 0, 3], [2, 0, 2], [8, 0, 8], [6, 0, 6]]
    assert rows["best_iou"] == pytest.approx([2 / 3, 0.0, 2 / 3])
    assert rows["correct_iou50"].tolist() == [True, False, True]
    assert rows["correct_iou70"].tolist() == [False, False, False]


def random_split(count=24, seed=0):
    cams, boxes = sample_cams(count, 32, 32, seed)
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, 5, generator=generator)
    targets = torch.randint(0, 5, (count,), generator=generator)
    masks = torch.from_numpy(np.random.default_rng(seed).choice(np.array([0, 1, 255], dtype=np.uint8), (count, 32, 32)))
    return torch.from_numpy(cams), logits, targets, boxes, masks


def test_batches_add_up_to_the_whole_split_and_match_the_functions():
    cams, logits, targets, boxes, masks = random_split()
    whole = LocalizationEvaluator("val")
    whole.update(cams, logits, targets, boxes, masks)
    batched = LocalizationEvaluator("val")
    for part in (slice(0, 7), slice(7, 20), slice(20, 24)):
        batched.update(cams[part], logits[part], targets[part], boxes[part], masks[part])
    assert batched.compute() == whole.compute()
    metrics = whole.compute()
    v2 = max_box_acc(cams, boxes)
    assert [metrics[f"val/maxboxacc_v2_iou{k}"] for k in (30, 50, 70)] == [v2[0.3], v2[0.5], v2[0.7]]
    assert metrics["val/maxboxacc"] == max_box_acc(cams, boxes, multi_contour=False, iou_thresholds=(0.5,))[0.5]
    assert metrics["val/pxap"] == pytest.approx(pxap(cams, masks))
    assert metrics["val/cls_top1"] == pytest.approx((logits.argmax(1) == targets).float().mean().item() * 100)


def test_merged_rank_states_equal_one_evaluator():
    cams, logits, targets, boxes, masks = random_split(seed=1)
    single = LocalizationEvaluator("val")
    single.update(cams, logits, targets, boxes, masks)
    ranks = [LocalizationEvaluator("val") for _ in range(2)]
    ranks[0].update(cams[0::2], logits[0::2], targets[0::2], boxes[0::2], masks[0::2])
    ranks[1].update(cams[1::2], logits[1::2], targets[1::2], boxes[1::2], masks[1::2])
    merged = LocalizationEvaluator("val")
    for rank in ranks:
        merged.merge(rank.state())
    assert merged.compute() == single.compute()


def test_curves_give_the_accuracy_at_every_threshold():
    evaluator = LocalizationEvaluator("val", interval=0.1)
    evaluator.update(*hand_batch())
    curves = evaluator.box_accuracy_curves()
    assert curves["cam_threshold"] == pytest.approx(np.arange(0, 1, 0.1))
    assert curves["maxboxacc_v2_iou50"] == pytest.approx([200 / 3] * 10)


def test_boxes_given_in_some_batches_only_and_an_empty_split_are_refused():
    cams, logits, targets, boxes = hand_batch()
    evaluator = LocalizationEvaluator("val")
    with pytest.raises(ValueError, match="split 'val': no image was evaluated"):
        evaluator.compute()
    evaluator.update(cams, logits, targets, boxes)
    with pytest.raises(ValueError, match="boxes: given in some batches and not in others"):
        evaluator.update(cams, logits, targets)
    with pytest.raises(ValueError, match=r"logits \(3, 2\) / targets \(2,\) do not match 3 CAMs"):
        LocalizationEvaluator().update(cams, logits, targets[:2], boxes)
