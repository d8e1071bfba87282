"""What a trial reports to Tune / Ray Train, epoch by epoch and when it is restored at its end."""
from __future__ import annotations

import json
import os

from orchestrator.trial import ReportHook, TrainReportHook, TuneReportHook
from trainers.checkpoint import list_checkpoints
from trainers.config import RunConfig
from trainers.engine import Trainer


def tiny(output_dir) -> RunConfig:
    return RunConfig.from_dict({}, [
        f"output_dir={output_dir}", "data.synthetic.train_size=64", "data.synthetic.val_size=16",
        "data.synthetic.test_size=16", "data.batch_size=32", "optim.epochs=2", "eval.test_interval=0.01",
        "progress=false"])


def recording(kind: type[ReportHook]):
    class Recording(kind):
        def __init__(self) -> None:
            self.reports = []

        def report(self, trainer, metrics, folder):  # instead of tune.report / ray.train.report
            self.reports.append((metrics["epoch"], dict(metrics), folder))
    return Recording()


def test_each_epoch_is_reported_once_with_its_checkpoint(tmp_path):
    hook = recording(TuneReportHook)
    Trainer(tiny(tmp_path / "run"), hooks=[hook]).fit()
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [(epoch, folder) for epoch, _, folder in hook.reports] == [(1.0, saved[0]), (2.0, saved[1])]
    assert hook.reports[-1][1] == json.loads((hook.reports[-1][2] / "metrics.json").read_text())


def test_a_trial_restored_from_its_last_checkpoint_reports_its_final_epoch_again(tmp_path):
    """The driver was killed after the last epoch's checkpoint was saved, before Tune saw the trial end:
    the restored trial trains nothing, and without a report Tune's last result would lack the final
    metrics (Ray's progress table then fails sorting a None, the run is tagged stopped at epoch 0)."""
    Trainer(tiny(tmp_path / "a")).fit()
    last = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    final = json.loads((last / "metrics.json").read_text())
    for kind, folder in ((TuneReportHook, None), (TrainReportHook, last)):
        hook = recording(kind)
        Trainer(tiny(tmp_path / kind.__name__), hooks=[hook]).fit(resume_from=last)
        assert hook.reports == [(2.0, final, folder)]



def test_the_progress_table_is_sorted_by_the_metric_only_while_every_finished_trial_has_it():
    """Ray sorts finished trials by the metric, with None for one stopped before its first validation:
    a TypeError that ended a resumed sweep in its final table (the emulation test of a killed driver)."""
    from orchestrator.launch import all_have

    assert all_have("val/m", [{"val/m": 1.0}, {"val": {"m": 2}}])
    assert not all_have("val/m", [{"val/m": 1.0}, {"epoch": 6}])
    assert not all_have("val/m", [{"val/m": None}])
    assert all_have("val/m", [])


def test_the_driver_saves_its_state_as_often_as_storage_sync_seconds_says(monkeypatch):
    """Tune saves (and uploads) its experiment state every TUNE_GLOBAL_CHECKPOINT_S seconds, "auto" (>= 10 s)
    by default, whatever SyncConfig's sync_period says: a driver killed within that time lost which trials
    ended (found by the driver-kill emulation test: a trial's end was never in S3 before the next one's)."""
    import inspect

    from ray.tune.execution.tune_controller import TuneController

    from orchestrator.launch import state_period

    assert 'os.getenv("TUNE_GLOBAL_CHECKPOINT_S", "auto")' in inspect.getsource(TuneController.__init__)
    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S", raising=False)
    with state_period(1.5):
        assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "1.5"
    assert "TUNE_GLOBAL_CHECKPOINT_S" not in os.environ
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "7")  # the user's own choice stands
    with state_period(1.5):
        assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "7"
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "7"
