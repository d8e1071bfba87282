"""The data a trial trains and evaluates on, as an MLflow dataset input of its run.

MLflow 3 shows a run's dataset inputs (name, source, digest) in the run page and the runs table, and
links metrics to them. The data lives on the worker nodes, not on the driver, so the digest of a
folder dataset is the one the pre-launch check computed there (over its metadata files: image lists,
labels, boxes; not the images); the embedded synthetic set is made from its config, so its digest is
the config's.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

DIGEST_CHARS = 12  # MLflow shows digests this short; 48 bits tell any two versions of one dataset apart
SYNTHETIC_SOURCE = "trainers.datasets.synthetic"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]


def metadata_digest(folder: Path) -> str:
    """Of every file under a metadata folder: its path relative to the folder and its bytes."""
    hasher = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        hasher.update(path.relative_to(folder).as_posix().encode() + b"\0")
        hasher.update(path.read_bytes() + b"\0")
    return hasher.hexdigest()[:DIGEST_CHARS]


def trial_dataset(data: dict[str, Any], checked: dict[str, str] | None = None) -> dict[str, str]:
    """name, source, digest of a trial's data config. `checked`: what the pre-launch check found on a
    worker node ({'root', 'digest'}); a trial whose root differs (a searched data.root) gets the
    digest of its data config instead, which still tells its runs apart."""
    name = data.get("name", "synthetic")
    if name == "synthetic":
        spec = json.dumps(data.get("synthetic", {}), sort_keys=True).encode()
        return {"name": "synthetic", "source": SYNTHETIC_SOURCE, "digest": _digest(spec)}
    root = str(data.get("root"))
    if checked and checked.get("root") == root and checked.get("digest"):
        digest = checked["digest"]
    else:
        digest = _digest(json.dumps({k: data.get(k) for k in ("name", "root", "metadata")}, sort_keys=True).encode())
    return {"name": name, "source": root, "digest": digest}


def dataset_input(dataset: dict[str, str]):
    """The MLflow entity for `log_inputs`: a dataset with context 'train' (its val and test splits
    are evaluated too; MLflow keeps one input per dataset and run)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    if dataset["source"] == SYNTHETIC_SOURCE:
        source = CodeDatasetSource(tags={"module": SYNTHETIC_SOURCE})
    else:  # a path on the worker nodes, or s3://, gs://, https://: MLflow's types for them
        try:
            with warnings.catch_warnings():  # MLflow registers two equal sources for local paths, and says so
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(dataset["source"])
        except Exception:  # noqa: BLE001 - a scheme MLflow has no source type for
            source = CodeDatasetSource(tags={"uri": dataset["source"]})
    entity = MetaDataset(source=source, name=dataset["name"], digest=dataset["digest"])._to_mlflow_entity()
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", "train")])
