"""One training run: a small epoch loop; reporting, progress and logging are hooks given to it.

Each epoch: train (HaS on the device, after normalisation), evaluate on val every `eval.every`
epochs, and after the last epoch on test; then a checkpoint folder with the epoch's state, metrics
and evaluation artifacts, then the hooks. DDP-ready: under torch.distributed the same loop runs
on every rank, with sharded batches and metrics reduced so every rank reports the same numbers.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainers import checkpoint as ckpt
from trainers.artifacts import accuracy_curve_plot, overlay_grid, write_predictions
from trainers.backbones import build_backbone
from trainers.cam import class_activation_maps
from trainers.config import RunConfig
from trainers.datasets.run_data import RunData, build_data
from trainers.distributed import Place, barrier, broadcast_object, gather_objects
from trainers.evaluator import LocalizationEvaluator
from trainers.hide import HideAndSeek
from trainers.optim import build_optimizer, build_scheduler, set_weight_decay

# Reported every epoch; val/... (evaluator.metric_names) every eval.every epochs and at the last one,
# test/... after the last one.
TRAIN_METRICS = ("train/loss", "train/cls_top1", "train/lr", "train/epoch_seconds", "train/images_per_second")


@dataclass
class StepInfo:
    epoch: int  # 0-based epoch being trained
    step: int  # step within the epoch
    steps: int  # steps in the epoch
    loss: torch.Tensor  # detached, on the device: read it (a sync) only when needed
    lr: float
    images: int  # images in this step on this rank


@dataclass
class EpochReport:
    epoch: int  # epochs finished (1-based)
    metrics: dict[str, float]
    checkpoint: Path | None = None  # the published checkpoint folder of this epoch
    final: bool = False
    artifacts: dict[str, Path] = field(default_factory=dict)


class Hook:
    """Called by the loop; subclass and override what you need. Runs on every rank."""

    def before_train(self, trainer: Trainer) -> None: ...

    def after_step(self, trainer: Trainer, info: StepInfo) -> None: ...

    def after_epoch(self, trainer: Trainer, report: EpochReport) -> None: ...

    def after_train(self, trainer: Trainer, report: EpochReport) -> None: ...


class FaultDrill(RuntimeError):
    """Raised on purpose (config fault_drill_epoch) to check that a run resumes from its checkpoint."""


class OutputDirInUse(FileExistsError):
    """The output folder already holds a run: resume it or pick another folder."""


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16, AMX), where bf16 autocast trains ~1.5x faster.

    Elsewhere bf16 is emulated and slower than float32, so `amp: auto` stays off there.
    """
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def resolve_device(name: str, place: Place) -> torch.device:
    if name == "auto":
        return torch.device("cuda", place.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda" and place.distributed:
        return torch.device("cuda", place.local_rank)
    return torch.device(name)


class Trainer:
    """Trains and evaluates one RunConfig; `fit()` returns the final metrics."""

    def __init__(self, config: RunConfig, hooks=(), *, data: RunData | None = None, place: Place | None = None):
        self.config = config
        self.place = place or Place.current()
        self.device = resolve_device(config.device, self.place)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.data = data or build_data(config.data, config.seed, backbone=config.model.backbone)
        self.hooks = list(hooks)
        self.output_dir = Path(config.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        with torch.random.fork_rng(devices=[]):  # the same initial weights for a seed, on every rank
            torch.manual_seed(config.seed)
            self.net = build_backbone(config.model.backbone, self.data.num_classes, config.model.weights,
                                      config.model.large_feature_map)
        if self.place.distributed and config.sync_batchnorm and self.device.type == "cuda":
            self.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.net)  # torch syncs BN on GPUs only
        self.net.to(self.device, memory_format=self.memory_format)
        self.model = self.net
        if self.place.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        if config.compile:
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(self.net, config.optim, config.model.fast_lr_mult)
        self.steps_per_epoch = max(1, -(-len(self._train_indices(0)) // self.rank_batch_size))
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.steps_per_epoch)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        generator = torch.Generator(self.device).manual_seed(config.seed * 1009 + self.place.rank)
        self.hider = HideAndSeek(config.has.sizes, config.has.p_hide, config.has.fill, self.data.fill_stats, generator,
                                  inplace=True)  # normalize() hands it a batch of its own
        self.mean = torch.tensor(self.data.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(self.data.std, device=self.device).view(1, 3, 1, 1) * 255
        self.epoch = 0  # epochs finished
        self.prediction_names = self.data.class_names  # captions of the head's classes (eval-only may differ)

    # ---- the pieces ------------------------------------------------------------------------

    @property
    def rank_batch_size(self) -> int:
        return max(1, self.config.data.batch_size // self.place.world_size)

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.config.amp
        if amp == "auto":
            native = self.device.type == "cuda" or (self.device.type == "cpu" and cpu_has_native_bf16())
            return torch.bfloat16 if native else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def normalize(self, images: torch.Tensor, hide: bool = False) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> the normalised float batch on the device, hidden if asked, in the
        model's memory format (hiding runs before the layout change: torch.where is several times
        faster on NCHW than on channels_last)."""
        images = images.to(self.device, non_blocking=True).float()
        images = (images - self.mean) / self.std
        if hide:
            images = self.hider(images)
        return images.contiguous(memory_format=self.memory_format)

    def _train_indices(self, epoch: int) -> torch.Tensor:
        """This rank's shard of the epoch's shuffled order (padded to equal shards, as DistributedSampler)."""
        count = len(self.data.train)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))
        world = self.place.world_size
        padded = -(-count // world) * world
        order = torch.cat([order, order[: padded - count]])
        return order[self.place.rank::world]

    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "hide": self.hider.generator.get_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        self.hider.generator.set_state(state["hide"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    # ---- training --------------------------------------------------------------------------

    def fit(self, resume_from: str | Path | None = None, allow_changes: frozenset[str] = frozenset()) -> dict[str, float]:
        """Train to `optim.epochs` (from a checkpoint folder when given) and return the final metrics.

        `allow_changes`: dotted config keys that may differ from the checkpoint's (population-based
        training continues another trial's weights with mutated hyperparameters).
        """
        fresh = resume_from is None
        if resume_from is not None:
            self.load(resume_from, allow_changes)
        else:
            self._claim_output_dir()
            torch.manual_seed(self.config.seed + self.place.rank)  # dropout and other in-model randomness
        for hook in self.hooks:
            hook.before_train(self)
        report = None
        for epoch in range(self.epoch, self.config.optim.epochs):
            metrics = self.train_epoch(epoch)
            report = self._end_of_epoch(epoch, metrics)
            if fresh and self.epoch == self.config.fault_drill_epoch:
                raise FaultDrill(f"fault drill after epoch {self.epoch} (fault_drill_epoch): resume from "
                                 f"{report.checkpoint or 'the checkpoint'} to continue")
        if report is None:  # resumed from the last epoch: nothing left to train; its metrics are the folder's
            report = EpochReport(self.epoch, json_metrics(Path(resume_from)), Path(resume_from), final=True)
        for hook in self.hooks:
            hook.after_train(self, report)
        return report.metrics

    def _claim_output_dir(self) -> None:
        existing = ckpt.list_checkpoints(self.checkpoint_root)
        if existing:
            raise OutputDirInUse(
                f"{self.output_dir} already holds a run ({len(existing)} checkpoints, the last {existing[-1].name}); "
                "resume it (python -m trainers ... --resume) or choose another output_dir: nothing was overwritten")
        if self.place.is_main:
            self.checkpoint_root.mkdir(parents=True, exist_ok=True)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over this rank's shard of the train split; returns train/ metrics."""
        self.model.train()
        self.hider.train()
        set_weight_decay(self.optimizer, self.config.optim, epoch)  # a 'multistep' stage may change it
        indices = self._train_indices(epoch)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = 0
        start = time.perf_counter()
        batches = self.data.train.batches(indices, self.rank_batch_size, train=True, epoch=epoch, seed=self.config.seed)
        for step, batch in enumerate(batches):
            images = self.normalize(batch.images, hide=True)
            labels = batch.labels.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config.optim.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            info = StepInfo(epoch, step, self.steps_per_epoch, loss.detach(), self.optimizer.param_groups[0]["lr"],
                            len(labels))
            for hook in self.hooks:
                hook.after_step(self, info)
        seconds = time.perf_counter() - start
        totals = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=self.device)]).cpu()
        totals = sum(gather_objects(self.place, totals))
        return {"train/loss": float(totals[0] / totals[2]), "train/cls_top1": float(totals[1] / totals[2] * 100),
                "train/lr": self.optimizer.param_groups[0]["lr"], "train/epoch_seconds": seconds,
                "train/images_per_second": float(totals[2]) / seconds}

    def _end_of_epoch(self, epoch: int, metrics: dict[str, float]) -> EpochReport:
        self.epoch = epoch + 1
        last = self.epoch == self.config.optim.epochs
        staging = ckpt.staging_dir(self.checkpoint_root, self.epoch) if self.place.is_main else None
        staging = broadcast_object(self.place, staging)
        artifacts: dict[str, Path] = {}
        metrics = {"epoch": float(self.epoch), **metrics}
        if self.epoch % self.config.eval.every == 0 or last:
            metrics.update(self.evaluate("val", self.config.eval.interval, staging / "artifacts", artifacts))
        if last:
            metrics.update(self.evaluate("test", self.config.eval.test_interval, staging / "artifacts", artifacts))
        published = None
        if self.place.is_main:
            state = {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                     "epoch": self.epoch, "rng": self._rng_state(), "config": self.config.to_dict()}
            ckpt.write_state(staging, state, self.config, metrics)
            published = ckpt.publish(staging, self.checkpoint_root, self.epoch, self.config.keep_checkpoints)
            artifacts = {name: published / path.relative_to(staging) for name, path in artifacts.items()}
        barrier(self.place)
        report = EpochReport(self.epoch, metrics, published, last, artifacts)
        for hook in self.hooks:
            hook.after_epoch(self, report)
        return report

    def load(self, directory: str | Path, allow_changes: frozenset[str] = frozenset()) -> None:
        """Continue from an epoch checkpoint folder of the same config (else a clear error)."""
        ckpt.check_resumable(directory, self.config, allow_changes)
        state = ckpt.read_state(directory)
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if allow_changes:  # hyperparameters of this config, not of the checkpoint's
            base = [self.config.optim.lr * group["lr_mult"] for group in self.optimizer.param_groups]
            self.scheduler.base_lrs = base
            for group, lr in zip(self.optimizer.param_groups, base):
                group["initial_lr"] = lr
                group["weight_decay"] = self.config.optim.weight_decay
        self.scaler.load_state_dict(state["scaler"])
        self._set_rng_state(state["rng"])
        self.epoch = int(state["epoch"])

    # ---- evaluation ------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: str, interval: float, artifacts_dir: Path | None = None,
                 artifacts: dict[str, Path] | None = None) -> dict[str, float]:
        """Metrics of `split` under flat names ('val/maxboxacc_v2', ...); artifacts on rank 0."""
        source = getattr(self.data, split)
        eval_config = self.config.eval
        evaluator = LocalizationEvaluator(split, interval=interval, iou_thresholds=eval_config.iou_thresholds,
                                          loc_fraction=eval_config.loc_fraction, workers=eval_config.workers)
        self.net.eval()
        shown = _Shown(eval_config.overlay_count if self.place.is_main else 0)
        indices = torch.arange(len(source))[self.place.rank::self.place.world_size]
        for batch in source.batches(indices, self.rank_batch_size, train=False, epoch=0, seed=self.config.seed):
            labels = batch.labels.to(self.device)
            cams, logits = self.eval_step(batch.images, labels)
            ids = [source.image_ids[i] for i in batch.indices.tolist()]
            masks = None if batch.masks is None else batch.masks.to(self.device)
            evaluator.update(cams, logits, labels, batch.boxes if source.has_boxes else None,
                             masks if source.has_masks else None, ids)
            shown.add(batch, cams, logits, ids)
        merged = LocalizationEvaluator(split, interval=interval, iou_thresholds=eval_config.iou_thresholds,
                                       loc_fraction=eval_config.loc_fraction)
        for state in gather_objects(self.place, evaluator.state()):
            merged.merge(state)
        evaluator.close()
        metrics = merged.compute()
        if artifacts_dir is not None and self.place.is_main:
            written = self._write_artifacts(split, merged, shown, artifacts_dir)
            if artifacts is not None:
                artifacts.update(written)
        return metrics

    @torch.no_grad()
    def eval_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CAMs (B, H, W) of `labels` and logits (B, K) of a uint8 batch, computed in float32.

        Never under autocast: bf16 features would quantise the maps whose thresholds the metrics sweep.
        """
        features = self.net.forward_features(self.normalize(images))  # (B, C, h, w)
        cams = class_activation_maps(features, self.net.classifier.weight, labels,
                                     (self.data.input_size, self.data.input_size))
        return cams, self.net.forward_head(features)

    def _write_artifacts(self, split: str, evaluator: LocalizationEvaluator, shown: _Shown, folder: Path) -> dict:
        rows = evaluator.per_image()
        written = {f"{split}_predictions": write_predictions(rows, folder / f"{split}_predictions.parquet",
                                                            split=split, epoch=self.epoch)}
        if "best_x0" in rows:
            curves = evaluator.box_accuracy_curves()
            title = f"{split}, epoch {self.epoch}: box accuracy vs CAM threshold"
            written[f"{split}_curve"] = accuracy_curve_plot(curves, title, folder / f"{split}_box_accuracy.png")
        if shown.count:
            order = {image_id: row for row, image_id in enumerate(rows["image_id"].tolist())}
            picked = [order[i] for i in shown.ids]
            predicted = (np.stack([rows[f"best_{k}"][picked] for k in ("x0", "y0", "x1", "y1")], axis=1)
                         if "best_x0" in rows else None)
            names, predicted_names = self.data.class_names, self.prediction_names
            captions = [f"{names[int(t)]} -> {predicted_names[int(p)]}" for t, p in zip(shown.labels, shown.predictions)]
            written[f"{split}_overlay"] = overlay_grid(shown.images(), shown.cam_array(), shown.boxes, predicted,
                                                       captions, folder / f"{split}_cam_overlay.png")
        return written


class _Shown:
    """The first images of an evaluation, kept for the CAM overlay grid."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ids: list[str] = []
        self._images: list[torch.Tensor] = []
        self._cams: list[torch.Tensor] = []
        self.boxes: list[np.ndarray] = []
        self.labels: list[int] = []
        self.predictions: list[int] = []

    @property
    def count(self) -> int:
        return len(self.ids)

    def add(self, batch, cams: torch.Tensor, logits: torch.Tensor, ids: list[str]) -> None:
        take = min(self.limit - self.count, len(batch.labels))
        if take <= 0:
            return
        self._images.append(batch.images[:take].cpu())
        self._cams.append(cams[:take].float().cpu())
        self.labels += batch.labels[:take].tolist()
        self.predictions += logits[:take].argmax(1).tolist()
        self.boxes += list(batch.boxes[:take]) if batch.boxes is not None else [np.zeros((0, 4))] * take
        self.ids += ids[:take]

    def images(self) -> np.ndarray:
        return torch.cat(self._images).permute(0, 2, 3, 1).numpy()

    def cam_array(self) -> np.ndarray:
        return torch.cat(self._cams).numpy()


def json_metrics(directory: Path) -> dict[str, float]:
    return json.loads((directory / "metrics.json").read_text())
