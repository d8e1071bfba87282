"""The storage commands docs/cluster.md runs on the nodes (python -m orchestrator.storage), against
a real S3-compatible server on 127.0.0.1: a dataset to a worker's disk, the MLflow store to S3."""
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_emulation import BUCKET, S3Server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


def storage(s3, *args):
    env = {**os.environ, **s3.env, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "orchestrator.storage", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_a_dataset_goes_to_s3_and_back_to_a_workers_disk_file_for_file(s3, tmp_path):
    source = tmp_path / "CUB"
    for name, data in {"images/a/1.jpg": b"\xff\xd8one", "images/b/2.jpg": b"\xff\xd8two",
                       "metadata/train/image_ids.txt": b"a/1.jpg\n"}.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    up = storage(s3, "copy", str(source), f"s3://{BUCKET}/datasets/CUB")
    assert up.returncode == 0 and up.stdout.startswith("3 file(s) copied"), up.stderr
    assert sorted(k for k in s3.keys("datasets/CUB/") if not k.endswith("/")) == [  # (and folder markers)
"datasets/CUB/images/a/1.jpg", "datasets/CUB/images/b/2.jpg",
                                                 "datasets/CUB/metadata/train/image_ids.txt"]
    down = storage(s3, "copy", f"s3://{BUCKET}/datasets/CUB", str(tmp_path / "node" / "CUB"))
    assert down.returncode == 0, down.stderr
    copied = {p.relative_to(tmp_path / "node" / "CUB").as_posix(): p.read_bytes()
              for p in (tmp_path / "node" / "CUB").rglob("*") if p.is_file()}
    assert copied == {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()}


def test_a_missing_source_is_one_clear_error(s3, tmp_path):
    done = storage(s3, "copy", f"s3://{BUCKET}/datasets/nothing", str(tmp_path / "x"))
    assert done.returncode == 1 and done.stderr == f"error: s3://{BUCKET}/datasets/nothing: no such file or folder\n"
    assert not (tmp_path / "x").exists()


def test_the_live_mlflow_store_is_backed_up_whole(s3, tmp_path):
    database = tmp_path / "mlflow.db"
    with sqlite3.connect(database) as db:
        db.execute("create table runs (id text, status text)")
        db.executemany("insert into runs values (?, ?)", [("a", "FINISHED"), ("b", "RUNNING")])
    writer = sqlite3.connect(database)  # a server still holding it open
    done = storage(s3, "backup-sqlite", str(database), f"s3://{BUCKET}/mlflow/mlflow.db")
    writer.close()
    assert done.returncode == 0, done.stderr
    back = tmp_path / "restored.db"
    back.write_bytes(s3.client().get_object(Bucket=BUCKET, Key="mlflow/mlflow.db")["Body"].read())
    with sqlite3.connect(back) as db:
        assert db.execute("select id, status from runs order by id").fetchall() == [("a", "FINISHED"), ("b", "RUNNING")]
