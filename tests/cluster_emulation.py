"""A cluster on one machine that differs from one process where a real cluster differs.

- a Ray head that runs no trial (CPU 0, as in cluster.yaml) and worker nodes, each a separate
  raylet with its own environment: its own data folder ($HAS_NODE_DATA) and the S3 credentials,
  which the driver's environment does not give it;
- persistent storage only through the S3 protocol: moto's S3-compatible server on 127.0.0.1
  (as Ray's own storage tests), reached through AWS_ENDPOINT_URL like any S3 endpoint;
- the MLflow server started by cluster/start_mlflow.sh, the script cluster.yaml runs on the head:
  authentication on, artifacts in that S3 bucket; the driver finds its address and login the way
  it does on the head ($MLFLOW_HOME/tracking_uri, ~/.mlflow/credentials);
- the data only on the worker nodes: the driver's disk has none, so nothing works because the
  driver's disk is visible to the trials.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow_server import free_port

ROOT = Path(__file__).resolve().parent.parent
VOC = ROOT.parent / "shared" / "data" / "voc-animals"
BUCKET = "has-sweep"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
           "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}


def _wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError as error:
            if getattr(error, "code", None):  # an HTTP error code: the server answers
                return
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


class S3Server:
    """moto's S3-compatible server on 127.0.0.1 with one bucket."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a node with access to the bucket has (an instance profile, on AWS)."""
        return {**S3_KEYS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> S3Server:
        self.folder.mkdir(parents=True, exist_ok=True)
        moto = str(Path(sys.executable).with_name("moto_server"))
        self.process = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=open(self.folder / "moto.log", "ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        _wait_http(self.endpoint, 60)
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        _stop_group(self.process)


class HeadMlflow:
    """The tracking server as the head node runs it: cluster/start_mlflow.sh, detached, auth on."""

    def __init__(self, home: Path, s3: S3Server) -> None:
        self.home, self.s3, self.port = home, s3, free_port()

    @property
    def mlflow_home(self) -> Path:
        return self.home / "mlflow"

    @property
    def uri(self) -> str:
        return (self.mlflow_home / "tracking_uri").read_text().strip()

    @property
    def env(self) -> dict[str, str]:
        """The head's environment: the driver finds the server and its login there by itself."""
        return {"HOME": str(self.home), "MLFLOW_HOME": str(self.mlflow_home)}

    def start(self) -> HeadMlflow:
        env = {**os.environ, **self.s3.env, **self.env, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(self.port),
               "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow-artifacts",
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        done = subprocess.run(["bash", str(ROOT / "cluster" / "start_mlflow.sh")], env=env, capture_output=True,
                              text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"start_mlflow.sh failed:\n{done.stdout}\n{done.stderr}")
        return self

    def stop(self) -> None:
        pid_file = self.mlflow_home / "server.pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _alive(int(pid_file.read_text())):
                time.sleep(0.2)

    def client(self):
        """A client with the admin's login (what start_mlflow.sh wrote to ~/.mlflow/credentials)."""
        from mlflow import MlflowClient

        password = (self.mlflow_home / "admin_password").read_text().strip()
        os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password})
        return MlflowClient(self.uri)


def node_dataset(source: Path, target: Path, per_class: int = 12) -> Path:
    """A small wsolevaluation folder made from voc-animals' real photos, as a node's local copy."""
    subset = target.parent / f"{target.name}-voc"
    for animal in ("kangaroo", "raccoon"):
        xmls = sorted((source / f"{animal}-annotations").glob("*.xml"))[:per_class]
        for folder in (f"{animal}-annotations", f"{animal}-images"):
            (subset / folder).mkdir(parents=True, exist_ok=True)
        for xml in xmls:
            shutil.copy(xml, subset / f"{animal}-annotations" / xml.name)
            shutil.copy(source / f"{animal}-images" / f"{xml.stem}.jpg", subset / f"{animal}-images" / f"{xml.stem}.jpg")
    subprocess.run([sys.executable, "-m", "trainers.datasets", "convert-voc", str(subset), str(target),
                    "--splits", "0.5,0.25,0.25"], check=True, capture_output=True, cwd=ROOT)
    shutil.rmtree(subset)
    return target


class EmulatedCluster:
    """Ray head (CPU 0) + worker nodes with their own data folders and S3 access; S3; MLflow."""

    def __init__(self, folder: Path, workers: int = 2, cpus_per_worker: int = 2) -> None:
        self.folder = folder
        self.s3 = S3Server(folder / "s3")
        self.mlflow = HeadMlflow(folder / "head", self.s3)
        self.workers, self.cpus_per_worker = workers, cpus_per_worker
        self.cluster = None
        self.nodes: list = []
        self.added = 0

    def start(self) -> EmulatedCluster:
        os.environ.update(RAY_ENV)
        from ray.cluster_utils import Cluster

        self.s3.start()
        self.mlflow.start()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True,
            "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                               "health_check_failure_threshold": 3}})
        for _ in range(self.workers):
            self.add_worker()
        self.cluster.wait_for_nodes()
        return self

    def add_worker(self):
        """A worker node with its own disk (data folder) and S3 access in its own environment."""
        self.added += 1
        data = self.folder / f"node{self.added}"
        if not data.exists():
            node_dataset(VOC, data / "voc")
        # Each node's image cache (trainers/datasets/cache.py) on its own disk, as on a real cluster.
        node = self.cluster.add_node(num_cpus=self.cpus_per_worker,
                                     env_vars={**self.s3.env, **RAY_ENV, "HAS_NODE_DATA": str(data),
                                               "HAS_SWEEP_CACHE": str(data / "image-cache"), "PYTHONPATH": str(ROOT)})
        node.disk = data
        self.nodes.append(node)
        return node

    def kill_worker(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)

    @property
    def address(self) -> str:
        return self.cluster.address

    def storage(self, prefix: str = "sweeps") -> str:
        return f"s3://{BUCKET}/{prefix}"

    def driver_env(self) -> dict[str, str]:
        """The driver on the head: S3 access and the head's MLflow home; no data folder."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING_"))}
        env.pop("HAS_NODE_DATA", None)
        return {**env, **RAY_ENV, **self.s3.env, **self.mlflow.env, "PYTHONPATH": str(ROOT),
                "RAY_ADDRESS": self.address}

    def sweep(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.sweep", *args], capture_output=True, text=True,
                              env=self.driver_env(), cwd=self.folder, timeout=timeout)

    def start_sweep(self, *args: str) -> subprocess.Popen:
        path = self.folder / f"driver-{time.monotonic_ns()}.log"
        process = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", *args], stdout=open(path, "w"),
                                   stderr=subprocess.STDOUT, env=self.driver_env(), cwd=self.folder,
                                   start_new_session=True)
        process.log_path = path  # what the driver printed, for failure messages
        return process

    def shutdown(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
        self.mlflow.stop()
        self.s3.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop_group(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
