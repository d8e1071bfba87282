"""MLflow tracking of a sweep, from the driver only: one parent run per sweep, one child per trial.

`SweepTracker` knows MLflow (find-or-create runs by tags, metrics per epoch, artifacts from the
trials' checkpoint folders); `MlflowCallback` feeds it from Ray Tune. Every write goes through a
`ResilientWriter`, so a tracking server that goes away delays writes instead of failing the sweep.
Runs are found again by their tags (`sweep`, `trial_id`): a resumed sweep or a retried trial
continues its runs instead of making new ones.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from orchestrator.checkpoint_files import MODEL, CheckpointLocation, FetchCounter, fetch_epoch_files, fetch_file
from orchestrator.tracking_queue import Operation, ResilientWriter

log = logging.getLogger(__name__)

ROLE_TAG, SWEEP_TAG, TRIAL_TAG = "has_sweep.role", "sweep", "trial_id"
URI_ENV = "HAS_SWEEP_TRACKING_URI"  # how the driver hands the URI to a restored callback
# Written by cluster/start_mlflow.sh where it started the server (the head node, $MLFLOW_HOME).
CLUSTER_URI_FILE = Path(os.environ.get("MLFLOW_HOME", "/home/ray/mlflow")) / "tracking_uri"
LOCAL_SCHEMES = ("sqlite:", "file:", "/", ".")


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI; else the server cluster/start_mlflow.sh started on this node; else MLflow's
    own default, sqlite:///mlflow.db in the working directory (so `mlflow ui` there shows it)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if CLUSTER_URI_FILE.is_file() and CLUSTER_URI_FILE.read_text().strip():
        return CLUSTER_URI_FILE.read_text().strip()
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def is_local_uri(uri: str) -> bool:
    return uri.startswith(LOCAL_SCHEMES) or "://" not in uri


def cluster_uri_hint() -> str:
    if CLUSTER_URI_FILE.is_file():
        return f"--tracking-uri {CLUSTER_URI_FILE.read_text().strip()} (the server cluster.yaml started)"
    return "--tracking-uri http://<head private address>:5000, the server cluster.yaml starts on the head"


def quiet_mlflow_http() -> None:
    """Fail fast on an unreachable server: the writer retries, without blocking in MLflow's own retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent)
        return done.stdout.strip() or None if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import mlflow
    import ray
    import torch

    return {"ray_version": ray.__version__, "torch_version": torch.__version__, "mlflow_version": mlflow.__version__}


class RunHandle:
    """A run that may not exist yet: operations fill `run_id` in order, before they use it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.run_id: str | None = None
        self.last_step = 0  # metrics of epochs <= this are already in the run
        self.best: float | None = None


class SweepTracker:
    """MLflow writes of one sweep; every call returns at once, the writer performs them in order."""

    def __init__(self, tracking_uri: str, sweep: str, spill_dir: Path, metric: str = "val/maxboxacc_v2",
                 mode: str = "max", log_model: str = "state_dict") -> None:
        quiet_mlflow_http()
        from mlflow import MlflowClient

        self.uri, self.sweep, self.metric, self.mode = tracking_uri, sweep, metric, mode
        self.model_format = log_model
        self.client = MlflowClient(tracking_uri)
        self.writer = ResilientWriter(spill_dir)
        self.fetcher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="checkpoint-fetch")
        self.fetched = FetchCounter()  # bytes read from the trials' storage
        self.staging = Path(tempfile.mkdtemp(prefix=f"has-sweep-{sweep}-"))  # artifacts wait here until written
        self.parent = RunHandle("sweep")
        self.trials: dict[str, RunHandle] = {}
        self.experiment_id: str | None = None

    # ---- runs ----------------------------------------------------------------------------

    def _experiment(self) -> str:
        if self.experiment_id is None:
            found = self.client.get_experiment_by_name(self.sweep)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(self.sweep)
        return self.experiment_id

    def _find(self, tags: dict[str, str]) -> Any:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self._experiment()], query, max_results=2, order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def start_sweep(self, tags: dict[str, str], files: dict[str, str]) -> None:
        """Find or create the sweep's parent run, RUNNING; tags and files (name -> text) logged on it."""
        def perform() -> None:
            run = self._find({ROLE_TAG: "sweep", SWEEP_TAG: self.sweep})
            if run is None:
                run = self.client.create_run(self._experiment(), run_name=self.sweep,
                                             tags={ROLE_TAG: "sweep", SWEEP_TAG: self.sweep, **tags})
            else:
                self.client.update_run(run.info.run_id, status="RUNNING")
                for key, value in tags.items():
                    self.client.set_tag(run.info.run_id, key, value)
            self.parent.run_id = run.info.run_id
            for name, text in files.items():
                self.client.log_text(run.info.run_id, text, f"sweep/{name}")
        self.writer.submit(Operation(f"parent run of sweep {self.sweep}", perform, {"kind": "start_sweep", "tags": tags}))

    def start_trial(self, trial_id: str, label: str, params: dict[str, Any]) -> RunHandle:
        """Find or create the trial's child run (by its tags), with its flattened config as params."""
        if trial_id in self.trials:
            return self.trials[trial_id]
        handle = self.trials[trial_id] = RunHandle(label)

        def perform() -> None:
            from mlflow.entities import Param

            run = self._find({ROLE_TAG: "trial", SWEEP_TAG: self.sweep, TRIAL_TAG: trial_id})
            if run is None:
                run = self.client.create_run(self._experiment(), run_name=label, tags={
                    ROLE_TAG: "trial", SWEEP_TAG: self.sweep, TRIAL_TAG: trial_id,
                    "mlflow.parentRunId": self.parent.run_id or "", "status": "running"})
                self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
            else:  # a resumed sweep or a retried trial: the same run goes on
                self.client.update_run(run.info.run_id, status="RUNNING")
                self.client.set_tag(run.info.run_id, "status", "running")
                history = self.client.get_metric_history(run.info.run_id, "epoch")
                handle.last_step = max((int(m.step) for m in history), default=0)
            handle.run_id = run.info.run_id
        self.writer.submit(Operation(f"child run of trial {trial_id}", perform,
                                     {"kind": "start_trial", "trial_id": trial_id, "params": params}))
        return handle

    # ---- metrics and artifacts -----------------------------------------------------------

    def _staging_dir(self, trial_id: str, prefix: str) -> Path:
        """A new folder for files that wait to be written (removed once they are)."""
        (self.staging / trial_id).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.staging / trial_id))

    def log_metrics(self, trial_id: str, metrics: dict[str, float], step: int) -> None:
        """Metrics of one epoch (step = epoch); an epoch already in the run is not logged twice."""
        handle = self.trials[trial_id]
        stamp = int(time.time() * 1000)

        def perform() -> None:
            from mlflow.entities import Metric

            if step <= handle.last_step:
                return  # logged before the sweep was interrupted
            self.client.log_batch(handle.run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in metrics.items()])
            handle.last_step = step
        self.writer.submit(Operation(f"metrics of epoch {step} of trial {trial_id}", perform,
                                     {"kind": "metrics", "trial_id": trial_id, "step": step, "metrics": metrics}))

    def is_best(self, trial_id: str, metrics: dict[str, float]) -> bool:
        """Whether these metrics are the trial's best so far on the sweep's metric (and remember them)."""
        handle = self.trials[trial_id]
        value = metrics.get(self.metric)
        if value is None:
            return False
        if handle.best is None or (value > handle.best if self.mode == "max" else value < handle.best):
            handle.best = value
            return True
        return False

    def log_evaluation(self, trial_id: str, location: CheckpointLocation) -> None:
        """The artifacts of one epoch's checkpoint: pictures of every evaluation, the last and best
        predictions, the config. Only those files are read from storage, at once on the fetch pool
        (Tune may delete old checkpoints while a write waits for the server), never the model."""
        handle = self.trials[trial_id]
        # A fresh folder per call: the same epoch can come twice (a PBT restart) while the first waits.
        copy = self._staging_dir(trial_id, "epoch-")
        fetched = self.fetcher.submit(fetch_epoch_files, location, copy, self.fetched)

        def perform() -> None:
            folder = _result_or_again(fetched, lambda: fetch_epoch_files(location, copy, self.fetched))
            metrics = json.loads((folder / "metrics.json").read_text())
            epoch = int(metrics.get("epoch", 0))
            best = self.is_best(trial_id, metrics)
            run_id = handle.run_id
            artifacts = folder / "artifacts"
            for picture in sorted(artifacts.glob("*.png")):
                self.client.log_artifact(run_id, str(picture), f"evaluations/epoch_{epoch:04d}")
            for table in sorted(artifacts.glob("*.parquet")):
                self.client.log_artifact(run_id, str(table), "predictions/last")
                if best:
                    self.client.log_artifact(run_id, str(table), "predictions/best")
            if (folder / "config.yaml").exists():
                self.client.log_artifact(run_id, str(folder / "config.yaml"))
            shutil.rmtree(folder, ignore_errors=True)
        self.writer.submit(Operation(f"artifacts of {location.path} of trial {trial_id}", perform,
                                     {"kind": "artifacts", "trial_id": trial_id, "checkpoint": location.path}, [copy]))

    def log_model(self, trial_id: str, location: CheckpointLocation) -> None:
        """The final model: its state_dict (or an MLflow PyTorch model when log_model='pytorch'),
        read from the trial's last checkpoint once."""
        handle = self.trials[trial_id]
        target = self._staging_dir(trial_id, "model-")
        fetched = self.fetcher.submit(fetch_file, location, MODEL, target / MODEL, self.fetched)

        def perform() -> None:
            import torch

            state_file = _result_or_again(fetched, lambda: fetch_file(location, MODEL, target / MODEL, self.fetched))
            if not (target / "state_dict.pt").exists():
                state = torch.load(state_file, map_location="cpu", weights_only=True)
                torch.save(state["model"], target / "state_dict.pt")
                (target / "config.json").write_text(json.dumps(state["config"]))
                state_file.unlink()
            if self.model_format == "pytorch":
                import mlflow.pytorch

                from trainers.backbones import build_backbone
                from trainers.config import RunConfig

                weights = torch.load(target / "state_dict.pt", map_location="cpu", weights_only=True)
                run_config = RunConfig.from_dict(json.loads((target / "config.json").read_text()))
                model = build_backbone(run_config.model.backbone, _num_classes(weights))
                model.load_state_dict(weights)
                with _active_run(self.uri, handle.run_id):
                    mlflow.pytorch.log_model(model, name="model")
            else:
                self.client.log_artifact(handle.run_id, str(target / "state_dict.pt"), "model")
            shutil.rmtree(target, ignore_errors=True)
        self.writer.submit(Operation(f"final model of trial {trial_id}", perform,
                                     {"kind": "model", "trial_id": trial_id, "checkpoint": location.path}, [target]))

    def end_trial(self, trial_id: str, status: str, tags: dict[str, str]) -> None:
        """FINISHED or FAILED, with a `status` tag (completed, stopped_early, failed) and any others."""
        handle = self.trials.get(trial_id)
        if handle is None:
            return

        def perform() -> None:
            for key, value in tags.items():
                self.client.set_tag(handle.run_id, key, value)
            self.client.set_terminated(handle.run_id, status)
        self.writer.submit(Operation(f"end of trial {trial_id}", perform,
                                     {"kind": "end_trial", "trial_id": trial_id, "status": status, "tags": tags}))

    def log_parent_files(self, folder: Path, artifact_path: str) -> None:
        def perform() -> None:
            self.client.log_artifacts(self.parent.run_id, str(folder), artifact_path)
        self.writer.submit(Operation(f"report of sweep {self.sweep}", perform, {"kind": "report"}, [folder]))

    def end_sweep(self, status: str = "FINISHED", flush_timeout: float = 120.0) -> str | None:
        """End the parent run, wait for every write; a summary of what could not be written, if any."""
        def perform() -> None:
            self.client.set_terminated(self.parent.run_id, status)
        self.writer.submit(Operation(f"end of sweep {self.sweep}", perform, {"kind": "end_sweep", "status": status}))
        summary = self.writer.close(flush_timeout)
        self.fetcher.shutdown(wait=False, cancel_futures=True)
        if summary is None:  # everything written: the copies are no longer needed
            shutil.rmtree(self.staging, ignore_errors=True)
        return summary


def _result_or_again(future, again):
    """A fetch's result; if it failed (storage away for a moment), one more try now, in the writer."""
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - the second try raises what is still wrong
        return again()


def _num_classes(state_dict: dict) -> int:
    return int(state_dict["classifier.weight"].shape[0])


class _active_run:
    """mlflow.pytorch.log_model logs to the active run: make the trial's run active for a moment."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id

    def __enter__(self):
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        self.run = mlflow.start_run(run_id=self.run_id)
        return self.run

    def __exit__(self, *exc) -> None:
        import mlflow

        mlflow.end_run()  # the trial's own end (end_trial, queued after this) sets its final status
