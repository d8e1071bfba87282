"""Epoch checkpoints: one folder per epoch, written whole or not at all.

    <output_dir>/checkpoints/epoch_0003/state.pt       model, optimizer, scheduler, scaler, RNG states
                                        config.yaml    the resolved config
                                        metrics.json   the epoch's metrics
                                        artifacts/     CAM overlays, curves, predictions of its evaluations
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from trainers.config import RUNTIME_KEYS, RunConfig, config_differences

_EPOCH_DIR = re.compile(r"^epoch_(\d{4,})$")


def epoch_dir_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Finished epoch checkpoints under `root`, oldest first (half-written ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _EPOCH_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(_EPOCH_DIR.match(p.name).group(1)))


def staging_dir(root: str | Path, epoch: int) -> Path:
    """A fresh hidden folder to assemble an epoch's checkpoint in before `publish`."""
    path = Path(root) / f".{epoch_dir_name(epoch)}.tmp"
    if path.exists():
        shutil.rmtree(path)  # left by a crash: never published, never read
    path.mkdir(parents=True)
    return path


def write_state(directory: Path, state: dict[str, Any], config: RunConfig, metrics: dict[str, float]) -> None:
    torch.save(state, directory / "state.pt")
    (directory / "config.yaml").write_text(config.to_yaml())
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))


def publish(staging: Path, root: str | Path, epoch: int, keep: int) -> Path:
    """Rename the staging folder to its final name (atomic), then drop all but the `keep` newest."""
    final = Path(root) / epoch_dir_name(epoch)
    if final.exists():
        shutil.rmtree(final)  # the same epoch again after a resume from an earlier one
    os.replace(staging, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(directory: str | Path) -> dict[str, Any]:
    """The state saved in an epoch checkpoint folder (tensors and plain values only)."""
    path = Path(directory) / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not an epoch checkpoint (no state.pt)")
    return torch.load(path, map_location="cpu", weights_only=True)


def check_resumable(directory: str | Path, config: RunConfig, allow_changes: frozenset[str] = frozenset()) -> None:
    """Refuse to resume from a checkpoint of a different config (but for `allow_changes`), listing every difference."""
    saved = RunConfig.from_dict(read_state(directory)["config"])
    differences = config_differences(saved, config, RUNTIME_KEYS | allow_changes)
    if differences:
        lines = "\n".join(f"  {key}: checkpoint {a!r}, now {b!r}" for key, (a, b) in differences.items())
        raise ValueError(f"{directory}: this checkpoint is of a different config; nothing was changed.\n{lines}\n"
                         "Resume with the checkpoint's config, or start a new run in another output_dir.")
