"""Checks made before any trial starts, each where the checked thing lives.

The data is read by the trials on the worker nodes, so it is checked there, by a Ray task shaped
like one trial worker (on an autoscaling cluster that also makes the autoscaler start such a node).
Storage is written by the trials and read by the driver: a worker writes a probe file through the
storage URI (or the shared path), the driver reads it back, so missing credentials, a missing
instance profile or a path that is not really shared are found before the first epoch.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from orchestrator.spaces import SweepInputError, SweepSpec
from orchestrator.storage import join, open_filesystem, read_text, write_text

WAIT_NOTICE_SECONDS = 30.0  # how often a waiting check says that it waits


def worker_task_options(spec: SweepSpec) -> dict[str, Any]:
    """Ray task options asking for exactly what one trial worker asks for: it lands where a trial would."""
    resources = spec.fields.resources
    return {"num_cpus": resources.cpus, "num_gpus": resources.gpus, "resources": dict(resources.extra),
            "max_retries": 0}


def run_like_a_trial(spec: SweepSpec, function, *args, what: str, timeout: float = 900.0):
    """`function(*args)` on a node of the trials' type; waits (saying so) while the cluster starts one."""
    import ray

    task = ray.remote(function).options(**worker_task_options(spec)).remote(*args)
    deadline = time.monotonic() + timeout
    while True:
        ready, _ = ray.wait([task], timeout=WAIT_NOTICE_SECONDS)
        if ready:
            return ray.get(task)
        if time.monotonic() >= deadline:
            ray.cancel(task, force=True)
            raise SweepInputError(f"{spec.source}: resources: no node with {spec.fields.resources.per_worker()} free "
                                  f"for {timeout:.0f} s to check {what}; is the cluster busy, or its workers failing to start?")
        print(f"checks: waiting for a node of the trials' type to check {what} (the autoscaler may be starting one)")


def node_data_report(data: dict[str, Any]) -> tuple[str, str | None, str, str | None]:
    """On a worker node: (node name, the problem or None, a one-line summary, the digest of its
    metadata) of the dataset there."""
    import socket

    from orchestrator.dataset_input import metadata_digest
    from trainers.config import DataConfig
    from trainers.config_parse import build
    from trainers.datasets.check import DatasetError, check_dataset, require_clean

    config = build(DataConfig, data)
    node = socket.gethostname()
    root, metadata = config.folders()
    for path, key in ((root, "data.root"), (metadata, "data.metadata")):
        if not path.is_dir():
            return node, f"{key}: {path} is not a folder on this node (the {config.name} dataset)", "", None
    try:
        _, note = require_clean(check_dataset(root, metadata, decode=False, workers=1), strict=config.strict)
    except DatasetError as error:
        return node, f"the {config.name} dataset at {root} has problems:\n{error}", "", None
    return node, None, note, metadata_digest(metadata)


def check_data(spec: SweepSpec, data: dict[str, Any]) -> tuple[str, dict[str, str] | None]:
    """Folder datasets: the metadata and files, checked once on a node of the trials' type.
    Returns a line saying what was checked, and {'root', 'digest'} of the metadata found there."""
    if data.get("name", "synthetic") == "synthetic":
        return "synthetic (made in each trial)", None
    node, problem, note, digest = run_like_a_trial(spec, node_data_report, data, what="the data")
    if problem is not None:
        raise SweepInputError(f"{spec.source}: checked on worker node {node}: {problem}")
    return (f"{data['name']} at {data.get('root')} on worker node {node}: {note} (metadata digest {digest})",
            {"root": str(data.get("root")), "digest": digest})


def write_probe(root: str, name: str, token: str) -> str:
    """On a worker node: write a probe file into the storage root; returns the node, or raises with why."""
    import socket

    write_text(root, name, token)
    return socket.gethostname()


def check_storage(spec: SweepSpec, root: str, several_nodes: bool) -> None:
    """A worker writes through the storage path; the driver must read the same file back."""
    if several_nodes and "://" not in root and not spec.fields.storage.shared:
        raise SweepInputError(
            f"{spec.source}: storage.path: {root!r} is local to this node, and trials run on other nodes: they "
            "could not resume from their checkpoints. Use a shared URI (--storage-path s3://bucket/sweeps) "
            "or a path every node mounts with storage.shared: true")
    name, token = f".has-sweep-probe-{uuid.uuid4().hex}", uuid.uuid4().hex
    try:
        node = run_like_a_trial(spec, write_probe, root, name, token, what="the storage")
    except SweepInputError:
        raise
    except Exception as error:  # noqa: BLE001 - the worker's own error, shown to the user
        raise SweepInputError(f"{spec.source}: storage.path: a worker node cannot write to {root}: "
                              f"{_first_line(error)} (credentials, instance profile or bucket?)") from None
    try:
        seen = read_text(root, name)
        filesystem, base = open_filesystem(root)
        filesystem.delete_file(join(base, name))
    except (OSError, FileNotFoundError) as error:
        raise SweepInputError(f"{spec.source}: storage.path: worker node {node} wrote to {root}, but this driver "
                              f"cannot read it back ({_first_line(error)}): the path is not shared") from None
    if seen != token:
        raise SweepInputError(f"{spec.source}: storage.path: {root} on worker node {node} and on the driver are "
                              "not the same storage")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]
