"""MLflow tracking against a real `mlflow server` on 127.0.0.1: structure, resume, outages, report."""
import getpass
import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from mlflow_server import MlflowServer
from orchestrator.checkpoint_files import CheckpointLocation
from orchestrator.report import results_from_mlflow
from orchestrator.table import TrialResult, build_table, format_table
from orchestrator.dataset_input import trial_dataset
from orchestrator.tracking import SweepTracker, git_commit
from trainers.backbones import build_backbone
from trainers.checkpoint import list_checkpoints
from trainers.config import RunConfig
from trainers.config_parse import flatten
from trainers.engine import Trainer

TRIALS = ("t0", "t1", "t2")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Real epoch checkpoint folders of a 2-epoch engine run."""
    folder = tmp_path_factory.mktemp("run")
    config = RunConfig.from_dict({}, [f"output_dir={folder}", "data.synthetic.train_size=128", "data.synthetic.val_size=32",
                                      "data.synthetic.test_size=32", "optim.epochs=2",
                                      "eval.test_interval=0.01", "progress=false"])
    Trainer(config).fit()
    return config, list_checkpoints(folder / "checkpoints")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (it starts in ~15 s); each test uses its own sweep name."""
    server = MlflowServer(tmp_path_factory.mktemp("server")).start()
    yield server
    server.stop()


def wait_until(condition, seconds=20.0):
    import time

    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.1)
    return condition()


def local(folder: Path) -> CheckpointLocation:
    """A checkpoint folder as the callback hands it over: a filesystem and a path in it."""
    return CheckpointLocation(pafs.LocalFileSystem(), str(folder))


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def run_sweep(tracker: SweepTracker, config: RunConfig, folders, epochs=(1, 2)) -> list[TrialResult]:
    """What the Tune callback does for three trials that each train `epochs`."""
    tracker.start_sweep({"metric": "val/maxboxacc_v2"}, {"sweep.yaml": "name: s\n"})
    results = []
    for index, trial in enumerate(TRIALS):
        params = flatten(config.replace(seed=index).to_dict())
        tracker.start_trial(trial, f"trial {trial}", params, trial_dataset(config.to_dict()["data"]))
        for epoch in epochs:
            metrics = metrics_of(folders[epoch - 1])
            tracker.log_metrics(trial, {**metrics, "val/cls_top1": metrics["val/cls_top1"] + index}, epoch)
            tracker.log_evaluation(trial, local(folders[epoch - 1]))
        tracker.log_model(trial, local(folders[-1]))
        tracker.end_trial(trial, "FINISHED", {"status": "completed"})
        final = {**metrics_of(folders[-1])}
        final["val/cls_top1"] += index
        results.append(TrialResult(params, final, "TERMINATED", trial))
    return results


def tracked_sweep(server, name: str, checkpoints, tmp_path):
    """run_sweep under `name` through a SweepTracker, every write made: the client and the experiment."""
    config, folders = checkpoints
    tracker = SweepTracker(server.uri, name, tmp_path / "spill")
    run_sweep(tracker, config, folders)
    assert tracker.end_sweep() is None
    client = MlflowClient(server.uri)
    return client, client.get_experiment_by_name(name)


def test_one_parent_one_child_per_trial_with_params_metrics_and_artifacts(server, checkpoints, tmp_path):
    config, folders = checkpoints
    client, experiment = tracked_sweep(server, "structure", checkpoints, tmp_path)
    # a model-training experiment: MLflow 3's UI opens it with runs and charts, not its GenAI layout
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags["has_sweep.role"] == "sweep"]
    children = [r for r in runs if r.data.tags["has_sweep.role"] == "trial"]
    assert len(parents) == 1 and len(children) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.tags["trial_id"] for r in children} == set(TRIALS)
    assert all(r.info.status == "FINISHED" and r.data.tags["status"] == "completed" for r in children)
    child = next(r for r in children if r.data.tags["trial_id"] == "t1")
    assert child.data.params["has.mixture"] == "none" and child.data.params["seed"] == "1"
    history = client.get_metric_history(child.info.run_id, "val/maxboxacc_v2")
    assert [(m.step, m.value) for m in history] == [(e, metrics_of(folders[e - 1])["val/maxboxacc_v2"]) for e in (1, 2)]
    names = {a.path for folder in ("evaluations/epoch_0002", "predictions/last", "model")
             for a in client.list_artifacts(child.info.run_id, folder)}
    assert {"evaluations/epoch_0002/test_cam_overlay.png", "evaluations/epoch_0002/val_box_accuracy.png",
            "predictions/last/test_predictions.parquet", "model/state_dict.pt"} <= names
    table = pq.read_table(client.download_artifacts(child.info.run_id, "predictions/last/test_predictions.parquet",
                                                    str(tmp_path)))
    assert table.num_rows == 32 and {"image_id", "best_iou", "correct_iou50", "epoch"} <= set(table.column_names)
    state = torch.load(client.download_artifacts(child.info.run_id, "model/state_dict.pt", str(tmp_path)),
                       weights_only=True)
    build_backbone("tiny_cnn", 6).load_state_dict(state)  # the final model loads into its backbone
    assert parents[0].info.status == "FINISHED"
    # MLflow's standard source tags on every run
    for run in runs:
        assert run.data.tags["mlflow.source.name"] == "orchestrator.sweep"
        assert run.data.tags["mlflow.user"] == getpass.getuser()
        assert run.data.tags["mlflow.source.git.commit"] == git_commit() and len(git_commit()) == 40
    # the trial's data as a dataset input: the synthetic set's digest is that of its config
    [used] = client.get_run(child.info.run_id).inputs.dataset_inputs
    expected = hashlib.sha256(json.dumps(config.to_dict()["data"]["synthetic"], sort_keys=True).encode()).hexdigest()[:12]
    assert (used.dataset.name, used.dataset.digest, used.dataset.source_type) == ("synthetic", expected, "code")
    assert [(t.key, t.value) for t in used.tags] == [("mlflow.data.context", "train")]


def test_the_final_model_is_an_mlflow_logged_model_linked_to_its_metrics_and_registrable(server, checkpoints, tmp_path):
    import mlflow
    import mlflow.pytorch

    config, folders = checkpoints
    client, found = tracked_sweep(server, "models", checkpoints, tmp_path)
    experiment = found.experiment_id
    children = {r.data.tags["trial_id"]: r for r in client.search_runs([experiment], "tags.`has_sweep.role` = 'trial'")}
    models = client.search_logged_models([experiment])
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in children.values())  # one each
    model = next(m for m in models if m.source_run_id == children["t1"].info.run_id)
    assert (str(model.status), model.name, model.model_type) == ("READY", "model", "cam_classifier")
    assert model.params["has.mixture"] == "none" and model.params["seed"] == "1" and model.params["epochs"] == "2"
    final = metrics_of(folders[-1])
    linked = {m.key: (m.step, m.value) for m in model.metrics}
    assert linked["test/maxboxacc_v2"] == (2, final["test/maxboxacc_v2"])
    assert linked["val/cls_top1"] == (2, final["val/cls_top1"] + 1)  # the run's value (run_sweep adds the index)
    # the run still has one point per epoch, not a second one for the link
    assert len(client.get_metric_history(children["t1"].info.run_id, "test/maxboxacc_v2")) == 1
    mlflow.set_tracking_uri(server.uri)
    network = mlflow.pytorch.load_model(f"models:/{model.model_id}")
    state = torch.load(folders[-1] / "state.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(network.state_dict()[k], v) for k, v in state.items())
    assert network.forward_features(torch.zeros(1, 3, 64, 64)).dim() == 4  # the CAM's module, not a traced graph
    version = mlflow.register_model(f"models:/{model.model_id}", "has_sweep_test_model")
    assert version.version == "1" or int(version.version) == 1


def test_sweeps_of_one_name_are_told_apart_by_their_id(server, checkpoints, tmp_path):
    config, folders = checkpoints
    client = MlflowClient(server.uri)
    for sweep_id, value in (("first", 1.0), ("second", 2.0), ("first", 3.0)):  # then the first one resumed
        tracker = SweepTracker(server.uri, "same-name", tmp_path / sweep_id, sweep_id=sweep_id)
        tracker.start_sweep({}, {})
        tracker.start_trial("t0", "t0", flatten(config.to_dict()))
        tracker.log_metrics("t0", {"test/maxboxacc_v2": value}, int(value))
        assert tracker.end_sweep() is None
    runs = client.search_runs([client.get_experiment_by_name("same-name").experiment_id])
    parents = [r for r in runs if r.data.tags["has_sweep.role"] == "sweep"]
    assert sorted(r.data.tags["sweep_id"] for r in parents) == ["first", "second"]
    children = {r.data.tags["sweep_id"]: r for r in runs if r.data.tags["has_sweep.role"] == "trial"}
    assert len(children) == 2 and children["first"].data.tags["mlflow.parentRunId"] == next(
        p.info.run_id for p in parents if p.data.tags["sweep_id"] == "first")
    assert [m.value for m in client.get_metric_history(children["first"].info.run_id, "test/maxboxacc_v2")] == [1.0, 3.0]
    latest, results = results_from_mlflow(client, "same-name")  # the latest started, unless asked
    assert latest.data.tags["sweep_id"] == "second" and [r.metrics["test/maxboxacc_v2"] for r in results] == [2.0]
    _, results = results_from_mlflow(client, "same-name", sweep_id="first")
    assert [r.metrics["test/maxboxacc_v2"] for r in results] == [3.0]


def test_a_pbt_mutation_is_logged_from_its_epoch(server, checkpoints, tmp_path):
    config, _ = checkpoints
    tracker = SweepTracker(server.uri, "mutations", tmp_path / "spill")
    tracker.start_sweep({}, {})
    tracker.start_trial("t0", "t0", flatten(config.to_dict()))
    tracker.log_mutation("t0", {"optim.lr": (0.1, 0.05), "has.fill": ("zero", "blur")}, 3)
    tracker.log_mutation("t0", {"optim.lr": (0.05, 0.2)}, 5)
    tracker.log_mutation("t0", {"optim.lr": (0.05, 0.2)}, 5)  # the same again (a retried write): once
    # a clone of a donor behind it trains epoch 5 again, with another value: a change of its own
    tracker.log_mutation("t0", {"optim.lr": (0.2, 0.4)}, 5)
    assert tracker.end_sweep() is None
    client = MlflowClient(server.uri)
    run = next(r for r in client.search_runs([client.get_experiment_by_name("mutations").experiment_id])
               if r.data.tags["has_sweep.role"] == "trial")
    assert run.data.params["optim.lr"] == str(config.optim.lr)  # params keep the starting values
    assert run.data.tags["mutated.optim.lr"] == "0.1 (start) -> 0.05 (epoch 3) -> 0.2 (epoch 5) -> 0.4 (epoch 5)"
    assert run.data.tags["mutated.has.fill"] == "zero (start) -> blur (epoch 3)"
    history = client.get_metric_history(run.info.run_id, "mutated/optim.lr")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (3, 0.05), (5, 0.2), (5, 0.4)]
    assert client.get_metric_history(run.info.run_id, "mutated/has.fill") == []  # not a number: the tag only


def test_a_resumed_sweep_continues_the_same_runs_without_duplicates(server, checkpoints, tmp_path):
    config, folders = checkpoints
    first = SweepTracker(server.uri, "resumed", tmp_path / "spill")
    first.start_sweep({}, {})
    first.start_trial("t0", "t0", flatten(config.to_dict()))
    first.log_metrics("t0", metrics_of(folders[0]), 1)
    assert first.end_sweep() is None
    again = SweepTracker(server.uri, "resumed", tmp_path / "spill")  # the restored driver
    again.start_sweep({}, {})
    again.start_trial("t0", "t0", flatten(config.to_dict()))
    again.log_metrics("t0", metrics_of(folders[0]), 1)  # reported again after the restore: skipped
    again.log_metrics("t0", metrics_of(folders[1]), 2)
    assert again.end_sweep() is None
    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert len(runs) == 2  # one parent, one child
    child = next(r for r in runs if r.data.tags["has_sweep.role"] == "trial")
    assert [m.step for m in client.get_metric_history(child.info.run_id, "epoch")] == [1, 2]


def test_epochs_a_killed_driver_never_wrote_come_from_the_checkpoints_and_the_results_file(server, checkpoints,
                                                                                        tmp_path):
    # The restored driver sees the trial first at epoch 4: epochs 1-3 never reached the run. Train kept
    # only epoch 2's checkpoint (its metrics and artifacts); Tune's result.json has a row per report,
    # epoch 3's twice (a trial restored behind its last report: the last row counts), and a partial line.
    config, folders = checkpoints
    kept = tmp_path / "train_run"
    shutil.copytree(folders[1], kept / "checkpoint_000001")
    saved = metrics_of(folders[1])
    rows = [{"epoch": 1, "training_iteration": 1, "val/x": 0.25, "done": False, "timestamp": 1_700_000_000},
            {"epoch": 2, "training_iteration": 2, "val/x": 99.0},
            {"epoch": 3, "training_iteration": 3, "val/x": 0.5},
            {"epoch": 3, "training_iteration": 1, "val/x": 0.75, "config": {"grid": {"seed": 0}}}]
    results = tmp_path / "trial" / "result.json"
    results.parent.mkdir()
    results.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 4, "val/x"')
    tracker = SweepTracker(server.uri, "gap", tmp_path / "spill")
    tracker.start_sweep({}, {})
    tracker.start_trial("t0", "t0", flatten(config.to_dict()))
    tracker.fill_gap("t0", 4, local(kept), local(results))
    tracker.log_metrics("t0", {"epoch": 4.0, "val/x": 1.0}, 4)
    assert tracker.end_sweep() is None
    client = MlflowClient(server.uri)
    child = next(r for r in client.search_runs([client.get_experiment_by_name("gap").experiment_id])
                 if r.data.tags["has_sweep.role"] == "trial")
    history = lambda key: sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, key))  # noqa: E731
    assert history("epoch") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    # epoch 2 from its checkpoint (which has no val/x), epochs 1 and 3 from the rows (the last of epoch 3)
    assert history("val/x") == [(1, 0.25), (3, 0.75), (4, 1.0)]
    assert client.get_metric_history(child.info.run_id, "val/x")[0].timestamp == 1_700_000_000_000  # when reported
    assert history("val/maxboxacc_v2") == [(2, pytest.approx(saved["val/maxboxacc_v2"]))]
    assert history("training_iteration") == [] and history("done") == []
    assert [a.path for a in client.list_artifacts(child.info.run_id, "evaluations")] == ["evaluations/epoch_0002"]


def test_a_server_stopped_and_restarted_mid_sweep_loses_no_metric(server, checkpoints, tmp_path):
    config, folders = checkpoints
    tracker = SweepTracker(server.uri, "outage", tmp_path / "spill")
    tracker.start_sweep({}, {})
    tracker.start_trial("t0", "t0", flatten(config.to_dict()))
    tracker.log_metrics("t0", {"val/x": 1.0}, 1)
    assert tracker.writer.flush(30)
    server.stop()
    for epoch in (2, 3, 4):  # the sweep goes on; these wait in the queue
        tracker.log_metrics("t0", {"val/x": float(epoch)}, epoch)
    tracker.log_evaluation("t0", local(folders[1]))  # the checkpoint of epoch 2
    assert wait_until(lambda: tracker.writer.outages == 1) and tracker.writer.pending > 0
    server.start()
    assert tracker.end_sweep(flush_timeout=120) is None
    client = MlflowClient(server.uri)
    child = next(r for r in client.search_runs([client.get_experiment_by_name("outage").experiment_id])
                 if r.data.tags["has_sweep.role"] == "trial")
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "val/x")] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert any(a.path.endswith("epoch_0002") for a in client.list_artifacts(child.info.run_id, "evaluations"))


def test_writes_that_never_reach_the_server_are_saved_and_reported(server, checkpoints, tmp_path):
    config, folders = checkpoints
    tracker = SweepTracker(server.uri, "lost", tmp_path / "spill")
    tracker.start_sweep({}, {})
    tracker.start_trial("t0", "t0", flatten(config.to_dict()))
    assert tracker.writer.flush(30)
    server.stop()
    try:
        tracker.log_metrics("t0", {"val/x": 7.0}, 5)
        tracker.log_evaluation("t0", local(folders[1]))
        summary = tracker.end_sweep(flush_timeout=3)
    finally:
        server.start()  # for the next tests of the module
    assert summary.startswith("3 tracking writes could not be made (the tracking server did not answer")
    assert f"saved in {tmp_path / 'spill' / 'unsent.jsonl'}" in summary
    lines = [json.loads(line) for line in (tmp_path / "spill" / "unsent.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["metrics", "artifacts", "end_sweep"]
    assert lines[0]["metrics"] == {"val/x": 7.0} and lines[0]["step"] == 5
    assert any(Path(f).joinpath("artifacts", "test_cam_overlay.png").exists() for f in lines[1]["files"])


def test_the_report_shows_the_numbers_that_are_in_the_runs(server, checkpoints, tmp_path):
    config, folders = checkpoints
    tracker = SweepTracker(server.uri, "report", tmp_path / "spill")
    logged = run_sweep(tracker, config, folders)
    assert tracker.end_sweep() is None
    parent, results = results_from_mlflow(MlflowClient(server.uri), "report")
    assert parent.data.tags["metric"] == "val/maxboxacc_v2"
    assert format_table(build_table(results), "csv") == format_table(build_table(logged), "csv")
    row = build_table(results, "val").rows[0]
    assert sorted(row.values["cls_top1"]) == sorted(r.metrics["val/cls_top1"] for r in logged)


def test_the_driver_reads_only_what_it_logs_every_epoch_and_the_model_once(server, checkpoints, tmp_path):
    config, folders = checkpoints
    tracker = SweepTracker(server.uri, "fetched", tmp_path / "spill")
    tracker.start_sweep({}, {})
    tracker.start_trial("t0", "t0", flatten(config.to_dict()))
    for folder in folders:
        tracker.log_evaluation("t0", local(folder))
    assert tracker.writer.flush(60)
    small = sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file() and f.name != "state.pt")
    assert (tracker.fetched.bytes, tracker.fetched.files) == (small, sum(
        1 for folder in folders for f in folder.rglob("*") if f.is_file() and f.name != "state.pt"))
    tracker.log_model("t0", local(folders[-1]))
    assert tracker.end_sweep() is None
    # the model once; and its metrics.json, for the epoch the logged model is linked at
    assert tracker.fetched.bytes == small + (folders[-1] / "state.pt").stat().st_size + (folders[-1] / "metrics.json").stat().st_size
