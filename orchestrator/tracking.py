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

from orchestrator.dataset_input import dataset_input
from orchestrator.checkpoint_files import (MODEL, CheckpointLocation, FetchCounter, checkpoint_metrics,
                                          fetch_epoch_files, fetch_file, result_rows)
from orchestrator.tracking_queue import Operation, ResilientWriter

log = logging.getLogger(__name__)

ROLE_TAG, SWEEP_TAG, SWEEP_ID_TAG, TRIAL_TAG = "has_sweep.role", "sweep", "sweep_id", "trial_id"
URI_ENV = "HAS_SWEEP_TRACKING_URI"  # how the driver hands the URI to a restored callback
# Written by cluster/start_mlflow.sh where it started the server (the head node, $MLFLOW_HOME).
CLUSTER_URI_FILE = Path(os.environ.get("MLFLOW_HOME", "/home/ray/mlflow")) / "tracking_uri"
LOCAL_SCHEMES = ("sqlite:", "file:", "/", ".")
# Model training, not GenAI: MLflow 3 UIs up to the side-bar's layout switch (3.7 has none) read this tag to
# choose the experiment's layout; 3.17's reads the switch instead (UI_LAYOUT_QUERY).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: "custom_model_development"}


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI; else the server cluster/start_mlflow.sh started on this node; else MLflow's
    own default, sqlite:///mlflow.db in the working directory (so `mlflow ui` there shows it)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if CLUSTER_URI_FILE.is_file() and CLUSTER_URI_FILE.read_text().strip():
        return CLUSTER_URI_FILE.read_text().strip()
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


# MLflow 3.17's UI chooses an experiment's layout by its side-bar switch (this query, else the browser's
# last choice, else GenAI), not by the experiment kind tag: links carry it (tests/test_mlflow_ui.py).
UI_LAYOUT_QUERY = "workflowType=machine_learning"


def experiment_link(uri: str, experiment_id: str) -> str:
    """Where the UI shows the sweep's runs in the model-training layout: the server's address, or the
    path in the UI `mlflow ui` serves for a local store."""
    path = f"/#/experiments/{experiment_id}/runs?{UI_LAYOUT_QUERY}"
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/") + path
    return f"`mlflow ui` in {Path(uri.removeprefix('sqlite:///')).parent}, then http://127.0.0.1:5000{path}"


def ensure_experiment(client, name: str) -> str:
    """The experiment of a sweep, made with its tags if new (and tagged if an older one lacks them)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, tags=EXPERIMENT_TAGS)
    if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_TAGS[EXPERIMENT_KIND_TAG]:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_TAGS[EXPERIMENT_KIND_TAG])
    return found.experiment_id


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


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags, as its fluent API sets them for a script: the UI shows them in
    each run's header (who ran it, from what, at which commit)."""
    import getpass

    tags = {"mlflow.source.name": "orchestrator.sweep", "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        pass
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def versions() -> dict[str, str]:
    import mlflow
    import ray
    import torch

    return {"ray_version": ray.__version__, "torch_version": torch.__version__, "mlflow_version": mlflow.__version__}


def engine_metrics(result: dict) -> dict[str, float]:
    """The engine's metrics in a result or a checkpoint's metrics.json (split/name keys and the
    epoch), as floats: what a trial's run logs each epoch."""
    return {k: float(v) for k, v in result.items()
            if (k == "epoch" or "/" in k) and isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunHandle:
    """A run that may not exist yet: operations fill `run_id` in order, before they use it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.run_id: str | None = None
        self.last_step = 0  # metrics of epochs <= this are already in the run
        self.best: float | None = None
        self.config_digest: str | None = None  # the config.yaml in the run (the same every epoch: written once)
        self.dataset: dict[str, str] | None = None  # name, source, digest of the trial's data
        self.model_id: str | None = None  # its MLflow logged model, once written


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
                 mode: str = "max", log_model: str = "mlflow", sweep_id: str | None = None) -> None:
        quiet_mlflow_http()
        from mlflow import MlflowClient

        self.uri, self.sweep, self.metric, self.mode = tracking_uri, sweep, metric, mode
        self.model_format = "mlflow" if log_model == "pytorch" else log_model
        # The sweep's runs are found by its id (kept in its state in storage), not its name: a new
        # sweep of the same name gets its own parent run; a resumed one, moved or not, its old one.
        self.identity = {SWEEP_TAG: sweep, **({SWEEP_ID_TAG: sweep_id} if sweep_id else {})}
        self.source = source_tags()
        self.client = MlflowClient(tracking_uri)
        self.fetcher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="checkpoint-fetch")
        self.fetched = FetchCounter()  # bytes read from the trials' storage
        self.staging = Path(tempfile.mkdtemp(prefix=f"has-sweep-{sweep}-"))  # artifacts wait here until written
        self.parent = RunHandle("sweep")
        self.trials: dict[str, RunHandle] = {}
        self.experiment_id: str | None = None
        self._experiment_lock = threading.Lock()
        self._dataset_lock = threading.Lock()
        self._model_lock = threading.Lock()  # mlflow.pytorch.log_model uses the process's tracking URI
        # The format is chosen on purpose (see _log_logged_model): not a warning per trial.
        logging.getLogger("mlflow.pytorch").addFilter(_PICKLE_NOTICE)  # one filter, however many trackers
        self._fetches: dict[str, tuple[Future, Callable[[], Path]]] = {}  # copies still being fetched, or failed
        self._gap_filesystems: dict[str, tuple] = {}  # trial -> filesystems of its checkpoints, results (fill_gap)
        self.writer = ResilientWriter(spill_dir, threads=1 if is_local_uri(tracking_uri) else WRITER_THREADS,
                                      max_queued=MAX_QUEUED_WRITES, rebuild=self._operation)

    # ---- runs ----------------------------------------------------------------------------

    def _experiment(self) -> str:
        with self._experiment_lock:
            if self.experiment_id is None:
                self.experiment_id = ensure_experiment(self.client, self.sweep)
            return self.experiment_id

    def _find(self, tags: dict[str, str]) -> Any:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self._experiment()], query, max_results=2, order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def start_sweep(self, tags: dict[str, str], files: dict[str, str]) -> None:
        """Find or create the sweep's parent run, RUNNING; tags and files (name -> text) logged on it."""
        self.writer.submit(self._operation({"kind": "start_sweep", "tags": tags, "texts": files}))

    def start_trial(self, trial_id: str, label: str, params: dict[str, Any],
                    dataset: dict[str, str] | None = None) -> RunHandle:
        """Find or create the trial's child run (by its tags), with its flattened config as params and
        its dataset (name, source, digest: see orchestrator/datasets_input.py) as an MLflow input."""
        if trial_id in self.trials:
            return self.trials[trial_id]
        handle = self.trials[trial_id] = RunHandle(label)
        handle.dataset = dataset
        self.writer.submit(self._operation({"kind": "start_trial", "trial_id": trial_id, "label": label,
                                            "params": {k: str(v)[:6000] for k, v in params.items()},
                                            "dataset": dataset}))
        return handle

    def log_mutation(self, trial_id: str, changes: dict[str, tuple[Any, Any]], step: int) -> None:
        """A PBT mutation: the trial goes on from epoch `step` with new values (key -> (old, new)).
        MLflow params cannot change, so the run keeps its starting values as params; each mutated
        key gets a tag `mutated.<key>` with its history and, when numeric, a metric `mutated/<key>`
        (the old value at the run's first epoch, the new one from `step`) that charts the schedule."""
        self._started(trial_id)
        self.writer.submit(self._operation({"kind": "mutation", "trial_id": trial_id, "step": step,
                                            "changes": {k: [str(o), str(n)] for k, (o, n) in changes.items()}}))

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

    def fill_gap(self, trial_id: str, step: int, checkpoints: CheckpointLocation | None,
                 results: CheckpointLocation | None = None) -> None:
        """Before the metrics of epoch `step`: epochs between the run's last logged one and `step`,
        from the trial's checkpoints (in the folder `checkpoints`: metrics and artifacts) and, for
        epochs whose checkpoint is gone (Train keeps the newest), from the rows of its Tune results
        file `results` in storage (metrics). A driver killed while writes were queued (a tracking
        server slow or away) loses them; the restored trial resumes after its last checkpoint, and a
        finished one is not run again: without this, those epochs would be missing from the run."""
        self._started(trial_id)
        if checkpoints is None and results is None:
            return
        self._gap_filesystems[trial_id] = (checkpoints and checkpoints.filesystem, results and results.filesystem)
        self.writer.submit(self._operation({"kind": "gap", "trial_id": trial_id, "step": step,
                                            "folder": checkpoints and checkpoints.path,
                                            "results": results and results.path}))

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
        """The final model, read from the trial's last checkpoint once: its state_dict file and (with
        log_model='mlflow', the default) an MLflow logged model linked to the final test metrics."""
        self._started(trial_id)
        target = self._staging_dir(trial_id, "model-")
        self._fetch(target / MODEL, fetch_file, location, MODEL, target / MODEL, self.fetched)
        self._fetch(target / "metrics.json", fetch_file, location, "metrics.json", target / "metrics.json", self.fetched)
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
            run = self._find({ROLE_TAG: "sweep", **self.identity})
            if run is None:
                run = self.client.create_run(self._experiment(), run_name=self.sweep,
                                             tags={ROLE_TAG: "sweep", **self.identity, **self.source, **tags})
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
        dataset = record.get("dataset")
        handle = self.trials[trial_id]

        def perform() -> None:
            from mlflow.entities import Param

            run = self._find({ROLE_TAG: "trial", **self.identity, TRIAL_TAG: trial_id})
            if run is None:
                run = self.client.create_run(self._experiment(), run_name=label, tags={
                    ROLE_TAG: "trial", **self.identity, TRIAL_TAG: trial_id, **self.source,
                    "mlflow.parentRunId": self.parent.run_id or "", "status": "running"})
                self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            else:  # a resumed sweep or a retried trial: the same run goes on
                self.client.update_run(run.info.run_id, status="RUNNING")
                self.client.set_tag(run.info.run_id, "status", "running")
                history = self.client.get_metric_history(run.info.run_id, "epoch")
                handle.last_step = max((int(m.step) for m in history), default=0)
            if dataset and not (run.inputs and run.inputs.dataset_inputs):
                # One at a time: the server creates a dataset on its first use, and two trials
                # logging the same new dataset at once collide on its unique key (MLflow 3.17).
                with self._dataset_lock:
                    self.client.log_inputs(run.info.run_id, datasets=[dataset_input(dataset)])
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
            if step - 1 <= handle.last_step or trial_id not in self._gap_filesystems:
                return  # nothing missing (the usual case)
            checkpoints, results = self._gap_filesystems[trial_id]
            missing = range(handle.last_step + 1, step)
            rows = result_rows(results, record.get("results"), missing) if results is not None else {}
            saved = checkpoint_metrics(checkpoints, folder, missing) if checkpoints is not None else {}
            stamp = int(time.time() * 1000)
            for epoch in sorted({*rows, *saved}):
                path, metrics = saved.get(epoch, (None, rows.get(epoch)))
                when = rows.get(epoch, {}).get("timestamp")  # Tune's, in seconds: when the epoch was reported
                self._log_epochs(handle, [{"step": epoch, "metrics": engine_metrics(metrics),
                                           "timestamp": int(when * 1000) if isinstance(when, (int, float)) else stamp}])
                if path is not None:
                    copy = self._staging_dir(trial_id, "epoch-")
                    fetch_epoch_files(CheckpointLocation(checkpoints, path), copy, self.fetched)
                    self._op_artifacts({"kind": "artifacts", "trial_id": trial_id, "checkpoint": path,
                                        "copy": str(copy)}).perform()
            if rows or saved:
                log.warning("tracking: epochs %s of trial %s were missing from its run (a driver stopped before "
                            "writing them, or Tune dropped a result); written from %s", sorted({*rows, *saved}),
                            trial_id, " and ".join(what for what, found in (("its checkpoints", saved),
                                                                            ("its results file", rows)) if found))
        return Operation(f"missing epochs before {step} of trial {trial_id}", perform, record, key=f"trial {trial_id}")

    def _op_mutation(self, record: dict) -> Operation:
        trial_id, step, changes = record["trial_id"], record["step"], record["changes"]
        handle = self.trials[trial_id]

        def perform() -> None:
            from mlflow.entities import Metric, RunTag

            run = self.client.get_run(handle.run_id)
            stamp = int(time.time() * 1000)
            tags, metrics = [], []
            for key, (old, new) in changes.items():
                history = run.data.tags.get(f"mutated.{key}") or f"{old} (start)"
                entry = f" -> {new} (epoch {step})"
                if history.endswith(entry):
                    continue  # written before a retry (an epoch alone can come again with another value:
                    # a trial that clones a donor behind it trains that epoch again)
                tags.append(RunTag(f"mutated.{key}", f"{history}{entry}"[-5000:]))
                numbers = [_number(old), _number(new)]
                if None not in numbers:
                    if f"mutated.{key}" not in run.data.tags:
                        metrics.append(Metric(f"mutated/{key}", numbers[0], stamp, 1))
                    metrics.append(Metric(f"mutated/{key}", numbers[1], stamp, step))
            if tags or metrics:
                self.client.log_batch(handle.run_id, metrics=metrics, tags=tags)
        return Operation(f"mutation at epoch {step} of trial {trial_id}", perform, record, key=f"trial {trial_id}")

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
            self._fetched(target / "metrics.json")
            if not (target / "state_dict.pt").exists():
                state = torch.load(state_file, map_location="cpu", weights_only=True)
                torch.save(state["model"], target / "state_dict.pt")
                (target / "config.json").write_text(json.dumps(state["config"]))
                state_file.unlink()
            # The state_dict stays a plain file: `python -m trainers --eval-only` and torch.load(weights_only=True).
            self.client.log_artifact(handle.run_id, str(target / "state_dict.pt"), "model")
            if self.model_format == "mlflow":
                self._log_logged_model(handle, target)
            shutil.rmtree(target, ignore_errors=True)
        return Operation(f"final model of trial {trial_id}", perform, record, [target], key=f"trial {trial_id}")

    def _log_logged_model(self, handle: RunHandle, folder: Path) -> None:
        """The final model as an MLflow 3 logged model of the trial's run: the UI's Models tab lists
        it with the run's metrics of the final epoch (test/ included) linked to it, and
        `mlflow.register_model("models:/<model_id>", name)` registers it. Once per run: a retried
        write (the server went away after the model was in) finds it and stops."""
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.entities import LoggedModelStatus
        from mlflow.models import infer_signature

        from trainers.backbones import build_backbone
        from trainers.config import RunConfig

        weights = torch.load(folder / "state_dict.pt", map_location="cpu", weights_only=True)
        config = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
        model = build_backbone(config.model.backbone, _num_classes(weights),
                               large_feature_map=config.model.large_feature_map)
        model.load_state_dict(weights)
        model.eval()
        example = np.zeros((1, 3, config.data.input_size, config.data.input_size), np.float32)
        with torch.no_grad():
            signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
        metrics = json.loads((folder / "metrics.json").read_text())
        epoch = int(metrics.get("epoch", 0))
        found = self.client.search_logged_models([self._experiment()], max_results=1,
                                                 filter_string=f"source_run_id = '{handle.run_id}'")
        if found and found[0].status == LoggedModelStatus.READY:
            handle.model_id = found[0].model_id
            return
        if found:  # created, then the upload failed: upload into it
            model_id = found[0].model_id
        else:  # created here, in the sweep's experiment (log_model alone would use the process's)
            params = {**self.client.get_run(handle.run_id).data.params, "epochs": str(epoch)}
            model_id = self.client.create_logged_model(self._experiment(), name="model", source_run_id=handle.run_id,
                                                       params=params, model_type="cam_classifier").model_id
        with self._model_lock:  # log_model reads the process's tracking URI
            mlflow.set_tracking_uri(self.uri)
            # pickle, not pt2: the CAM needs the module itself (forward_features, the classifier
            # weights), which a traced graph of forward() does not keep; pt2 also costs seconds a model.
            # With run_id and step, MLflow links the run's metrics of that epoch (test/ included) to it.
            info = mlflow.pytorch.log_model(model, name="model", model_id=model_id, run_id=handle.run_id, step=epoch,
                                            signature=signature, serialization_format="pickle",
                                            pip_requirements=_model_requirements())
        handle.model_id = info.model_id

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


class _PickleNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()


_PICKLE_NOTICE = _PickleNotice()


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _model_requirements() -> list[str]:
    """What loading the logged model needs: this project (its module classes are pickled) and torch.
    Given, not inferred: MLflow's inference runs the model in a subprocess, seconds per trial."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        requirements.append(f"has-sweep=={version('has-sweep')}")
    except PackageNotFoundError:
        pass
    return requirements


def _num_classes(state_dict: dict) -> int:
    return int(state_dict["classifier.weight"].shape[0])
