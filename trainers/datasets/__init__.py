"""Datasets: the embedded synthetic set and folders in the wsolevaluation layout.

Kept free of heavy imports so that `python -m trainers.datasets --help` is instant; `RunData` and
`build_data` live in trainers/datasets/run_data.py.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("RunData", "build_data", "SPLITS"):
        from trainers.datasets import run_data

        return getattr(run_data, name)
    raise AttributeError(f"module 'trainers.datasets' has no attribute {name!r}")
