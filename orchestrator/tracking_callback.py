"""The Ray Tune callback that feeds the SweepTracker: the only place that writes to MLflow."""
from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from pathlib import Path

from ray.tune import Callback

from orchestrator.checkpoint_files import CheckpointLocation, fetch_file
from orchestrator.search import resolve, trial_values
from orchestrator.storage import open_filesystem
from orchestrator.spaces import SweepSpec
from orchestrator.paired import paired_report, parse_baseline
from orchestrator.table import TrialResult, build_table, describe, format_table
from orchestrator.dataset_input import trial_dataset
from orchestrator.run_names import run_name
from orchestrator.tracking import ROLE_TAG, TRIAL_TAG, URI_ENV, SweepTracker, engine_metrics, versions
from trainers.config_parse import flatten, set_dotted

log = logging.getLogger(__name__)


def never_fails(hook):
    """A tracking problem is reported, never allowed to fail a trial or the sweep."""
    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        if self.tracker is None:
            return None
        try:
            return hook(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - logged with its traceback; the sweep goes on
            log.exception("tracking: %s failed; the sweep goes on without this write", hook.__name__)
            return None
    return guarded


def results_file(trial) -> CheckpointLocation | None:
    """The trial's Tune results file (result.json: a row per report) in the sweep's storage."""
    try:
        return CheckpointLocation(trial.storage.storage_filesystem, f"{trial.storage.trial_fs_path}/result.json")
    except (AttributeError, RuntimeError):  # no storage context (yet)
        return None


class MlflowCallback(Callback):
    """One parent run per sweep, one child run per trial, metrics every epoch, artifacts per checkpoint."""

    def __init__(self, spec: SweepSpec, space_text: str, log_model: str = "mlflow", storage_root: str = "",
                 sweep_id: str | None = None, checked_data: dict[str, str] | None = None) -> None:
        self.spec, self.space_text, self.log_model = spec, space_text, log_model
        self.storage_root = storage_root  # where Ray Train's checkpoint paths (no scheme) live
        self.sweep_id = sweep_id  # the sweep's identity in MLflow (kept in its state file in storage)
        self.checked_data = checked_data  # {'root', 'digest'} the pre-launch data check found on a worker
        self.tracker: SweepTracker | None = None
        self.summary: str | None = None
        self.ended: set[str] = set()  # trials whose run this driver ended
        self.last_steps: dict[str, int] = {}  # trial -> the last epoch this driver saw of it
        self.configs: dict[str, dict] = {}  # a Tune config as JSON -> its flattened run config
        self.logged_configs: dict[str, dict] = {}  # trial -> the config its run has (params, then mutations)

    _LIVE = ("tracker", "summary", "_filesystem", "ended", "last_steps", "configs", "logged_configs")

    def __getstate__(self) -> dict:  # pickled with the experiment; the live tracker is rebuilt in setup
        return {k: v for k, v in self.__dict__.items() if k not in self._LIVE}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"sweep_id": None, "checked_data": None}, **state)  # (pickled by older versions)
        self.__dict__.update(tracker=None, summary=None, ended=set(), last_steps={}, configs={}, logged_configs={})

    def setup(self, **info) -> None:
        uri = os.environ.get(URI_ENV)
        if not uri:  # a resume with --no-tracking: the restored callback stays quiet
            log.warning("MLflow tracking is off for this run of sweep %s", self.spec.name)
            return
        spill = Path(os.environ.get("HAS_SWEEP_SPILL_DIR") or tempfile.gettempdir()) / f"mlflow_unsent_{self.spec.name}"
        self.tracker = SweepTracker(uri, self.spec.name, spill, self.spec.fields.metric, self.spec.fields.mode,
                                    self.log_model, sweep_id=self.sweep_id)
        tags = {"space_hash": self.spec.space_hash, "metric": self.spec.fields.metric, "mode": self.spec.fields.mode,
                "searched": ",".join(self.spec.random_keys), "space_file": self.spec.source,
                "baseline": self.spec.fields.baseline, **versions()}
        self.tracker.start_sweep(tags, {Path(self.spec.source).name or "sweep.yaml": self.space_text})

    # ---- per trial -----------------------------------------------------------------------

    def _config(self, trial, tune_config: dict | None = None) -> dict:
        """The flattened run config of a Tune config (default: the trial's now), resolved once per config."""
        tune_config = trial.config if tune_config is None else tune_config
        raw = json.dumps(tune_config, sort_keys=True, default=str)
        if raw not in self.configs:
            self.configs[raw] = flatten(resolve(self.spec, trial_values(self.spec, tune_config)).to_dict())
        return self.configs[raw]

    def _start(self, trial):
        known = self.tracker.trials.get(trial.trial_id)
        if known is not None:  # every result and checkpoint comes here: resolve the config once per trial
            return known
        config = self.logged_configs[trial.trial_id] = self._config(trial)
        params = {k: v for k, v in config.items() if k not in ("output_dir", "progress")}
        data: dict = {}
        for key in (k for k in config if k.startswith("data.")):
            set_dotted(data, key.removeprefix("data."), config[key])
        searched = [*self.spec.shown_keys, *self.spec.random_keys]
        return self.tracker.start_trial(trial.trial_id, run_name(config, searched), params,
                                        trial_dataset(data, self.checked_data))

    def _mutations(self, trial, step: int, result: dict) -> None:
        """PBT changed the trial's config (exploit and explore): log what changed, from the first epoch
        trained with it. The result's own config is the one its epoch was trained with; the trial's may
        already be the next one (PBT mutates it when it sees the result, before the callbacks do)."""
        trained_with = result.get("config")
        before = self.logged_configs.get(trial.trial_id)
        after = self._config(trial, trained_with if isinstance(trained_with, dict) else None)
        if before is None or before is after:
            return
        changes = {k: (before.get(k), v) for k, v in after.items()
                   if k not in ("output_dir", "progress") and before.get(k) != v}
        self.logged_configs[trial.trial_id] = after
        if changes:
            self.tracker.log_mutation(trial.trial_id, changes, step)

    @never_fails
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._start(trial)

    @never_fails
    def on_trial_restore(self, iteration, trials, trial, **info) -> None:
        self._start(trial)

    @never_fails
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._start(trial)
        # The engine's epoch is the step: Tune's training_iteration starts again at 1 when a
        # multi-worker trial is restarted, while Ray Train resumes at its checkpoint's epoch.
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        location = self._train_checkpoint(result)
        # Epochs missing before this one: the first result this driver sees of a trial (a resumed
        # driver), or a jump (Tune drops a checkpointed result when the trial's failure overtakes it).
        last = self.last_steps.get(trial.trial_id)
        if step > (last or 0) + 1:
            self.tracker.fill_gap(trial.trial_id, step, self._checkpoint_folder(trial, location), results_file(trial))
        self.last_steps[trial.trial_id] = max(step, last or 0)
        self._mutations(trial, step, result)
        self.tracker.log_metrics(trial.trial_id, engine_metrics(result), step)
        if location is not None:  # multi-worker trials: Ray Train's checkpoint, in the sweep's storage
            self.tracker.log_evaluation(trial.trial_id, location)

    @never_fails
    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self._start(trial)
        self.tracker.log_evaluation(trial.trial_id, CheckpointLocation.of(checkpoint))

    def _train_checkpoint(self, result: dict) -> CheckpointLocation | None:
        """Ray Train's checkpoint of a result: a path in the storage's filesystem, without a scheme."""
        path = result.get("checkpoint_path")
        if not isinstance(path, str):
            return None
        if getattr(self, "_filesystem", None) is None:  # made once: an S3 filesystem costs ~0.5 s to make
            self._filesystem, _ = open_filesystem(self.storage_root or path)
        return CheckpointLocation(self._filesystem, path)

    def _checkpoint_folder(self, trial, location: CheckpointLocation | None) -> CheckpointLocation | None:
        """The folder that holds the trial's checkpoints (Ray Train's run, or Tune's trial folder)."""
        if location is None and getattr(trial, "checkpoint", None) is not None:
            location = CheckpointLocation.of(trial.checkpoint)
        if location is None:
            return None
        return CheckpointLocation(location.filesystem, location.path.rstrip("/").rsplit("/", 1)[0])

    def _final_checkpoint(self, trial) -> CheckpointLocation | None:
        """The trial's last checkpoint: Tune's (in-process trials) or Ray Train's (multi-worker trials)."""
        if getattr(trial, "checkpoint", None) is not None:
            return CheckpointLocation.of(trial.checkpoint)
        return self._train_checkpoint(trial.last_result or {})

    @never_fails
    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._complete(trial)

    def _complete(self, trial) -> None:
        self._start(trial)
        self.ended.add(trial.trial_id)
        epochs = resolve(self.spec, trial_values(self.spec, trial.config)).optim.epochs
        done = int((trial.last_result or {}).get("epoch", 0))
        location = self._final_checkpoint(trial)
        if location is not None and done >= epochs and self.log_model != "none":
            self.tracker.log_model(trial.trial_id, location)
        status = "completed" if done >= epochs else "stopped_early"
        tags = {"status": status}
        if status == "stopped_early":
            tags["stopped_at_epoch"] = str(done)
        self.tracker.end_trial(trial.trial_id, "FINISHED", tags)

    def _recover(self, trial) -> None:
        """What a killed driver may have lost of a trial that finished before the kill: its epochs
        missing from the run, and its last checkpoint's artifacts (written again: same paths)."""
        self._start(trial)
        location = self._final_checkpoint(trial)
        done = int((trial.last_result or {}).get("epoch", 0))
        if done:
            folder = self._checkpoint_folder(trial, location)
            self.tracker.fill_gap(trial.trial_id, done + 1, folder, results_file(trial))
        if location is not None:
            self.tracker.log_evaluation(trial.trial_id, location)

    @never_fails
    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._fail(trial)

    def _fail(self, trial) -> None:
        self._start(trial)
        self.ended.add(trial.trial_id)
        error = getattr(trial, "error_msg", None) or "the trial failed"
        self.tracker.end_trial(trial.trial_id, "FAILED", {"status": "failed", "error": str(error)[-4000:]})

    def _last_overlay(self, trial) -> Path | None:
        """A copy of the test CAM overlay in the trial's last checkpoint (only that file is read)."""
        location = self._final_checkpoint(trial)
        if location is None:
            return None
        target = Path(tempfile.mkdtemp(prefix="overlay-")) / "test_cam_overlay.png"
        try:
            return fetch_file(location, "artifacts/test_cam_overlay.png", target, self.tracker.fetched)
        except (OSError, FileNotFoundError):
            return None

    # ---- the sweep -----------------------------------------------------------------------

    @never_fails
    def on_experiment_end(self, trials, **info) -> None:
        from orchestrator.report import best_and_baseline, mosaic, write_report

        # A driver killed after Tune recorded a trial as done but before its run was ended (its last
        # writes queued, or the server away): the resumed sweep does not run that trial again, so
        # its run, still RUNNING or never made, is completed here from what storage holds.
        left = {t.trial_id: t for t in trials if t.trial_id not in self.ended and t.status in ("TERMINATED", "ERROR")}
        if left:
            identity = " and ".join(f"tags.`{k}` = '{v}'" for k, v in self.tracker.identity.items())
            query = f"{identity} and tags.`{ROLE_TAG}` = 'trial' and attributes.status != 'RUNNING'"
            ended = {run.data.tags.get(TRIAL_TAG)
                     for run in self.tracker.client.search_runs([self.tracker._experiment()], query, max_results=5000)}
            for trial in (t for trial_id, t in left.items() if trial_id not in ended):
                self._recover(trial)
                (self._complete if trial.status == "TERMINATED" else self._fail)(trial)
        results = []
        epochs = {}
        for trial in trials:
            config = self._config(trial)
            last = trial.last_result or {}
            epochs[trial.trial_id] = int(last.get("epoch", 0))
            status = trial.status
            if status == "TERMINATED" and epochs[trial.trial_id] < config.get("optim.epochs", 0):
                status = "STOPPED"
            results.append(TrialResult(config, engine_metrics(last), status, trial.trial_id))
        table = build_table(results, choose_by=self.spec.choose_by, mode=self.spec.fields.mode)
        folder = Path(tempfile.mkdtemp(prefix=f"report-{self.spec.name}-"))
        write_report(table, folder, parse_baseline(self.spec.fields.baseline))
        (folder / "table.txt").write_text(format_table(table, "text") + describe(table) + "\n\n"
                                           + paired_report(table, parse_baseline(self.spec.fields.baseline)))
        pair = best_and_baseline(table, self.spec.fields.metric)
        by_id = {t.trial_id: t for t in trials}
        if pair:
            overlays = [self._last_overlay(by_id[r.trial_id]) for r in pair]
            if all(overlays):
                captions = tuple(f"{r.config['model.backbone']}, {r.config['has.mixture']}, "
                                 f"{r.config['has.fill']}, seed {r.config['seed']}" for r in pair)
                mosaic(overlays[0], overlays[1], captions, folder / "cam_best_vs_baseline.png")
        self.tracker.log_parent_files(folder, "report")
        failed = any(r.status == "ERROR" for r in results)
        self.summary = self.tracker.end_sweep("FAILED" if failed else "FINISHED")
        if self.summary:
            print(f"\ntracking: {self.summary}")
