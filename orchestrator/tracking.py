"""MLflow tracking of a sweep, from the driver only: one parent run per sweep, one child per trial.

`SweepTracker` knows MLflow (find-or-create runs by tags, metrics per epoch, artifacts from the
trials' checkpoint folders); `MlflowCallback` feeds it from Ray Tune. Every write goes through a
`ResilientWriter` (several threads, in order per run, a bounded queue that overflows to a journal on
disk), so a tracking server that is slow or goes away delays writes instead of holding back or
failing the sweep.
Runs are found again by their tags (`sweep`, `trial_id`): a resumed sweep or a retried trial
continues its runs instead of making new ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
        self.config_digest: str | None = None  # the config.yaml in the run (the same every epoch: written once)


# The writer (orchestrator/tracking_queue.py): runs written at once to a tracking server (a local
# store, a sqlite file, takes one writer at a time: one thread), and writes held in memory before the
# next ones wait in a journal on disk. benchmarks/bench_tracking.py measures both.
WRITER_THREADS = 4
MAX_QUEUED_WRITES = 2000


class SweepTracker:
    """MLflow writes of one sweep; every call returns at once, the writer performs them (in order per run).

    Each call makes a record (JSON: what to write) and `_operation` turns a record into the writer's
    operation; the writer journals the records of operations past its bound and rebuilds them the
    same way when it reads them back."""

    def __init__(self, tracking_uri: str, sweep: str, spill_dir: Path, metric: str = "val/maxboxacc_v2",
                 mode: str = "max", log_model: str = "state_dict") -> None:
        quiet_mlflow_http()
        from mlflow import MlflowClient

        self.uri, self.sweep, self.metric, self.mode = tracking_uri, sweep, metric, mode
        self.model_format = log_model
        self.client = MlflowClient(tracking_uri)
        self.fetcher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="checkpoint-fetch")
        self.fetched = FetchCounter()  # bytes read from the trials' storage
        self.staging = Path(tempfile.mkdtemp(prefix=f"has-sweep-{sweep}-"))  # artifacts wait here until written
        self.parent = RunHandle("sweep")
        self.trials: dict[str, RunHandle] = {}
        self.experiment_id: str | None = None
        self._experiment_lock = threading.Lock()
        self._model_lock = threading.Lock()  # mlflow.pytorch.log_model uses the process's active run
        self._fetches: dict[str, tuple[Future, Callable[[], Path]]] = {}  # copies still being fetched, or failed
        self._gap_filesystems: dict[str, object] = {}  # trial -> the filesystem of its checkpoints (fill_gap)
        self.writer = ResilientWriter(spill_dir, threads=1 if is_local_uri(tracking_uri) else WRITER_THREADS,
                                      max_queued=MAX_QUEUED_WRITES, rebuild=self._operation)

    # ---- runs ----------------------------------------------------------------------------

    def _experiment(self) -> str:
        with self._experiment_lock:
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
        self.writer.submit(self._operation({"kind": "start_sweep", "tags": tags, "texts": files}))

    def start_trial(self, trial_id: str, label: str, params: dict[str, Any]) -> RunHandle:
        """Find or create the trial's child run (by its tags), with its flattened config as params."""
        if trial_id in self.trials:
            return self.trials[trial_id]
        handle = self.trials[trial_id] = RunHandle(label)
        self.writer.submit(self._operation({"kind": "start_trial", "trial_id": trial_id, "label": label,
                                            "params": {k: str(v)[:6000] for k, v in params.items()}}))
        return handle

    # ---- metrics and artifacts -----------------------------------------------------------

    def _staging_dir(self, trial_id: str, prefix: str) -> Path:
        """A new folder for files that wait to be written (removed once they are)."""
        (self.staging / trial_id).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.staging / trial_id))

    def log_metrics(self, trial_id: str, metrics: dict[str, float], step: int) -> None:
        """Metrics of one epoch (step = epoch); an epoch already in the run is not logged twice."""
        self.writer.submit(self._operation({"kind": "metrics", "trial_id": trial_id, "step": step,
                                            "metrics": {k: float(v) for k, v in metrics.items()},
                                            "timestamp": int(time.time() * 1000)}))

    def fill_gap(self, trial_id: str, step: int, checkpoints: CheckpointLocation) -> None:
        """Before the metrics of epoch `step`: epochs between the run's last logged one and `step`,
        from the trial's checkpoints (in the folder `checkpoints`). A driver killed while writes
        were queued loses them; the restored trial resumes after its last checkpoint, whose epoch
        would otherwise be missing from the run."""
        self._started(trial_id)
        self._gap_filesystems[trial_id] = checkpoints.filesystem
        self.writer.submit(self._operation({"kind": "gap", "trial_id": trial_id, "step": step,
                                            "folder": checkpoints.path}))

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
        self._started(trial_id)
        # A fresh folder per call: the same epoch can come twice (a PBT restart) while the first waits.
        copy = self._staging_dir(trial_id, "epoch-")
        self._fetch(copy, fetch_epoch_files, location, copy, self.fetched)
        self.writer.submit(self._operation({"kind": "artifacts", "trial_id": trial_id, "checkpoint": location.path,
                                            "copy": str(copy)}))

    def log_model(self, trial_id: str, location: CheckpointLocation) -> None:
        """The final model: its state_dict (or an MLflow PyTorch model when log_model='pytorch'),
        read from the trial's last checkpoint once."""
        self._started(trial_id)
        target = self._staging_dir(trial_id, "model-")
        self._fetch(target / MODEL, fetch_file, location, MODEL, target / MODEL, self.fetched)
        self.writer.submit(self._operation({"kind": "model", "trial_id": trial_id, "checkpoint": location.path,
                                            "target": str(target)}))

    def end_trial(self, trial_id: str, status: str, tags: dict[str, str]) -> None:
        """FINISHED or FAILED, with a `status` tag (completed, stopped_early, failed) and any others."""
        if trial_id not in self.trials:
            return
        self.writer.submit(self._operation({"kind": "end_trial", "trial_id": trial_id, "status": status,
                                            "tags": tags}))

    def log_parent_files(self, folder: Path, artifact_path: str) -> None:
        self.writer.submit(self._operation({"kind": "report", "folder": str(folder), "artifact_path": artifact_path}))

    def end_sweep(self, status: str = "FINISHED", flush_timeout: float = 120.0) -> str | None:
        """End the parent run, wait for every write; a summary of what could not be written, if any."""
        self.writer.submit(self._operation({"kind": "end_sweep", "status": status}))
        summary = self.writer.close(flush_timeout)
        self.fetcher.shutdown(wait=False, cancel_futures=True)
        if summary is None:  # everything written: the copies are no longer needed
            shutil.rmtree(self.staging, ignore_errors=True)
        return summary

    def _started(self, trial_id: str) -> None:
        if trial_id not in self.trials:  # an error here, on the caller's side, not in the writer
            raise KeyError(f"trial {trial_id} was not started (start_trial)")

    # ---- fetches: on the pool at once, the writer takes the copy -------------------------

    def _fetch(self, target: Path, fetch: Callable[..., Path], *args) -> None:
        """Start copying a checkpoint's files to `target`; forgotten once done (the copy is there),
        kept when it failed (the writer tries once more)."""
        key = str(target)
        future = self.fetcher.submit(fetch, *args)
        self._fetches[key] = (future, lambda: fetch(*args))
        future.add_done_callback(
            lambda done: None if done.cancelled() or done.exception() else self._fetches.pop(key, None))

    def _fetched(self, target: Path) -> Path:
        """The copy at `target`, once fetched (a failed fetch: one more try now, in the writer)."""
        entry = self._fetches.get(str(target))
        if entry is not None:
            _result_or_again(*entry)
            self._fetches.pop(str(target), None)
        return target

    # ---- records -> the writer's operations ----------------------------------------------

    def _operation(self, record: dict) -> Operation:
        return getattr(self, f"_op_{record['kind']}")(record)

    def _op_start_sweep(self, record: dict) -> Operation:
        tags, files = record["tags"], record["texts"]

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
        # A barrier: the children's runs need the parent's id.
        return Operation(f"parent run of sweep {self.sweep}", perform, record, key="sweep", barrier=True)

    def _op_start_trial(self, record: dict) -> Operation:
        trial_id, label, params = record["trial_id"], record["label"], record["params"]
        handle = self.trials[trial_id]

        def perform() -> None:
            from mlflow.entities import Param

            run = self._find({ROLE_TAG: "trial", SWEEP_TAG: self.sweep, TRIAL_TAG: trial_id})
            if run is None:
                run = self.client.create_run(self._experiment(), run_name=label, tags={
                    ROLE_TAG: "trial", SWEEP_TAG: self.sweep, TRIAL_TAG: trial_id,
                    "mlflow.parentRunId": self.parent.run_id or "", "status": "running"})
                self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            else:  # a resumed sweep or a retried trial: the same run goes on
                self.client.update_run(run.info.run_id, status="RUNNING")
                self.client.set_tag(run.info.run_id, "status", "running")
                history = self.client.get_metric_history(run.info.run_id, "epoch")
                handle.last_step = max((int(m.step) for m in history), default=0)
            handle.run_id = run.info.run_id
        return Operation(f"child run of trial {trial_id}", perform, record, key=f"trial {trial_id}")

    def _op_metrics(self, record: dict) -> Operation:
        trial_id = record["trial_id"]
        handle = self.trials[trial_id]
        return Operation(f"metrics of epoch {record['step']} of trial {trial_id}",
                         lambda: self._log_epochs(handle, [record]), record, key=f"trial {trial_id}",
                         combine=self._combine_metrics)

    def _combine_metrics(self, operations: list[Operation]) -> Operation:
        """The metrics of several epochs of one trial (queued behind each other): one request."""
        records = [op.record for op in operations]
        handle = self.trials[records[0]["trial_id"]]
        return Operation(f"metrics of epochs {records[0]['step']}-{records[-1]['step']} of trial "
                         f"{records[0]['trial_id']}", lambda: self._log_epochs(handle, records),
                         {"kind": "metrics", "records": records}, key=operations[0].key)

    def _log_epochs(self, handle: RunHandle, records: list[dict]) -> None:
        """log_batch of these epochs' metrics (1000 values a request at most, MLflow's limit), skipping
        epochs already in the run; an interrupted retry goes on after the last one written."""
        from mlflow.entities import Metric

        batch, last = [], handle.last_step
        for record in records:
            if record["step"] <= last:
                continue  # logged before the sweep was interrupted (or earlier in this batch)
            metrics = [Metric(k, v, record["timestamp"], record["step"]) for k, v in record["metrics"].items()]
            if batch and len(batch) + len(metrics) > 1000:
                self.client.log_batch(handle.run_id, metrics=batch)
                handle.last_step, batch = last, []  # (the last epoch of that batch)
            batch += metrics
            last = record["step"]
        if batch:
            self.client.log_batch(handle.run_id, metrics=batch)
            handle.last_step = last

    def _op_gap(self, record: dict) -> Operation:
        trial_id, step, folder = record["trial_id"], record["step"], record["folder"]
        handle = self.trials[trial_id]

        def perform() -> None:
            import pyarrow.fs as pafs

            if step - 1 <= handle.last_step or trial_id not in self._gap_filesystems:
                return  # nothing missing (the usual case)
            filesystem = self._gap_filesystems[trial_id]
            found = []
            for info in filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                    continue
                try:
                    with filesystem.open_input_stream(f"{info.path}/metrics.json") as stream:
                        metrics = json.loads(stream.read())
                except (OSError, ValueError):
                    continue  # half-written or deleted meanwhile
                if handle.last_step < int(metrics.get("epoch", 0)) < step:
                    found.append((int(metrics["epoch"]), info.path, metrics))
            stamp = int(time.time() * 1000)
            for epoch, path, metrics in sorted(found):
                logged = {k: float(v) for k, v in metrics.items() if (k == "epoch" or "/" in k)
                          and isinstance(v, (int, float)) and not isinstance(v, bool)}
                self._log_epochs(handle, [{"step": epoch, "metrics": logged, "timestamp": stamp}])
                copy = self._staging_dir(trial_id, "epoch-")
                fetch_epoch_files(CheckpointLocation(filesystem, path), copy, self.fetched)
                self._op_artifacts({"kind": "artifacts", "trial_id": trial_id, "checkpoint": path,
                                    "copy": str(copy)}).perform()
            if found:
                log.warning("tracking: epochs %s of trial %s were missing from its run (a driver stopped before "
                            "writing them, or Tune dropped a result); written from its checkpoints", [e for e, _, _ in sorted(found)], trial_id)
        return Operation(f"missing epochs before {step} of trial {trial_id}", perform, record, key=f"trial {trial_id}")

    def _op_artifacts(self, record: dict) -> Operation:
        trial_id, copy = record["trial_id"], Path(record["copy"])
        handle = self.trials[trial_id]

        def perform() -> None:
            folder = self._fetched(copy)
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
            config = folder / "config.yaml"
            if config.exists():  # the same every epoch (unless PBT changes it): written when it changes
                digest = hashlib.sha256(config.read_bytes()).hexdigest()
                if digest != handle.config_digest:
                    self.client.log_artifact(run_id, str(config))
                    handle.config_digest = digest
            shutil.rmtree(folder, ignore_errors=True)
        return Operation(f"artifacts of {record['checkpoint']} of trial {trial_id}", perform, record, [copy],
                         key=f"trial {trial_id}")

    def _op_model(self, record: dict) -> Operation:
        trial_id, target = record["trial_id"], Path(record["target"])
        handle = self.trials[trial_id]

        def perform() -> None:
            import torch

            state_file = self._fetched(target / MODEL)
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
                model = build_backbone(run_config.model.backbone, _num_classes(weights),
                                       large_feature_map=run_config.model.large_feature_map)
                model.load_state_dict(weights)
                with self._model_lock, _active_run(self.uri, handle.run_id):
                    mlflow.pytorch.log_model(model, name="model")
            else:
                self.client.log_artifact(handle.run_id, str(target / "state_dict.pt"), "model")
            shutil.rmtree(target, ignore_errors=True)
        return Operation(f"final model of trial {trial_id}", perform, record, [target], key=f"trial {trial_id}")

    def _op_end_trial(self, record: dict) -> Operation:
        trial_id, status, tags = record["trial_id"], record["status"], record["tags"]
        handle = self.trials[trial_id]

        def perform() -> None:
            for key, value in tags.items():
                self.client.set_tag(handle.run_id, key, value)
            self.client.set_terminated(handle.run_id, status)
        return Operation(f"end of trial {trial_id}", perform, record, key=f"trial {trial_id}")

    def _op_report(self, record: dict) -> Operation:
        folder, artifact_path = Path(record["folder"]), record["artifact_path"]

        def perform() -> None:
            self.client.log_artifacts(self.parent.run_id, str(folder), artifact_path)
        return Operation(f"report of sweep {self.sweep}", perform, record, [folder], key="sweep")

    def _op_end_sweep(self, record: dict) -> Operation:
        status = record["status"]

        def perform() -> None:
            self.client.set_terminated(self.parent.run_id, status)
        # A barrier: the parent ends after every write of the sweep.
        return Operation(f"end of sweep {self.sweep}", perform, record, key="sweep", barrier=True)


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
