"""The Tune trainable: one trial = one trainers run, in-process or as a multi-worker TorchTrainer.

In-process (resources.workers == 1): the engine runs inside the Tune function and reports every
epoch's metrics with its checkpoint folder (tune.report). A retried or restored trial continues
from tune.get_checkpoint().

Multi-worker (workers > 1): the Tune function starts a Ray Train TorchTrainer (DDP; gloo on CPU)
whose workers run the same engine; rank 0's metrics reach Tune through TuneReportCallback, the
checkpoints live in the Train run, which resumes from its latest one when the trial is retried.
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.search import resolve, trial_values
from orchestrator.spaces import SweepSpec
from trainers.config import RunConfig
from trainers.engine import EpochReport, Hook, Trainer

def reportable(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics Tune can store and compare (finite floats)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class ReportHook(Hook):
    """Reports every epoch to Tune / Train. A trial restored from its last epoch's checkpoint (the
    driver was killed after the checkpoint was saved, before Tune saw the trial end) trains nothing:
    its final metrics are reported once more, so that Tune's last result (the progress table, the
    scheduler, the run's 'completed' status and model) is the final epoch's."""

    again_with_checkpoint = False  # whether that repeat carries the restored checkpoint

    def before_train(self, trainer: Trainer) -> None:
        self.reported = False

    def after_epoch(self, trainer: Trainer, report: EpochReport) -> None:
        self.report(trainer, report.metrics, report.checkpoint)
        self.reported = True

    def after_train(self, trainer: Trainer, report: EpochReport) -> None:
        if not self.reported:
            self.report(trainer, report.metrics, report.checkpoint if self.again_with_checkpoint else None)

    def report(self, trainer: Trainer, metrics: dict[str, float], folder: Path | None) -> None:
        raise NotImplementedError


class TuneReportHook(ReportHook):
    """In-process trials: tune.report every epoch, with the epoch's checkpoint folder (a repeat of the
    final epoch without: the trial's checkpoint is already that one)."""

    def report(self, trainer: Trainer, metrics: dict[str, float], folder: Path | None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder else None
        tune.report(reportable(metrics), checkpoint=checkpoint)


class TrainReportHook(ReportHook):
    """Multi-worker trials: ray.train.report on every rank, the checkpoint from rank 0 only. A repeat
    of the final epoch carries its checkpoint again (uploaded once more): Tune knows a Train run's
    checkpoint only from its result (checkpoint_path), and the driver logs the model from there."""

    again_with_checkpoint = True

    def report(self, trainer: Trainer, metrics: dict[str, float], folder: Path | None) -> None:
        import ray.train

        checkpoint = None
        if trainer.place.is_main and folder is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(reportable(metrics), checkpoint=checkpoint)


def _quiet_ray_logs() -> None:
    """One line per checkpoint per trial drowns the progress table: keep Ray's warnings only."""
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # Ray Train V2 logs every report at INFO under a logger named by its file path
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def _local_run_dir(name: str) -> Path:
    """Scratch space of the engine for this call on this node (Tune / Train keep the checkpoints that
    matter). Unique per call: a paused trial's old process may still be writing into its own."""
    return Path(tempfile.mkdtemp(prefix=f"{name.replace('/', '-')}-", dir=_scratch_root()))


def _scratch_root() -> Path:
    root = Path(tempfile.gettempdir()) / "has-sweep"
    root.mkdir(parents=True, exist_ok=True)
    return root


def run_trial(params: dict[str, Any], spec: SweepSpec) -> None:
    """The Tune function of an in-process trial."""
    from ray import tune

    _quiet_ray_logs()
    config = resolve(spec, trial_values(spec, params))
    context = tune.get_context()
    run_dir = _local_run_dir(f"{spec.name}/{context.get_trial_id()}")
    checkpoint = tune.get_checkpoint()
    config = config.replace(output_dir=str(run_dir), progress=False, keep_checkpoints=1)
    trainer = Trainer(config, hooks=[TuneReportHook()])
    try:
        if checkpoint is None:
            trainer.fit()
            return
        # PBT hands over another trial's weights with mutated values: those keys may differ.
        allow = frozenset(spec.random_keys) if spec.fields.scheduler.name == "pbt" else frozenset()
        with checkpoint.as_directory() as folder:
            trainer.fit(resume_from=folder, allow_changes=allow)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # every reported checkpoint is in Tune's storage now


def _train_worker(loop_config: dict[str, Any]) -> None:
    """A Ray Train worker: the engine under the torch.distributed group Ray Train set up."""
    import ray.train
    import ray.train.torch

    _quiet_ray_logs()
    context = ray.train.get_context()
    config = RunConfig.from_dict(loop_config["run"])
    device = ray.train.torch.get_device()
    run_dir = _local_run_dir(f"{loop_config['name']}/rank{context.get_world_rank()}")
    checkpoint = ray.train.get_checkpoint()
    config = config.replace(output_dir=str(run_dir), progress=False, keep_checkpoints=1, device=str(device))
    trainer = Trainer(config, hooks=[TrainReportHook()])
    try:
        if checkpoint is None:
            trainer.fit()
        else:
            with checkpoint.as_directory() as folder:
                trainer.fit(resume_from=folder)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_multiworker_trial(params: dict[str, Any], spec: SweepSpec, storage_path: str) -> None:
    """The Tune function of a DDP trial: a TorchTrainer of resources.workers workers."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    _quiet_ray_logs()
    config = resolve(spec, trial_values(spec, params))
    resources = spec.fields.resources
    trial_id = tune.get_context().get_trial_id()
    name = f"{spec.name}-train-{trial_id}"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"run": config.to_dict(), "name": name},
        torch_config=TorchConfig(backend="nccl" if resources.gpus > 0 else "gloo"),
        # All workers of a trial on one node (NVLink / PCIe between its GPUs, not the network); the
        # pre-launch check refuses a trial no node can hold whole.
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=resources.gpus > 0,
                                     resources_per_worker=resources.per_worker(), placement_strategy="STRICT_PACK"),
        # The same name and storage on a retry: Ray Train resumes the run from its latest checkpoint.
        # Retries are Tune's (max_failures): none here, else a failure would be retried at both levels.
        # The latest two epochs are kept (the newest may be half-uploaded when a node dies).
        run_config=TrainRunConfig(name=name, storage_path=storage_path, callbacks=[TuneReportCallback()],
                                  failure_config=FailureConfig(max_failures=0),
                                  checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()
