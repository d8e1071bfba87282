"""Sweeps on the emulated cluster (tests/cluster_emulation.py): a head that runs no trial, two worker
nodes with their own data, storage only through S3, the head's authenticated MLflow server with its
artifacts in S3. Each scenario ends with every child run FINISHED, metrics at the epochs, the
artifacts in S3, nothing lost and no duplicate runs."""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from cluster_emulation import BUCKET, EmulatedCluster
from trainers.backbones import _PACKAGED_WEIGHTS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

EPOCHS = 4
# The data lives on each worker node ($HAS_NODE_DATA is set there, not on the driver); validation
# every 2 epochs: epochs 1 and 3 report no val/ metric (the case that aborted shipped sweeps).
BASE = {"data": {"name": "voc", "root": "$HAS_NODE_DATA/voc", "resize_size": 40, "crop_size": 32, "batch_size": 4,
                 "workers": 0},
        "optim": {"epochs": EPOCHS, "lr": 0.05}, "eval": {"every": 2, "interval": 0.05, "test_interval": 0.05,
                                                           "overlay_count": 4}, "threads": 1}
DDP = {"cpus": 0.5, "workers": 2}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    cluster = EmulatedCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.shutdown()


def sweep_file(cluster: EmulatedCluster, name: str, **fields):
    fields = {"name": name, "base": BASE, "space": {"has.mixture": {"grid": ["none", "8"]}}, "resources": DDP,
              "max_failures": 2, "storage": {"path": cluster.storage(), "sync_seconds": 1}, **fields}
    path = cluster.folder / f"{name}.yaml"
    path.write_text(json.dumps(fields))  # JSON is YAML
    return path


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


def train_checkpoints(cluster: EmulatedCluster, sweep: str) -> dict[str, list[str]]:
    """Ray Train checkpoints in S3, by Train run (one per multi-worker trial)."""
    runs: dict[str, list[str]] = {}
    for key in cluster.s3.keys(f"sweeps/{sweep}-train-"):
        parts = key.split("/")
        if len(parts) > 3 and parts[2].startswith("checkpoint_") and parts[-1] == "metrics.json":
            runs.setdefault(parts[1], []).append(parts[2])
    return runs


def assert_tracked_in_full(cluster: EmulatedCluster, sweep: str, trials: int) -> None:
    """One parent, one FINISHED child per trial, every epoch's metrics once at its epoch, artifacts in S3."""
    client = cluster.mlflow.client()
    experiment = client.get_experiment_by_name(sweep)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags["has_sweep.role"] == "sweep"]
    children = [r for r in runs if r.data.tags["has_sweep.role"] == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == trials and len({c.data.tags["trial_id"] for c in children}) == trials
    for child in children:
        run_id = child.info.run_id
        epochs = int(child.data.params["optim.epochs"])
        assert child.info.status == "FINISHED" and child.data.tags["status"] == "completed", child.data.tags
        # Each epoch once, at its own step (an epoch written back after a driver kill may come later).
        history = sorted((m.step, int(m.value)) for m in client.get_metric_history(run_id, "epoch"))
        assert history == [(e, e) for e in range(1, epochs + 1)]
        assert sorted(m.step for m in client.get_metric_history(run_id, "val/maxboxacc_v2")) == list(range(2, epochs + 1, 2))
        assert [m.step for m in client.get_metric_history(run_id, "test/maxboxacc_v2")] == [epochs]
        prefix = f"mlflow-artifacts/{experiment.experiment_id}/{run_id}/artifacts/"
        stored = set(cluster.s3.keys(prefix))
        assert {prefix + f"evaluations/epoch_{epochs:04d}/test_cam_overlay.png", prefix + "model/state_dict.pt",
                prefix + "predictions/last/test_predictions.parquet", prefix + "config.yaml"} <= stored, sorted(stored)


def test_the_checks_run_where_the_data_and_the_storage_live(emulated):
    # The data is on the workers only: a path the driver cannot see passes, checked on a worker.
    # (That a folder the driver cannot see passes, checked on a worker, the shipped sweeps show.)
    # A folder missing on the worker nodes is refused before any trial, naming the node's path.
    missing = sweep_file(emulated, "missing", base={**BASE, "data": {**BASE["data"], "root": "$HAS_NODE_DATA/nope"}})
    done = emulated.sweep("--space", str(missing))
    assert done.returncode == 2
    assert f"error: {missing}: checked on worker node" in done.stderr
    assert f"data.root: {emulated.folder}/node" in done.stderr and "/nope is not a folder on this node" in done.stderr
    # Storage only on the driver's disk is refused: the trials run on other nodes.
    local = sweep_file(emulated, "local", storage={"path": str(emulated.folder / "results")})
    done = emulated.sweep("--space", str(local))
    assert done.returncode == 2 and "is local to this node, and trials run on other nodes" in done.stderr
    # A bucket the workers cannot write to is found by a worker, before any trial.
    nobucket = sweep_file(emulated, "nobucket", storage={"path": "s3://no-such-bucket/sweeps"})
    done = emulated.sweep("--space", str(nobucket))
    assert done.returncode == 2 and "storage.path: a worker node cannot write to s3://no-such-bucket/sweeps" \
        in done.stderr, done.stderr[-2000:]
    assert not emulated.s3.keys("sweeps/missing") and not emulated.s3.keys("sweeps/local")


def test_ddp_trials_survive_a_node_kill_and_a_tracking_server_restart(emulated):
    import ray
    from ray._private.state import available_resources_per_node

    epochs = 6  # more than two attempts' worth of kept checkpoints (below)
    path = sweep_file(emulated, "ddp", base={**BASE, "optim": {**BASE["optim"], "epochs": epochs}})
    driver = emulated.start_sweep("--space", str(path))
    try:
        wait_for(lambda: any(train_checkpoints(emulated, "ddp").values()), 300, "a first Train checkpoint in S3")
        ray.init(address=emulated.address)
        free = available_resources_per_node()
        ray.shutdown()
        busy = [n for n in emulated.nodes if free.get(n.node_id, {}).get("CPU", 0) < emulated.cpus_per_worker]
        emulated.kill_worker(busy[0])  # a node with a trial's DDP workers on it
        emulated.mlflow.stop()  # and the tracking server goes away for a while
        emulated.add_worker()  # the autoscaler's replacement
        # The server stays away until the driver has found it gone (its next write), then comes back.
        wait_for(lambda: "tracking server unreachable" in driver.log_path.read_text(), 300,
                 "the driver to find the tracking server unreachable")
        emulated.mlflow.start()
        assert driver.wait(timeout=600) == 0, driver.log_path.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    log = driver.log_path.read_text()
    assert "The trial terminated successfully after retrying." in log  # the node's trial, from its checkpoint
    assert "tracking server unreachable" in log and "tracking server back" in log
    runs = train_checkpoints(emulated, "ddp")
    # Train keeps its 2 newest checkpoints; a retried run may still hold up to 2 of its first attempt's
    # (the kill can come before that attempt's snapshot of them; the killed node can hold workers of
    # both trials: then both are retried). Without pruning a run would hold all 6.
    assert len(runs) == 2 and all(2 <= len(c) <= 4 for c in runs.values()), runs
    assert not (emulated.folder / "ray_results").exists()  # nothing on the driver's disk
    assert emulated.s3.keys("sweeps/ddp/has_sweep.json")
    assert_tracked_in_full(emulated, "ddp", trials=2)
    assert_images_cached_on_each_node(emulated)


def assert_images_cached_on_each_node(cluster: EmulatedCluster) -> None:
    """The trials kept their resized images on their own nodes' disks ($HAS_SWEEP_CACHE there): whole
    entries only, and no temporaries on the nodes still alive (a killed node may leave one)."""
    from trainers.datasets.cache import HEADER, MAGIC

    counts = {}
    for folder in sorted(cluster.folder.glob("node*/image-cache")):
        count = 0
        for entry in folder.glob("*/*.img"):
            data = entry.read_bytes()
            magic, _, _, width, height = (int.from_bytes(data[k:k + 4], "little") for k in range(0, HEADER, 4))
            assert magic == MAGIC and len(data) == HEADER + 3 * width * height and {width, height} <= {32, 40}, entry
            count += 1
        counts[folder.parent.name] = count
    alive = {node.disk.name for node in cluster.nodes}
    assert len(counts) >= 2 and all(counts.values()), counts
    assert not [p for p in cluster.folder.glob("node*/image-cache/*/.*") if p.parts[-4] in alive]


def test_a_killed_driver_resumes_from_s3_keeping_finished_trials_and_the_epochs_of_ddp_ones(emulated):
    # Two DDP trials side by side, one of 2 epochs and one of 6: the driver dies when the short one
    # has finished and the long one has checkpoints (then 3-4 epochs to go); --resume finds everything in S3.
    # The tracking server is away from the start of the trials to the kill (the head's MLflow down
    # or slow): every write of that driver waits in its queue and dies with it; the resumed driver
    # writes the runs from what S3 holds (the checkpoints and Tune's results files).
    path = sweep_file(emulated, "resumed", space={"has.mixture": {"grid": ["8"]}, "optim.epochs": {"grid": [2, 6]}})
    driver = emulated.start_sweep("--space", str(path))
    away = False

    def finished_and_checkpointed():
        states = sorted(k for k in emulated.s3.keys("sweeps/resumed/experiment_state-"))
        state = emulated.s3.client().get_object(Bucket=BUCKET, Key=states[-1])["Body"].read().decode() if states else ""
        runs = train_checkpoints(emulated, "resumed").values()
        return state.count("TERMINATED") >= 1 and len(runs) == 2 and all(len(c) >= 2 for c in runs) and state

    try:
        wait_for(lambda: "tracking: MLflow at" in driver.log_path.read_text(), 120, "the driver's experiment in MLflow")
        emulated.mlflow.stop()
        away = True
        state = wait_for(finished_and_checkpointed, 300, "one finished trial and two checkpoints of the other in S3")
        assert state.count("TERMINATED") == 1, "the long trial ended before the driver was killed"
        done_before = {k: emulated.s3.client().get_object(Bucket=BUCKET, Key=k)["Body"].read()
                       for k in emulated.s3.keys("sweeps/resumed/") if k.endswith("/result.json")}
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        if away:
            emulated.mlflow.start()
    client = emulated.mlflow.client()
    assert not client.search_runs([client.get_experiment_by_name("resumed").experiment_id])  # nothing got through
    done = emulated.sweep("--resume", "resumed", "--storage-path", emulated.storage())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The finished trial was not run again: its results in S3 are as they were.
    def rows(text: bytes) -> list[dict]:
        return [json.loads(line) for line in text.decode().splitlines() if line.strip()]

    finished = [k for k, text in done_before.items()
                if rows(text) and rows(text)[-1]["config"]["grid"]["optim.epochs"] == 2 and rows(text)[-1]["epoch"] == 2]
    assert len(finished) == 1 and all(emulated.s3.client().get_object(Bucket=BUCKET, Key=k)["Body"].read() == done_before[k]
                            for k in finished)
    # The restarted Tune trial starts its iterations at 1, Ray Train resumed at the epoch after its
    # checkpoint: MLflow has each epoch once, at its own step; the finished trial's run is made and ended.
    assert "were missing from its run" in done.stderr
    assert_tracked_in_full(emulated, "resumed", trials=2)


# ---- every shipped sweep file, shrunk ------------------------------------------------------------

SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))
# What a CPU test cannot keep, and why: no GPU here (gpus -> a CPU share per worker); no download
# here (ImageNet weights -> random init: the backbones' shapes and schedules are what is tested;
# weights a pip package installs, efficientnet_lite0_cam's, are kept and loaded on the workers);
# the folder datasets (CUB, ILSVRC) -> voc-animals photos on each worker node, at 64 px.
# (64 px: the paper's largest patch, 56 px, must fit in the input)
SMALL_DATA = {"root": "$HAS_NODE_DATA/voc", "resize_size": 72, "crop_size": 64, "batch_size": 4, "workers": 0}


def first(values: list) -> list:
    return values[:1]


def shrink_stages(optim: dict, prefix: str) -> None:
    """A 'multistep' schedule in 2 epochs: its first and last stages, the last from epoch 1."""
    if f"{prefix}milestones" in optim:
        optim[f"{prefix}milestones"] = [1]
        for name in (f"{prefix}lr_factors", f"{prefix}weight_decay_factors"):
            if optim.get(name):
                optim[name] = [optim[name][0], optim[name][-1]]


def shrink(sweep: dict, storage: str) -> dict:
    """The same sweep, smaller: its search algorithm, scheduler, eval cadence, workers per trial and
    storage kind (S3) kept; the data, image size, epochs, seeds (the first) and trial count shrunk."""
    sweep = json.loads(json.dumps(sweep))
    base = sweep.setdefault("base", {})
    data = base.setdefault("data", {})
    if data.get("name", "synthetic") == "synthetic":
        data["synthetic"] = {"train_size": 128, "val_size": 32, "test_size": 32}
        data["batch_size"] = 64
    else:
        data.update(SMALL_DATA)
    model = base.get("model", {})
    if model.get("weights") == "imagenet" and model.get("backbone") not in _PACKAGED_WEIGHTS:
        base["model"]["weights"] = None
    base.setdefault("optim", {}).update({"epochs": 2})
    base["optim"].pop("step_epochs", None)
    shrink_stages(base["optim"], "")
    evaluation = base.setdefault("eval", {})
    evaluation.update({"interval": 0.05, "test_interval": 0.05, "workers": 1, "overlay_count": 4})
    base["threads"] = 1
    for key, domain in sweep.get("space", {}).items():
        if isinstance(domain, dict) and "grid" in domain:
            domain["grid"] = first(domain["grid"])
            for bundle in domain["grid"]:
                if isinstance(bundle, dict) and "optim.epochs" in bundle:
                    bundle["optim.epochs"], bundle["optim.step_epochs"] = 2, 1
                if isinstance(bundle, dict):
                    shrink_stages(bundle, "optim.")
        if key == "has.mixture" and isinstance(domain, dict) and "randint" in domain:  # patches fit the input
            side = SMALL_DATA["crop_size"] if data.get("name", "synthetic") != "synthetic" else 48
            domain["randint"] = [domain["randint"][0], min(domain["randint"][1], side + 1)]
    sweep["seeds"] = first(sweep.get("seeds", [0]))
    search = sweep.setdefault("search", {})
    if search.get("algorithm") in ("random", "optuna"):
        search["num_samples"] = 1
    scheduler = sweep.get("scheduler", {})
    if scheduler.get("name") == "asha":
        scheduler["grace_period"] = 1
    resources = sweep.setdefault("resources", {})
    workers = resources.get("workers", 1)
    resources.update({"gpus": 0, "cpus": 0.4 if workers > 1 else 1})
    sweep["max_concurrent_trials"] = 2
    sweep["storage"] = {**sweep.get("storage", {}), "path": storage, "sync_seconds": 1}
    return sweep


# quickstart.yaml also runs by default, locally, in test_sweep_ray.py's quickstart test; wsol_imagenet.yaml
# is wsol_cub.yaml's space and recipe with 4-worker DDP trials, which the node- and driver-kill tests run:
# here both are extended (the suite's 15 minutes).
EXTENDED = {"quickstart.yaml", "wsol_imagenet.yaml"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.extended) if p.name in EXTENDED else p
                                  for p in SHIPPED], ids=[p.stem for p in SHIPPED])
def test_every_shipped_sweep_file_runs_end_to_end_on_the_cluster(emulated, path):
    import yaml

    shipped = yaml.safe_load(path.read_text())
    small = shrink(shipped, emulated.storage("shipped"))
    kept = ("search", "scheduler")
    assert {k: (small.get(k) or {}).get("name") if k == "scheduler" else None for k in kept} == \
        {k: (shipped.get(k) or {}).get("name") if k == "scheduler" else None for k in kept}
    assert small["seeds"] == shipped.get("seeds", [0])[:1] and small["base"].get("eval", {}).get("every") == \
        shipped.get("base", {}).get("eval", {}).get("every")
    assert small["resources"].get("workers", 1) == shipped.get("resources", {}).get("workers", 1)
    assert small["search"].get("algorithm") == shipped.get("search", {}).get("algorithm")
    target = emulated.folder / f"shipped_{path.name}"
    target.write_text(yaml.safe_dump(small))
    # Models are logged by the tests above; here the checkpoints in S3 keep them (ResNet50 and VGG16
    # state_dicts through the tracking server would only cost the test minutes).
    done = emulated.sweep("--space", str(target), "--log-model", "none")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert f"checks: storage {emulated.storage('shipped')} written by a worker node and read back here" in done.stdout
    if small["base"]["data"].get("name", "synthetic") != "synthetic":  # only on the workers: the driver has none
        assert f"checks: data {small['base']['data']['name']} at $HAS_NODE_DATA/voc on worker node" in done.stdout
    name = small.get("name", path.stem)
    assert f"sweep {name}: " in done.stdout and emulated.s3.keys(f"shipped/{name}/has_sweep.json")
    client = emulated.mlflow.client()
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    children = [r for r in runs if r.data.tags["has_sweep.role"] == "trial"]
    assert children and all(c.data.params["seed"] == str(small["seeds"][0]) for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        epochs = [m.step for m in client.get_metric_history(child.info.run_id, "epoch")]
        if child.data.tags["status"] == "stopped_early":  # ASHA's cut: the epochs it ran, then no more
            assert epochs == list(range(1, int(child.data.tags["stopped_at_epoch"]) + 1)) and len(epochs) < 2
        else:
            assert child.data.tags["status"] == "completed" and epochs == [1, 2]
        every = small["base"].get("eval", {}).get("every", 1)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/cls_top1")] == \
            [e for e in epochs if e % every == 0 or e == 2]
