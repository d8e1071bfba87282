"""The sweep on a real local Ray: quickstart end to end, DDP = the engine's DDP, ASHA, retries, PBT.
Node loss, driver restarts, S3 storage and the authenticated tracking server: test_cluster_emulation.py."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from orchestrator.search import resolve
from orchestrator.spaces import load_space

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
TINY = {"data": {"synthetic": {"train_size": 192, "val_size": 48, "test_size": 40}, "batch_size": 64},
        "optim": {"epochs": 2}, "eval": {"test_interval": 0.01}, "threads": 1}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray (this machine's CPUs) that the sweeps below join, as they would a running cluster:
    each saves starting and stopping its own (~10 s here), and no two Ray instances run on this machine
    at once (Ray Train's helpers then pick the newest). The quickstart test, which runs before it is
    made, starts its own, as a newcomer's sweep does."""
    from ray.cluster_utils import Cluster

    os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": os.cpu_count(), "include_dashboard": False})
    yield cluster.address
    cluster.shutdown()


def sweep_file(tmp_path, name, **fields) -> Path:
    fields.setdefault("base", TINY)
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, **fields}))  # JSON is YAML
    return path


def run_sweep(*args, timeout=300, cwd=ROOT, module="orchestrator.sweep", address=None):
    env = {**ENV, "RAY_ADDRESS": address} if address else ENV
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def mlflow_runs(uri: str, sweep: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(sweep).experiment_id])
    parents = [r for r in runs if r.data.tags["has_sweep.role"] == "sweep"]
    children = [r for r in runs if r.data.tags["has_sweep.role"] == "trial"]
    return client, parents, children


def trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if p.is_dir() and (p / "result.json").exists())


def results(trial: Path) -> list[dict]:
    return [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]


def test_quickstart_runs_end_to_end_on_reduced_sizes(tmp_path):
    # In a fresh folder, as a newcomer would: MLflow's default store appears there (./mlflow.db).
    done = run_sweep("--storage-path", str(tmp_path / "rr"), "data.synthetic.train_size=192",
                     "data.synthetic.val_size=48", "data.synthetic.test_size=40", "optim.epochs=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    table, paired_part = done.stdout[done.stdout.index("sweep quickstart: 10 trials"):].split("paired differences:")
    rows = [line.split()[:3] for line in table.splitlines() if line.startswith("tiny_cnn")]
    assert rows == [["tiny_cnn", "none", "-"], ["tiny_cnn", "24", "dataset_mean"], ["tiny_cnn", "24", "zero"],
                    ["tiny_cnn", "mixed:8,16,24", "dataset_mean"], ["tiny_cnn", "mixed:8,16,24", "zero"]]
    assert "test split, mean ± s.d. over seeds" in table
    trials = trial_dirs(tmp_path / "rr" / "quickstart")
    assert len(trials) == 10 and all(results(t)[-1]["training_iteration"] == 2 for t in trials)
    # The tracking store holds the same sweep, and the report reads the same numbers back from it.
    client, parents, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "quickstart")
    assert len(parents) == 1 and len(children) == 10 and parents[0].info.status == "FINISHED"
    assert all([m.step for m in client.get_metric_history(c.info.run_id, "val/maxboxacc_v2")] == [1, 2]
               for c in children)
    report = run_sweep("quickstart", cwd=tmp_path, module="orchestrator.report")
    assert report.returncode == 0, report.stderr
    printed = [line for line in table.splitlines() if line.startswith("tiny_cnn")]
    table_part, report_paired = report.stdout.split("paired differences:")
    assert [line for line in table_part.splitlines() if line.startswith("tiny_cnn")] == printed
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")} >= {
        "report/table.md", "report/metrics_vs_patch_size.png", "report/cam_best_vs_baseline.png",
        "report/paired.md", "report/paired_differences.png"}
    # the paired differences end the sweep's output and the report's, the same four configurations
    paired = [line for line in paired_part.splitlines() if line.startswith("tiny_cnn")]
    assert [line.split()[1:3] for line in paired] == [["24", "dataset_mean"], ["24", "zero"],
                                                       ["mixed:8,16,24", "dataset_mean"], ["mixed:8,16,24", "zero"]]
    assert [line for line in report_paired.splitlines() if line.startswith("tiny_cnn")] == paired
    # a model-training experiment; run names that tell the trials apart; the data and the model in MLflow
    assert client.get_experiment_by_name("quickstart").tags["mlflow.experimentKind"] == "custom_model_development"
    experiment_id = parents[0].info.experiment_id
    assert (f"tracking: MLflow at sqlite:///{tmp_path / 'mlflow.db'}, experiment 'quickstart': `mlflow ui` in {tmp_path}, "
            f"then http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning") in done.stdout
    names = sorted(c.info.run_name for c in children)
    assert len(set(names)) == 10 and "tiny_cnn | 24 | dataset_mean | p 0.5 | seed 1" in names
    assert "tiny_cnn | none | seed 0" in names
    assert all(c.inputs.dataset_inputs[0].dataset.name == "synthetic" for c in children)
    models = client.search_logged_models([parents[0].info.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(c.info.run_id for c in children)


def _engine_ddp(rank, world, init_file, config_dict, output):
    import torch.distributed as dist

    from trainers.config import RunConfig
    from trainers.engine import Trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metrics = Trainer(RunConfig.from_dict(config_dict)).fit()
        if rank == 0:
            Path(output).write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.extended  # default: 2-worker DDP trials run on the emulated cluster, and the engine's DDP = one process
def test_a_two_worker_torchtrainer_trial_computes_what_the_engine_computes(tmp_path, ray_address):
    path = sweep_file(tmp_path, "ddp", resources={"cpus": 0.5, "workers": 2})
    done = run_sweep("--space", str(path), "--storage-path", str(tmp_path / "rr"), cwd=tmp_path, address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    (trial,) = trial_dirs(tmp_path / "rr" / "ddp")
    ray_metrics = results(trial)[-1]
    # Tracked like an in-process trial, from Ray Train's checkpoints.
    client, _, (child,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "ddp")
    assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"evaluations", "model", "predictions"}
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val/maxboxacc_v2")] == [1, 2]
    # The same config, 2 gloo ranks of the engine without Ray: the very same numbers.
    config = resolve(load_space(path), {"seed": 0}).replace(output_dir=str(tmp_path / "engine"), progress=False)
    mp.spawn(_engine_ddp, args=(2, tmp_path / "init", config.to_dict(), tmp_path / "engine.json"), nprocs=2)
    engine = json.loads((tmp_path / "engine.json").read_text())
    shared = [k for k in engine if k.startswith(("val/", "test/")) or k == "train/loss"]
    assert {k: ray_metrics[k] for k in shared} == {k: engine[k] for k in shared}
    # One process: the same data and steps; BatchNorm sees 64 images instead of 2 x 32 (SyncBatchNorm
    # needs GPUs), so the numbers are close, not equal.
    from trainers.engine import Trainer

    single = Trainer(config.replace(output_dir=str(tmp_path / "single"))).fit()
    assert abs(single["train/loss"] - engine["train/loss"]) < 0.05
    assert abs(single["test/maxboxacc_v2"] - engine["test/maxboxacc_v2"]) < 10


def test_impossible_resources_are_refused_before_anything_runs(tmp_path, ray_address):
    path = sweep_file(tmp_path, "greedy", resources={"cpus": 1, "gpus": 1})
    start = time.monotonic()
    done = run_sweep("--space", str(path), "--storage-path", str(tmp_path / "rr"), cwd=tmp_path, address=ray_address)
    assert done.returncode == 2
    assert f"error: {path}: resources.gpus: each trial worker needs GPU 1, but no node has that much (largest: 0;" \
        in done.stderr
    assert time.monotonic() - start < 60 and not (tmp_path / "rr" / "greedy").exists()


@pytest.mark.extended  # default: the emulated node kill retries a trial from its checkpoint, each epoch once in MLflow
def test_a_failing_trial_resumes_from_its_checkpoint_and_finishes(tmp_path, ray_address):
    base = {**TINY, "optim": {"epochs": 4}, "fault_drill_epoch": 2}
    path = sweep_file(tmp_path, "drill", base=base, max_failures=1)
    done = run_sweep("--space", str(path), "--storage-path", str(tmp_path / "rr"), cwd=tmp_path, address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fault drill after epoch 2" in done.stdout + done.stderr
    (trial,) = trial_dirs(tmp_path / "rr" / "drill")
    # The retry restores epoch 2's checkpoint and trains epochs 3-4 only (not from epoch 1 again).
    # Tune's own result.json may lack epoch 2: when the failure reaches the driver before epoch 2's
    # result is logged, Ray drops that row (its checkpoint is kept and restored).
    epochs = [r["epoch"] for r in results(trial)]
    assert epochs in ([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 4.0]), epochs
    # MLflow has every epoch once, at its step (a missing one is written back from the checkpoint).
    client, _, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "drill")
    assert len(children) == 1 and children[0].info.status == "FINISHED"  # the retry kept its run
    history = sorted((m.step, int(m.value)) for m in client.get_metric_history(children[0].info.run_id, "epoch"))
    assert history == [(1, 1), (2, 2), (3, 3), (4, 4)]


def test_asha_stops_the_bad_trials_early(tmp_path, ray_address):
    base = {**TINY, "optim": {"epochs": 4}}
    path = sweep_file(tmp_path, "asha", base=base, space={"optim.lr": {"grid": [0.3, 0.1, 1e-5, 1e-6]}},
                      scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
                      max_concurrent_trials=1)
    done = run_sweep("--space", str(path), "--storage-path", str(tmp_path / "rr"), cwd=tmp_path, address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = {results(t)[-1]["config"]["grid"]["optim.lr"]: results(t)[-1]["training_iteration"]
              for t in trial_dirs(tmp_path / "rr" / "asha")}
    assert epochs[0.3] == 4 and min(epochs.values()) < 4
    assert "stopped before their last epoch (by the scheduler" in done.stdout


def test_population_based_training_exploits_and_mutates_in_process_trials(tmp_path, ray_address):
    base = {**TINY, "optim": {"epochs": 4}, "has": {"mixture": "24"}}
    path = sweep_file(tmp_path, "pbt", base=base, space={"optim.lr": {"loguniform": [0.01, 0.5]}},
                      search={"algorithm": "random", "num_samples": 4, "seed": 1},
                      scheduler={"name": "pbt", "perturbation_interval": 1}, max_concurrent_trials=2)
    done = run_sweep("--space", str(path), "--storage-path", str(tmp_path / "rr"), cwd=tmp_path, address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = tmp_path / "rr" / "pbt"
    exploits = [json.loads(line) for line in (experiment / "pbt_global.txt").read_text().splitlines() if line.strip()]
    assert exploits  # at least one exploit happened
    trials = trial_dirs(experiment)
    # Every trial ends at its last epoch. (Not Tune's training_iteration: a trial that clones a donor
    # further along keeps counting its own reports, so CI saw 5 for a trial that ended at epoch 4.)
    assert len(trials) == 4 and all(results(t)[-1]["epoch"] == 4 for t in trials)
    client, _, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "pbt")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    for child in children:  # each run has every epoch at its step (again, where a clone went back)
        epochs = {(m.step, int(m.value)) for m in client.get_metric_history(child.info.run_id, "epoch")}
        assert sorted(epochs) == [(1, 1), (2, 2), (3, 3), (4, 4)], epochs
    # PBT's new values reach the runs: a tag with the history, a metric from the epoch they apply
    final_lr = {results(t)[-1]["trial_id"]: results(t)[-1]["config"]["grid"]["optim.lr"] for t in trials}
    mutated = [c for c in children if "mutated.optim.lr" in c.data.tags]
    assert mutated, "PBT mutated no trial's lr"
    for child in mutated:
        history = client.get_metric_history(child.info.run_id, "mutated/optim.lr")
        assert min(m.step for m in history) == 1 and float(child.data.params["optim.lr"]) == pytest.approx(
            next(m.value for m in history if m.step == 1), rel=1e-5)  # the starting value, as in the params
        # the tag's last change is the value the trial ended with (a clone of a donor behind it goes back
        # to an earlier epoch, so the latest change need not be at the highest step), and has its point
        value, epoch = re.fullmatch(r".* -> (\S+) \(epoch (\d+)\)", child.data.tags["mutated.optim.lr"]).groups()
        assert float(value) == pytest.approx(final_lr[child.data.tags["trial_id"]], rel=1e-5)
        assert any(m.step == int(epoch) and m.value == pytest.approx(float(value), rel=1e-5) for m in history)
        # each new value is one PBT gave this trial (its exploits in pbt_global.txt: target tag, donor tag,
        # target iteration, donor iteration, donor config, new config), logged at the first epoch trained
        # with it: after the donor's checkpoint, which is at most the donor's iteration there. (result.json
        # cannot tell: Tune drops the rows of epochs a restored trial trains again.)
        index = int(child.data.tags["trial_id"].rsplit("_", 1)[1])
        given = [(row[3], row[5]["grid"]["optim.lr"]) for row in exploits if int(row[0].split("_", 1)[0]) == index]
        for point in (p for p in history if p.step > 1):
            assert any(point.value == pytest.approx(lr, rel=1e-5) and 2 <= point.step <= donor + 1
                       for donor, lr in given), (point, given)


def test_a_sweep_keeps_its_runs_when_its_storage_moves_and_a_new_sweep_of_its_name_gets_its_own(tmp_path, ray_address):
    base = {**TINY, "optim": {"epochs": 1}}
    path = sweep_file(tmp_path, "moved", base=base, seeds=[0], space={"has.mixture": {"grid": ["none", "24"]}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = run_sweep("--space", str(path), "--storage-path", str(tmp_path / "old"), "--tracking-uri", uri,
                      cwd=tmp_path, address=ray_address)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep_id = json.loads((tmp_path / "old" / "moved" / "has_sweep.json").read_text())["sweep_id"]
    (tmp_path / "old").rename(tmp_path / "new")  # the storage moves (a bucket renamed, a disk remounted)
    again = run_sweep("--resume", "moved", "--storage-path", str(tmp_path / "new"), "--tracking-uri", uri,
                      cwd=tmp_path, address=ray_address)
    assert again.returncode == 0, again.stderr[-3000:]
    client, parents, children = mlflow_runs(uri, "moved")
    assert [p.data.tags["sweep_id"] for p in parents] == [sweep_id] and len(children) == 2  # its own runs again
    other = run_sweep("--space", str(path), "--storage-path", str(tmp_path / "elsewhere"), "--tracking-uri", uri,
                      cwd=tmp_path, address=ray_address)
    assert other.returncode == 0, other.stderr[-3000:]
    client, parents, children = mlflow_runs(uri, "moved")
    assert len(parents) == 2 and len(children) == 4 and len({p.data.tags["sweep_id"] for p in parents}) == 2
    report = run_sweep("moved", "--tracking-uri", uri, cwd=tmp_path, module="orchestrator.report")
    assert report.returncode == 0, report.stderr
    newest = json.loads((tmp_path / "elsewhere" / "moved" / "has_sweep.json").read_text())["sweep_id"]
    assert f"2 sweeps are named 'moved'; showing the latest, {newest}" in report.stderr and sweep_id in report.stderr
