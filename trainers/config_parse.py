"""Strict conversion of plain dicts (YAML, dotted overrides) into frozen config dataclasses."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml


class _Loader(yaml.SafeLoader):
    """yaml.safe_load with YAML 1.2's scalars: 1e-5 is a number (not the string '1e-5') and only
    true/false are booleans (`amp: off` is the string 'off', not False as in YAML 1.1)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str):
    """Plain data from YAML text, safely, with YAML 1.2 numbers and booleans (see _Loader)."""
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config value or key that is not allowed; the message names the dotted key and what is allowed."""


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(kind))
    if typing.get_origin(kind) in (Union, types.UnionType):
        return " or ".join(_type_name(k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return f"a list of {_type_name(typing.get_args(kind)[0])}"
    if typing.get_origin(kind) is dict:
        return f"a mapping of {_type_name(typing.get_args(kind)[0])} to {_type_name(typing.get_args(kind)[1])}"
    if kind is type(None):
        return "null"
    return {int: "an int", float: "a number", bool: "true/false", str: "a string"}.get(kind, getattr(kind, "__name__", str(kind)))


def _convert(value: Any, kind: Any, key: str) -> Any:
    """`value` as type `kind`, or ConfigError naming the key, the value and the allowed type."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: {value!r} is not a mapping of {kind.__name__} keys")
        return build(kind, value, f"{key}.")
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {_type_name(kind)}")
    if origin is Literal:
        if value in typing.get_args(kind):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {_type_name(kind)}")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {_type_name(kind)}")
        key_kind, value_kind = typing.get_args(kind)
        return {_convert(k, key_kind, f"{key}.{k}"): _convert(v, value_kind, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {_type_name(kind)}")
        item_kind = typing.get_args(kind)[0]
        return tuple(_convert(item, item_kind, f"{key}[{i}]") for i, item in enumerate(value))
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is Any:
        return value
    else:
        raise TypeError(f"config field {key} has an unsupported type {kind!r}")
    raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {_type_name(kind)}")


def unknown_key_error(key: str, name: str, allowed: Sequence[str]) -> ConfigError:
    """The error for a key that does not exist, with the closest valid key suggested."""
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
    hint = f"; did you mean {key.rpartition('.')[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
    return ConfigError(f"{key}: unknown key{hint} allowed keys here: {', '.join(allowed)}")


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass `cls` from a plain mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    values = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise unknown_key_error(key, str(name), fields)
        values[name] = _convert(value, hints[name], key)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # a __post_init__ check: name the dotted key
        message = str(error)
        field_name = message.split(":", 1)[0].split(" ", 1)[0].split(".", 1)[0]
        if field_name in fields:
            raise ConfigError(f"{prefix}{message}") from None
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {message}") from None


def to_dict(config: Any) -> Any:
    """A plain, YAML-safe dict of a config dataclass tree (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple):
        return [to_dict(v) for v in config]
    return config


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def set_dotted(data: dict[str, Any], key: str, value: Any, cls: type | None = None) -> None:
    """data[a][b] = value for key 'a.b', checking each part against dataclass `cls` when given."""
    parts = key.split(".")
    node, kind = data, cls
    for depth, part in enumerate(parts):
        if kind is not None:
            names = [f.name for f in dataclasses.fields(kind)]
            if part not in names:
                raise unknown_key_error(".".join(parts[: depth + 1]), part, names)
            kind = typing.get_type_hints(kind)[part]
            kind = kind if dataclasses.is_dataclass(kind) else None
        if depth == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=0.1' -> ('optim.lr', 0.1); the value is read as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not dotted.key=value")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
