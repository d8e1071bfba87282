"""Hooks of the training loop that come with the trainer: console progress and a metrics log."""
from __future__ import annotations

import json
import sys
import time

from trainers.engine import EpochReport, Hook, StepInfo, Trainer

SUMMARY_KEYS = ("train/loss", "val/cls_top1", "val/loc_gt_known", "val/maxboxacc_v2", "val/pxap",
                "test/cls_top1", "test/loc_gt_known", "test/loc_top1", "test/maxboxacc", "test/maxboxacc_v2", "test/pxap")


class ProgressHook(Hook):
    """A progress bar per epoch (tqdm) on rank 0, and one summary line per epoch."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.bar = None

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        if not trainer.place.is_main:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=info.steps, desc=f"epoch {info.epoch + 1}/{trainer.config.optim.epochs}",
                            unit="step", file=self.stream, leave=False, dynamic_ncols=True)
        self.bar.update(1)
        if info.step % 10 == 0 or info.step + 1 == info.steps:
            self.bar.set_postfix(loss=f"{float(info.loss):.3f}", lr=f"{info.lr:.3g}")

    def after_epoch(self, trainer: Trainer, report: EpochReport) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if trainer.place.is_main:
            shown = "  ".join(f"{k} {report.metrics[k]:.2f}" for k in SUMMARY_KEYS if k in report.metrics)
            rate = report.metrics.get("train/images_per_second", 0.0)
            print(f"epoch {report.epoch}/{trainer.config.optim.epochs}  {shown}  ({rate:.0f} img/s)",
                  file=self.stream, flush=True)


class MetricsLogHook(Hook):
    """Appends each epoch's metrics as one JSON line to <output_dir>/metrics.jsonl (rank 0)."""

    def before_train(self, trainer: Trainer) -> None:
        self.path = trainer.output_dir / "metrics.jsonl"
        if trainer.place.is_main and self.path.exists():
            # After a resume: keep the lines of the epochs the checkpoint already had, drop the rest.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("epoch", 0) <= trainer.epoch]
            temporary = self.path.with_suffix(".jsonl.tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            temporary.replace(self.path)

    def after_epoch(self, trainer: Trainer, report: EpochReport) -> None:
        if trainer.place.is_main:
            with self.path.open("a") as log:
                log.write(json.dumps({"time": time.time(), **report.metrics}) + "\n")
