"""Run names that tell a sweep's trials apart at a glance in the MLflow UI's runs table.

`tiny_cnn | 24 | dataset_mean | p 0.5 | lr 0.0316 | seed 1`: the backbone and HaS variant (fill
and p_hide only when something is hidden), every other key the sweep searches, under its shortest
unambiguous name, and the seed. Numbers keep 3 significant digits; the full values are the params.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

MAX_CHARS = 250  # MLflow's limit on a run name
VARIANT = ("model.backbone", "has.mixture", "has.fill", "has.p_hide")


def short_names(keys: Iterable[str]) -> dict[str, str]:
    """key -> its last dotted part, or as many last parts as it takes to differ from the other keys."""
    keys = list(dict.fromkeys(keys))
    names = {}
    for key in keys:
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):
            tail = ".".join(parts[-depth:])
            if not any(other != key and ".".join(other.split(".")[-depth:]) == tail for other in keys):
                break
        names[key] = tail
    return names


def shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def run_name(config: Mapping[str, Any], searched: Iterable[str]) -> str:
    """The name of a trial's run from its flattened config and the keys the sweep searches."""
    parts = [shown(config[k]) for k in VARIANT[:2] if k in config]
    if config.get("has.mixture", "none") != "none":
        parts += [shown(config[k]) if k != "has.p_hide" else f"p {shown(config[k])}" for k in VARIANT[2:] if k in config]
    others = [k for k in searched if k not in VARIANT and k != "seed" and k in config]
    parts += [f"{name} {shown(config[key])}" for key, name in short_names(others).items()]
    parts.append(f"seed {config.get('seed')}")
    return " | ".join(parts)[:MAX_CHARS]
