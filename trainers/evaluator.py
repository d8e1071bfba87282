"""The evaluator of one split: accumulates batches, returns the flat metric names Tune and MLflow share."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trainers.boxes import box_iou, cam_thresholds
from trainers.localize import (
    IOU_THRESHOLDS, PAPER_IOU, PAPER_LOC_FRACTION, BoxCurves, PixelHistogram, _check_iou_thresholds,
    check_gt_boxes, fixed_threshold_boxes, quantize_cams,
)


def iou_key(delta: float) -> str:
    """A metric-name suffix for an IoU threshold: 0.5 -> 'iou50'."""
    return f"iou{round(delta * 100)}"


def metric_names(split: str, iou_thresholds: Sequence[float] = IOU_THRESHOLDS) -> list[str]:
    """Every name compute() can report for `split` (box or mask datasets), for checks made before training."""
    names = ["cls_top1", "loc_gt_known", "loc_top1", "maxboxacc", "maxboxacc_v2", "pxap"]
    for delta in iou_thresholds:
        names += [f"maxboxacc_v2_{iou_key(delta)}", f"cam_threshold_{iou_key(delta)}"]
    return [f"{split}/{name}" for name in names]


class LocalizationEvaluator:
    """reset() / update(cams, logits, targets, boxes|masks) / compute() -> {'val/maxboxacc_v2': ...}.

    Keeps per-image results (best IoU, predicted box, correct) for the predictions table when
    `keep_per_image`; `state()` / `merge()` combine evaluators of several DDP ranks exactly.
    """

    def __init__(
        self,
        split: str = "val",
        *,
        interval: float = 0.01,
        iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
        loc_fraction: float = PAPER_LOC_FRACTION,
        keep_per_image: bool = True,
        workers: int = 1,
    ) -> None:
        self.split = split
        self.thresholds = cam_thresholds(interval)
        self.deltas = _check_iou_thresholds(iou_thresholds)
        if not 0 <= loc_fraction < 1:
            raise ValueError(f"loc_fraction: {loc_fraction!r} is not allowed; a fraction of the CAM maximum in [0, 1)")
        self.loc_fraction = loc_fraction
        self.keep_per_image = keep_per_image
        self._curves = BoxCurves(self.thresholds, workers)
        self.reset()

    def reset(self) -> None:
        self._columns: dict[str, list[np.ndarray]] = {}
        self._v2_correct = np.zeros((len(self.deltas), len(self.thresholds)), dtype=np.int64)
        self._v1_correct = np.zeros(len(self.thresholds), dtype=np.int64)
        self._pixels = PixelHistogram(self.thresholds)
        self._has_boxes: bool | None = None
        self._has_masks: bool | None = None

    def update(
        self,
        cams: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        boxes: Sequence | None = None,
        masks: torch.Tensor | None = None,
        image_ids: Sequence[str] | None = None,
    ) -> None:
        """Add a batch: CAMs (B, H, W) in [0, 1] of the true class, boxes in the CAM's frame and/or masks."""
        count = cams.shape[0]
        if logits.ndim != 2 or logits.shape[0] != count or targets.shape != (count,):
            raise ValueError(
                f"logits {tuple(logits.shape)} / targets {tuple(targets.shape)} do not match {count} CAMs"
            )
        self._check_kind("boxes", boxes is not None)
        self._check_kind("masks", masks is not None)
        predictions = logits.argmax(dim=1)
        column = {
            "image_id": np.asarray(image_ids if image_ids is not None else [""] * count, dtype=object),
            "target": targets.cpu().numpy().astype(np.int64),
            "prediction": predictions.cpu().numpy().astype(np.int64),
        }
        column["cls_correct"] = column["target"] == column["prediction"]
        if boxes is not None:
            column.update(self._box_columns(cams, check_gt_boxes(boxes, count, "boxes")))
        if masks is not None:
            if masks.shape != cams.shape:
                raise ValueError(f"masks: shape {tuple(masks.shape)} does not match the CAMs {tuple(cams.shape)}")
            self._pixels.update(cams, masks)
        for name, values in column.items():
            self._columns.setdefault(name, []).append(values)

    def _check_kind(self, kind: str, present: bool) -> None:
        attribute = f"_has_{kind}"
        seen = getattr(self, attribute)
        if seen is not None and seen != present:
            raise ValueError(f"{kind}: given in some batches and not in others of split {self.split!r}")
        setattr(self, attribute, present)

    def _box_columns(self, cams: torch.Tensor, gt_boxes: list[np.ndarray]) -> dict[str, np.ndarray]:
        maps = quantize_cams(cams)
        iou_all, box_all, iou_largest = self._curves(maps, gt_boxes)
        for row, delta in enumerate(self.deltas):
            self._v2_correct[row] += (iou_all >= delta).sum(axis=0)
        self._v1_correct += (iou_largest >= PAPER_IOU).sum(axis=0)
        fixed = fixed_threshold_boxes(cams, self.loc_fraction)
        fixed_iou = np.array([box_iou(box, gt).max() for box, gt in zip(fixed, gt_boxes)])
        column = {"fixed_box": fixed, "fixed_iou": fixed_iou}
        if self.keep_per_image:
            column.update(iou_curve=iou_all, box_curve=box_all.astype(np.int32))
        return column

    def state(self) -> dict:
        """Everything accumulated so far, picklable (to gather from DDP ranks)."""
        return {
            "columns": {name: np.concatenate(parts) for name, parts in self._columns.items()},
            "v2_correct": self._v2_correct, "v1_correct": self._v1_correct,
            "object": self._pixels.object, "background": self._pixels.background,
            "has_boxes": self._has_boxes, "has_masks": self._has_masks,
        }

    def merge(self, state: dict) -> None:
        """Add another evaluator's state (same split settings) to this one."""
        for name, values in state["columns"].items():
            self._columns.setdefault(name, []).append(values)
        self._v2_correct += state["v2_correct"]
        self._v1_correct += state["v1_correct"]
        self._pixels.object += state["object"]
        self._pixels.background += state["background"]
        for kind in ("boxes", "masks"):
            if state[f"has_{kind}"] is not None:
                self._check_kind(kind, state[f"has_{kind}"])

    def _column(self, name: str) -> np.ndarray:
        return np.concatenate(self._columns[name])

    @property
    def count(self) -> int:
        return sum(len(part) for part in self._columns.get("target", []))

    def box_accuracy_curves(self) -> dict[str, np.ndarray]:
        """Box accuracy (%) at every CAM threshold: 'maxboxacc' (V1) and one 'maxboxacc_v2_iouNN' per delta."""
        count = float(self.count)
        curves = {"cam_threshold": self.thresholds, "maxboxacc": self._v1_correct * 100.0 / count}
        for row, delta in enumerate(self.deltas):
            curves[f"maxboxacc_v2_{iou_key(delta)}"] = self._v2_correct[row] * 100.0 / count
        return curves

    def _best_threshold_indices(self) -> dict[float, int]:
        """Per IoU threshold, the index of the best CAM threshold (the lowest of equally good ones)."""
        return {delta: int(np.argmax(self._v2_correct[row])) for row, delta in enumerate(self.deltas)}

    def compute(self) -> dict[str, float]:
        """The split's metrics in percent under flat names ('val/cls_top1', 'val/maxboxacc_v2', ...)."""
        if self.count == 0:
            raise ValueError(f"split {self.split!r}: no image was evaluated")
        prefix = f"{self.split}/"
        cls_correct = self._column("cls_correct")
        metrics = {prefix + "cls_top1": float(cls_correct.mean() * 100)}
        if self._has_boxes:
            gt_known = self._column("fixed_iou") >= PAPER_IOU
            metrics[prefix + "loc_gt_known"] = float(gt_known.mean() * 100)
            metrics[prefix + "loc_top1"] = float((gt_known & cls_correct).mean() * 100)
            curves = self.box_accuracy_curves()
            metrics[prefix + "maxboxacc"] = float(curves["maxboxacc"].max())
            best = []
            for delta, index in self._best_threshold_indices().items():
                best.append(float(curves[f"maxboxacc_v2_{iou_key(delta)}"][index]))
                metrics[f"{prefix}maxboxacc_v2_{iou_key(delta)}"] = best[-1]
                metrics[f"{prefix}cam_threshold_{iou_key(delta)}"] = float(self.thresholds[index])
            metrics[prefix + "maxboxacc_v2"] = float(np.mean(best))
        if self._has_masks:
            metrics[prefix + "pxap"] = self._pixels.average_precision(self.split)
        return metrics

    def per_image(self) -> dict[str, np.ndarray]:
        """One row per image: class, fixed-threshold box and IoU, and the box at the split's best threshold."""
        if not self.keep_per_image:
            raise ValueError("per_image: this evaluator was made with keep_per_image=False")
        table = {name: self._column(name) for name in ("image_id", "target", "prediction", "cls_correct")}
        if self._has_boxes:
            fixed = self._column("fixed_box")
            for axis, name in enumerate(("x0", "y0", "x1", "y1")):
                table[f"fixed_{name}"] = fixed[:, axis]
            table["fixed_iou"] = self._column("fixed_iou")
            table["gt_known_correct"] = table["fixed_iou"] >= PAPER_IOU
            table["top1_loc_correct"] = table["gt_known_correct"] & table["cls_correct"]
            iou_curve, box_curve = self._column("iou_curve"), self._column("box_curve")
            best = self._best_threshold_indices()
            # The box shown is the one at the best threshold for IoU 0.5 (or the middle IoU asked for).
            shown = best[PAPER_IOU] if PAPER_IOU in best else best[self.deltas[len(self.deltas) // 2]]
            for axis, name in enumerate(("x0", "y0", "x1", "y1")):
                table[f"best_{name}"] = box_curve[:, shown, axis]
            table["best_iou"] = iou_curve[:, shown]
            for delta, index in best.items():
                table[f"correct_{iou_key(delta)}"] = iou_curve[:, index] >= delta
            table["max_iou_any_threshold"] = iou_curve.max(axis=1)
        return table

    def close(self) -> None:
        self._curves.close()
