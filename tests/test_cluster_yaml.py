"""cluster.yaml passes Ray's own autoscaler schema (offline), and holds what the sweep relies on."""
import copy
import re
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"


def load():
    return yaml.safe_load(CLUSTER.read_text())


def pins() -> dict[str, str]:
    lines = (ROOT / "cluster" / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_cluster_yaml_is_valid_for_ray_up():
    validate_config(prepare_config(load()))


def test_the_validator_really_checks_it():
    broken = copy.deepcopy(load())
    broken["available_node_types"]["gpu_worker"]["min_wokers"] = 0  # a typo Ray must refuse
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_the_head_runs_no_trial_and_starts_the_authenticated_mlflow_server_with_artifacts_in_s3():
    config = load()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    start = config["head_start_ray_commands"]
    assert start[-1] == ("MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow-artifacts "
                         "bash /home/ray/has-sweep/cluster/start_mlflow.sh")
    script = (ROOT / "cluster" / "start_mlflow.sh").read_text()
    assert "--app-name basic-auth" in script and 'echo "$uri" > "$home/tracking_uri"' in script


def test_the_mlflow_store_lives_on_a_host_volume_that_outlives_the_container():
    docker = load()["docker"]
    volumes = [o.split()[1] for o in docker["head_run_options"] if o.startswith("-v ")]
    assert any(v.endswith(":/home/ray/mlflow") and v.startswith("/home/ubuntu/") for v in volumes)
    script = (ROOT / "cluster" / "start_mlflow.sh").read_text()
    assert "home=${MLFLOW_HOME:-/home/ray/mlflow}" in script  # the store, auth db and secrets sit there


def test_every_worker_type_reaches_s3_through_an_instance_profile():
    config = load()
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue  # Ray's bootstrap gives the head its role
        profile = node_type["node_config"]["IamInstanceProfile"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", profile["Arn"]), name


def test_workers_declare_integer_gpus_and_every_node_installs_the_project_with_one_command():
    config = load()
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["resources"] == {"CPU": 48, "GPU": 4} and worker["max_workers"] >= 1
    assert config["setup_commands"] == ["bash /home/ray/has-sweep/cluster/install.sh"]
    assert config["file_mounts"]["/home/ray/has-sweep"] == "."
    install = (ROOT / "cluster" / "install.sh").read_text()
    assert '--constraint "$repo/cluster/constraints.txt" -e "$repo[cluster]"' in install


def test_the_image_and_the_pins_are_the_ray_the_tests_ran_with():
    image = load()["docker"]["image"]
    tag = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu", image)
    assert tag, f"{image}: pin an exact Ray version, never latest"
    assert tag.group(1) == pins()["ray"] == ray.__version__
    assert {"torch", "torchvision", "mlflow"} <= set(pins())


def test_nothing_local_is_shipped_to_the_nodes():
    config = load()
    assert {".git", ".venv", "mlflow.db", "mlruns", "ray_results"} <= set(config["rsync_exclude"])
    assert config["rsync_filter"] == [".gitignore"]
