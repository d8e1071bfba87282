"""cluster.yaml passes Ray's own autoscaler schema (offline), and says what the sweep relies on."""
import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def load():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_is_valid_for_ray_up():
    validate_config(prepare_config(load()))


def test_the_validator_really_checks_it():
    broken = copy.deepcopy(load())
    broken["available_node_types"]["gpu_worker"]["min_wokers"] = 0  # a typo Ray must refuse
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_the_head_runs_no_trial_and_serves_mlflow_on_its_private_address():
    config = load()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    start = " ".join(config["head_start_ray_commands"])
    assert "mlflow server --host $HEAD_IP --port 5000" in start
    assert "--backend-store-uri sqlite:////home/ray/mlflow/mlflow.db" in start
    assert "/home/ray/mlflow/tracking_uri" in start  # where the sweep finds it


def test_workers_declare_integer_gpus_and_install_the_project():
    config = load()
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["resources"] == {"CPU": 48, "GPU": 4} and worker["max_workers"] >= 1
    assert any("pip install" in c and "/home/ray/has-sweep" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ray/has-sweep"] == "."
