"""`ray up` for real: Ray's local provider reaches a node over SSH (Debian's sshd, tests/ssh_node.py) and runs
cluster.yaml's own file mounts, setup and start commands there (cluster/local.py derives the config); a tiny
sweep runs on that cluster the way docs/cluster.md says, against the MLflow server the head started
(authentication on, artifacts in S3: moto's server); then `ray down`."""
import getpass
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.local import CLUSTER_YAML, local_config
from ssh_node import BUCKET, SshNode, cannot_unshare, missing_tools

ROOT = Path(__file__).resolve().parent.parent
REPLACED = {"provider", "auth", "available_node_types", "head_node_type", "docker"}
RAY = str(Path(sys.executable).with_name("ray"))
SWEEP = ('{"name": "rayup", "base": {"data": {"synthetic": {"train_size": 192, "val_size": 48, "test_size": 40}, '
         '"batch_size": 64}, "optim": {"epochs": 2}, "eval": {"test_interval": 0.01}, "threads": 1}, '
         '"resources": {"cpus": 1}, "max_concurrent_trials": 1}\n')


def test_the_local_config_is_cluster_yaml_but_where_the_machines_come_from():
    cluster = yaml.safe_load(CLUSTER_YAML.read_text())
    local = local_config(head_ip="10.0.0.1", worker_ips=["10.0.0.2"], ssh_user="ubuntu",
                         ssh_private_key="~/.ssh/id_ed25519", bucket="their-bucket")
    assert set(local) == set(cluster) - {"docker", "available_node_types", "head_node_type"}
    assert local["provider"] == {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2"]}
    assert local["auth"] == {"ssh_user": "ubuntu", "ssh_private_key": "~/.ssh/id_ed25519"}
    for key in set(local) - REPLACED:  # file mounts, rsync filters, setup and start commands: the same
        expected = cluster[key]
        if key == "head_start_ray_commands":
            expected = [command.replace("s3://my-bucket/", "s3://their-bucket/") for command in expected]
        assert local[key] == expected, key
    assert local["head_start_ray_commands"][-1].startswith("MLFLOW_ARTIFACTS_DESTINATION=s3://their-bucket/")
    validate_config(prepare_config(local))  # Ray's own schema, as `ray up` checks it


# .git and report/ are kept off by rsync_exclude alone (not in .gitignore), the others by both
DECOYS = (".git/decoy", "report/decoy", "mlflow.db", ".venv/decoy", "mlruns/decoy", "orchestrator/__pycache__/decoy.pyc")


def staged_repository(target: Path) -> Path:
    """What `ray up` syncs from the repository (git's files, the ignored ones left out), plus decoys that
    cluster.yaml's rsync_exclude must keep off the node. A copy: Ray hashes every file under a file
    mount's folder at `ray up`, and the repository's own .venv is gigabytes."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    for decoy in DECOYS:
        (target / decoy).parent.mkdir(parents=True, exist_ok=True)
        (target / decoy).write_text("must not reach the node\n")
    return target


def missing_for_the_node() -> list[str]:
    """What cluster/install.sh adds to the project's requirements (the [cluster] extra) and this environment
    lacks (README's set-up installs [test] only): the node's pip fetches it, else it installs offline."""
    missing = []
    for text in importlib.metadata.requires("has-sweep") or []:
        requirement = Requirement(text)
        if not requirement.marker or not requirement.marker.evaluate({"extra": "cluster"}):
            continue
        try:
            if requirement.specifier.contains(importlib.metadata.version(requirement.name), prereleases=True):
                continue
        except importlib.metadata.PackageNotFoundError:
            pass
        missing.append(str(requirement))
    return missing


CHECK = r"""
import base64, configparser, json, os, urllib.error, urllib.request
from pathlib import Path
import boto3
from mlflow import MlflowClient

home = Path(os.environ["NODE_HOME"])
uri = (home / "mlflow" / "tracking_uri").read_text().strip()
credentials = configparser.ConfigParser()
credentials.read(home / ".mlflow" / "credentials")
user = credentials["mlflow"]["mlflow_tracking_username"]
password = credentials["mlflow"]["mlflow_tracking_password"]

def status(path, login=None):
    request = urllib.request.Request(uri + path)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code

search = "/api/2.0/mlflow/experiments/search?max_results=5"
os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, password
client = MlflowClient(uri)
experiment = client.get_experiment_by_name(os.environ["EXPERIMENT"])
runs = client.search_runs([experiment.experiment_id]) if experiment else []
s3 = boto3.client("s3")
def keys(prefix):
    return [o["Key"] for o in s3.list_objects_v2(Bucket=os.environ["BUCKET"], Prefix=prefix).get("Contents", [])]
print(json.dumps({
    "uri": uri, "health": status("/health"), "anonymous": status(search),
    "wrong_password": status(search, f"{user}:not-{password}"), "login": status(search, f"{user}:{password}"),
    "experiment": bool(experiment),
    "runs": [(r.data.tags.get("has_sweep.role"), r.info.status) for r in runs],
    "artifacts": keys("mlflow-artifacts/"), "sweeps": keys("sweeps/"),
}))
"""


@pytest.mark.slow
def test_ray_up_runs_cluster_yaml_on_a_node_over_ssh_and_a_sweep_on_it(tmp_path):
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install openssh-server rsync iproute2 procps: .ci/run)")
    refused = cannot_unshare()
    if refused:
        pytest.skip(f"cannot make private pid/mount/network namespaces for the SSH node (root needed): {refused}")
    started = time.monotonic()
    fetched = missing_for_the_node()
    node = SshNode(tmp_path / "node", offline=not fetched)
    config_file = tmp_path / "cluster_local.yaml"
    log = tmp_path / "ray.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))},
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(tmp_path / "client")}  # the local provider's state and lock files

    def ray(*args, timeout):
        with open(log, "a") as out:
            out.write(f"\n$ ray {' '.join(args)}\n")
            out.flush()
            done = subprocess.run([RAY, *args], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        if done.returncode:
            text = log.read_text()[-6000:]
            server = node.home / "mlflow" / "server.log"
            if server.exists():
                text += f"\n--- {server} ---\n{server.read_text()[-2000:]}"
            pytest.fail(f"ray {args[0]} failed ({done.returncode}):\n{text}")

    cluster_name = f"has-sweep-rayup-{os.getpid()}"
    ours = Path(sysconfig.get_paths()["purelib"]) / "has_sweep-0.1.0.dist-info" / "direct_url.json"
    ours_before = ours.read_text() if ours.exists() else None
    try:
        node.start()
        node.python(f"import boto3, json; boto3.client('s3').create_bucket(Bucket={BUCKET!r}); print(json.dumps(1))")
        repo = staged_repository(tmp_path / "repo")
        config = local_config(head_ip="127.0.0.1", ssh_user="root", ssh_private_key=str(node.key),
                              ssh_proxy_command=node.proxy_command, bucket=BUCKET,
                              cluster_name=cluster_name)
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))

        ray("up", "-y", "--no-config-cache", str(config_file), timeout=300)
        synced = node.home / "has-sweep"
        assert (synced / "cluster" / "install.sh").is_file() and (synced / "orchestrator" / "sweep.py").is_file()
        for decoy in DECOYS:
            assert not (synced / decoy).exists(), f"rsync_exclude/rsync_filter let {decoy} reach the node"
        assert (node.home / "mlflow" / "server.pid").is_file()
        # install.sh installed the synced copy into the node's Python, not over this environment's install
        installed = json.loads(next(node.venv.glob("lib/python*/site-packages/has_sweep-*.dist-info/direct_url.json"))
                               .read_text())
        assert installed["url"] == "file:///home/ray/has-sweep", installed
        assert (ours.read_text() if ours.exists() else None) == ours_before

        (node.home / "rayup.yaml").write_text(SWEEP)  # JSON is YAML
        # docs/cluster.md, step 3 (no --tmux: the test waits for it); the sweep reads the tracking URI
        # and the login that cluster/start_mlflow.sh left on the head by itself
        ray("exec", str(config_file), "cd ~/has-sweep && python -m orchestrator.sweep --space ~/rayup.yaml "
            f"--storage-path s3://{BUCKET}/sweeps", timeout=300)

        seen = node.python(CHECK, env={"NODE_HOME": str(node.home), "EXPERIMENT": "rayup", "BUCKET": BUCKET})
        assert seen["uri"] == "http://127.0.0.1:5000"  # start_mlflow.sh's default: the node's address
        assert seen["health"] == 200
        assert seen["anonymous"] == 401 and seen["wrong_password"] == 401 and seen["login"] == 200
        assert seen["experiment"], seen
        runs = sorted(tuple(run) for run in seen["runs"])  # (role, status): the sweep's run and its trial's
        assert runs == [("sweep", "FINISHED"), ("trial", "FINISHED")], runs
        assert seen["artifacts"], f"no MLflow artifact reached s3://{BUCKET}/mlflow-artifacts/"
        assert any(key.startswith("sweeps/rayup/") for key in seen["sweeps"]), seen["sweeps"][:10]

        ray("down", "-y", str(config_file), timeout=120)
        left = [line for line in node.processes() if "raylet" in line or "gcs_server" in line]
        assert not left, f"ray down left Ray running: {left}"
    finally:
        node.stop()
        # ssh's connection sharing folder for this cluster (Ray's SSHCommandRunner names it so)
        user, name = (hashlib.sha256(text.encode()).hexdigest()[:10] for text in (getpass.getuser(), cluster_name))
        shutil.rmtree(f"/tmp/ray_ssh_{user}/{name}", ignore_errors=True)
        print(f"ray up, sweep, checks, ray down: {time.monotonic() - started:.0f} s; log {log}"
              + (f"; the node's pip fetched {fetched}" if fetched else "; the node installed offline"))
