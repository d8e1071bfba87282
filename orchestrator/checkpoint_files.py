"""Reading what the driver logs out of a trial's checkpoint in storage (and its Tune results file), and nothing else.

A checkpoint folder (trainers/checkpoint.py) holds state.pt (model, optimizer, ...: tens to hundreds
of MB), config.yaml, metrics.json and artifacts/ (a few PNGs and a Parquet file: tens of KB). Every
epoch the driver needs only the small files; the model once, at the end of a trial. The copies go
through the storage's own filesystem (S3, GCS, a local or shared path), so they work wherever the
checkpoint lives, and on a thread pool, so Tune's event loop never waits on them.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

EVERY_EPOCH = ("metrics.json", "config.yaml")  # and everything under artifacts/
ARTIFACTS = "artifacts"
MODEL = "state.pt"


@dataclass(frozen=True)
class CheckpointLocation:
    filesystem: object  # pyarrow.fs.FileSystem
    path: str

    @classmethod
    def of(cls, checkpoint) -> CheckpointLocation:
        """Of a ray.tune / ray.train Checkpoint (its own filesystem and path)."""
        return cls(checkpoint.filesystem, checkpoint.path)


class FetchCounter:
    """Bytes the driver read from storage (thread-safe): the cost the benchmark reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.files = 0

    def add(self, size: int) -> None:
        with self._lock:
            self.bytes += size
            self.files += 1


def _copy(location: CheckpointLocation, relative: str, target: Path, counter: FetchCounter | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with location.filesystem.open_input_stream(f"{location.path}/{relative}") as source, target.open("wb") as out:
        size = 0
        while chunk := source.read(1 << 20):
            out.write(chunk)
            size += len(chunk)
    if counter is not None:
        counter.add(size)


def fetch_epoch_files(location: CheckpointLocation, target: Path, counter: FetchCounter | None = None) -> Path:
    """metrics.json, config.yaml and artifacts/ of a checkpoint into `target` (never state.pt)."""
    import pyarrow.fs as pafs

    for name in EVERY_EPOCH:
        info = location.filesystem.get_file_info(f"{location.path}/{name}")
        if info.type == pafs.FileType.File:
            _copy(location, name, target / name, counter)
    selector = pafs.FileSelector(f"{location.path}/{ARTIFACTS}", allow_not_found=True, recursive=True)
    for info in location.filesystem.get_file_info(selector):
        if info.type == pafs.FileType.File:
            relative = info.path[len(location.path.rstrip("/")) + 1:]
            _copy(location, relative, target / relative, counter)
    if not (target / "metrics.json").is_file():
        raise FileNotFoundError(f"{location.path}: no metrics.json (not an epoch checkpoint, or deleted before it was read)")
    return target


def fetch_file(location: CheckpointLocation, relative: str, target: Path, counter: FetchCounter | None = None) -> Path:
    """One file of a checkpoint (the final model, an overlay) into `target`."""
    _copy(location, relative, target, counter)
    return target


def checkpoint_metrics(filesystem, folder: str, epochs: range) -> dict[int, tuple[str, dict]]:
    """{epoch: (checkpoint path, its metrics.json)} of the checkpoints in `folder` of these epochs."""
    import pyarrow.fs as pafs

    found = {}
    for info in filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with filesystem.open_input_stream(f"{info.path}/metrics.json") as stream:
                metrics = json.loads(stream.read())
        except (OSError, ValueError):
            continue  # half-written or deleted meanwhile
        if int(metrics.get("epoch", 0)) in epochs:
            found[int(metrics["epoch"])] = (info.path, metrics)
    return found


def result_rows(filesystem, path: str, epochs: range) -> dict[int, dict]:
    """{epoch: the last row of that epoch} of a Tune results file (JSON lines) of these epochs; {}
    when there is none. A row written twice (a trial restored behind its last report) keeps the last."""
    try:
        with filesystem.open_input_stream(path) as stream:
            text = stream.read().decode()
    except OSError:  # FileNotFoundError included
        return {}
    rows = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
            epoch = int(row.get("epoch", 0))
        except (ValueError, TypeError, AttributeError):
            continue  # (a partial last line)
        if epoch in epochs:
            rows[epoch] = row
    return rows
