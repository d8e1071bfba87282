"""Sweep definitions: YAML -> a validated sweep spec -> a Ray Tune param space.

A sweep file has a `base` run config (trainers.config.RunConfig keys), a `space` of dotted keys
with fixed values or domains (grid, choice, uniform, loguniform, randint; for `has.mixture` also
named mixtures and `sampled_weights` over a set of sizes), `seeds` that replicate every
configuration, and the search / scheduler / resources of the sweep. Every grid point, and samples
of every random domain, become a RunConfig when the file is loaded: errors name the file and the
dotted key, before Ray starts.
"""
from __future__ import annotations

import difflib
import hashlib
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainers.config import RunConfig
from trainers.config_parse import ConfigError, build, load_yaml, set_dotted, unknown_key_error
from trainers.hide import format_mixture, parse_mixture

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint", "sampled_weights")
# A space key that is not a config key, with a grid of mappings, is a bundle: values that go together
# (a backbone with its schedule, a method with its settings), one grid axis.
SEED_KEY = "seed"
WEIGHT_PREFIX = "has.mixture.w"  # sampled mixture weights travel as has.mixture.w<size>


class SpaceError(ValueError):
    """A sweep file that is not allowed; the message names the file, the key and what is allowed."""


class SweepInputError(ValueError):
    """Bad input found before anything started (arguments, data, cluster): one line, exit code 2."""


@dataclass(frozen=True)
class Domain:
    kind: str  # one of DOMAINS
    values: tuple  # grid/choice values, (low, high) bounds, or the sizes of sampled_weights

    @property
    def is_random(self) -> bool:
        return self.kind not in ("grid", "bundle")

    def sample(self, rng: random.Random) -> Any:
        """One value drawn as Tune would (for validation and dry runs)."""
        if self.kind in ("grid", "choice"):
            return rng.choice(self.values)
        low, high = self.values
        if self.kind == "uniform":
            return rng.uniform(low, high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        return rng.randrange(low, high)

    def describe(self) -> str:
        if self.kind == "sampled_weights":
            return f"weights ~ U(0, 1) over sizes {list(self.values)}"
        return f"{self.kind}{list(self.values)}"


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0  # per worker
    gpus: float = 0.0  # per worker
    workers: int = 1  # > 1: a Ray Train TorchTrainer (DDP) inside the trial
    extra: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus < 0 or self.gpus < 0:
            raise ValueError(f"resources: workers >= 1, cpus >= 0, gpus >= 0 (got {self})")

    def per_worker(self) -> dict[str, float]:
        wanted = {"CPU": self.cpus, "GPU": self.gpus, **self.extra}
        return {name: amount for name, amount in wanted.items() if amount}

    def per_trial(self) -> dict[str, float]:
        """All a trial holds at once: its workers, plus the trial's own driver process when DDP."""
        total = {name: amount * self.workers for name, amount in self.per_worker().items()}
        if self.workers > 1:
            total["CPU"] = total.get("CPU", 0) + TRIAL_DRIVER_CPU
        return total


TRIAL_DRIVER_CPU = 0.1  # the Tune function that waits on a multi-worker TorchTrainer


@dataclass(frozen=True)
class SearchSpec:
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = 1  # random draws per grid point (random), or configurations tried (optuna)
    seed: int = 0


@dataclass(frozen=True)
class SchedulerSpec:
    name: Literal["fifo", "asha", "pbt"] = "fifo"
    grace_period: int = 1  # asha: epochs before the first cut
    reduction_factor: float = 3.0  # asha: keep 1 / this at each rung
    perturbation_interval: int = 2  # pbt: epochs between exploits


@dataclass(frozen=True)
class StorageSpec:
    path: str = "ray_results"  # local folder or a pyarrow filesystem URI (s3://bucket/prefix)
    shared: bool = False  # a local path that every node mounts (NFS): allowed on a multi-node cluster
    sync_seconds: float = 10.0  # how often the driver saves its state and syncs it to storage: what a killed
    # driver can lose (Tune's own default: every 10 s or more)


@dataclass(frozen=True)
class SweepFields:
    """The top-level keys of a sweep file besides base and space."""

    name: str = ""
    description: str = ""
    gpu_hours: float = 0.0  # the file's estimate, shown by --dry-run
    seeds: tuple[int, ...] = (0,)
    metric: str = "val/maxboxacc_v2"
    mode: Literal["max", "min"] = "max"
    search: SearchSpec = field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: Resources = field(default_factory=Resources)
    max_concurrent_trials: int = 0  # 0: as many as the cluster fits
    max_failures: int = 2  # retries of a failed trial, each from its last checkpoint
    # Trials reuse worker processes (Tune's reuse_actors): faster for short trials; false gives each trial a
    # fresh process (nothing kept between trials: memory, threads, CUDA state).
    reuse_workers: bool = True
    # What the paired differences under the final table compare each configuration with (same backbone):
    # KEY=VALUE[,KEY=VALUE] of run config keys, as `python -m orchestrator.report --baseline`.
    baseline: str = "has.mixture=none"
    storage: StorageSpec = field(default_factory=StorageSpec)


TOP_KEYS = ("base", "space", "mixtures", *[f for f in SweepFields.__dataclass_fields__])


@dataclass(frozen=True)
class SweepSpec:
    source: str  # the file, for messages
    fields: SweepFields
    base: dict[str, Any]
    fixed: dict[str, Any]  # dotted key -> value
    domains: dict[str, Domain]  # dotted key -> domain
    space_hash: str  # of the file's text: a restored sweep must have the same

    @property
    def name(self) -> str:
        return self.fields.name

    @property
    def grid_keys(self) -> list[str]:
        """The grid axes: config keys with a grid, and bundles (their names)."""
        return [k for k, d in self.domains.items() if d.kind in ("grid", "bundle")]

    @property
    def shown_keys(self) -> list[str]:
        """The config keys a grid point sets, bundles opened."""
        keys: list[str] = []
        for key in self.grid_keys:
            domain = self.domains[key]
            inner = [k for bundle in domain.values for k in bundle] if domain.kind == "bundle" else [key]
            keys += [k for k in inner if k not in keys]
        return keys

    @property
    def random_keys(self) -> list[str]:
        return [k for k, d in self.domains.items() if d.is_random]

    @property
    def choose_by(self) -> str | None:
        """The metric that picks each HaS variant's row when other hyperparameters are searched too."""
        return self.fields.metric if self.random_keys else None


SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_sweep_name(name: str, where: str) -> str:
    """A sweep name is one folder name under the storage root and an MLflow experiment: nothing else."""
    if not SWEEP_NAME.fullmatch(name) or ".." in name:
        raise SweepInputError(f"{where}: {name!r} is not a sweep name; allowed: 1-100 letters, digits, '.', '_', '-', "
                              "starting with a letter or digit, no '..' (it names a folder under the storage root)")
    return name


def _error(source: str, message: str) -> SpaceError:
    return SpaceError(f"{source}: {message}")


def _parse_domain(source: str, key: str, value: Any, mixtures: Mapping[str, Any]) -> Domain | None:
    """A Domain when `value` is {kind: args}, else None (a fixed value)."""
    if not (isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in DOMAINS):
        if isinstance(value, Mapping) and len(value) == 1 and isinstance(next(iter(value)), str) and key != "has.mixture":
            word = next(iter(value))
            close = difflib.get_close_matches(word, DOMAINS, n=1)
            hint = f" did you mean {close[0]}?" if close else ""
            raise _error(source, f"space.{key}: unknown domain {word!r};{hint} allowed: {', '.join(DOMAINS)}")
        return None
    kind, args = next(iter(value.items()))
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise _error(source, f"space.{key}: {kind} needs a non-empty list of values, got {args!r}")
        if key == "has.mixture":
            args = [_named_mixture(source, key, v, mixtures) for v in args]
        return Domain(kind, tuple(args))
    if kind == "sampled_weights":
        if key != "has.mixture":
            raise _error(source, f"space.{key}: sampled_weights is only for has.mixture")
        if not isinstance(args, list) or len(args) < 2 or not all(isinstance(s, int) and s >= 0 for s in args):
            raise _error(source, f"space.{key}: sampled_weights needs a list of >= 2 patch sizes (ints >= 0)")
        return Domain(kind, tuple(args))
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(v, (int, float)) for v in args)):
        raise _error(source, f"space.{key}: {kind} needs [low, high], got {args!r}")
    low, high = args
    if not low < high or (kind == "loguniform" and low <= 0):
        raise _error(source, f"space.{key}: {kind}{args} needs low < high" + (" and low > 0" if kind == "loguniform" else ""))
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise _error(source, f"space.{key}: randint needs integer bounds, got {args!r}")
    return Domain(kind, (low, high))


def _parse_bundle(source: str, key: str, value: Any, mixtures: Mapping[str, Any]) -> Domain | None:
    """{grid: [{dotted.key: value, ...}, ...]} under a name that is not a config key: a bundle axis."""
    try:
        set_dotted({}, key, None, RunConfig)
        return None  # a config key: not a bundle
    except ConfigError:
        pass
    options = value.get("grid") if isinstance(value, Mapping) and len(value) == 1 else None
    if not (isinstance(options, list) and options and all(isinstance(o, Mapping) and o for o in options)):
        return None  # an unknown key: reported as such by the caller
    bundles = []
    for option in options:
        clean = {}
        for inner, inner_value in option.items():
            try:
                set_dotted({}, str(inner), None, RunConfig)
            except ConfigError as error:
                raise _error(source, f"space.{key}: {error}") from None
            clean[str(inner)] = _named_mixture(source, str(inner), inner_value, mixtures) if inner == "has.mixture" else inner_value
        bundles.append(clean)
    return Domain("bundle", tuple(bundles))


def _named_mixture(source: str, key: str, value: Any, mixtures: Mapping[str, Any]) -> str:
    """A mixture value as its canonical string; names defined under `mixtures:` are replaced."""
    if isinstance(value, str) and value in mixtures:
        value = mixtures[value]
    try:
        return format_mixture(parse_mixture(value, f"space.{key}"))
    except ValueError as error:
        names = f" or one of the names under mixtures: {', '.join(mixtures)}" if mixtures else ""
        raise _error(source, f"{error}{names}") from None


def parse_space(text: str, source: str = "<sweep>") -> SweepSpec:
    """A SweepSpec from YAML text; every grid point and random samples are checked as RunConfigs."""
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as error:
        raise _error(source, f"not valid YAML: {error}") from None
    if not isinstance(data, Mapping):
        raise _error(source, "the top level must be a mapping (name, base, space, seeds, ...)")
    for key in data:
        if key not in TOP_KEYS:
            raise _error(source, str(unknown_key_error(str(key), str(key), list(TOP_KEYS))))
    mixtures = data.get("mixtures") or {}
    if not isinstance(mixtures, Mapping):
        raise _error(source, "mixtures: a mapping of names to mixtures")
    settings = {k: v for k, v in data.items() if k in SweepFields.__dataclass_fields__}
    settings.setdefault("name", Path(source).stem)
    try:
        fields_ = build(SweepFields, settings)
    except (ConfigError, ValueError) as error:
        raise _error(source, str(error)) from None
    if not fields_.seeds:
        raise _error(source, "seeds: at least one seed")
    if not fields_.storage.sync_seconds > 0:
        raise _error(source, f"storage.sync_seconds: {fields_.storage.sync_seconds:g} is not allowed; allowed: "
                             "a number of seconds > 0 (how often the driver's state reaches storage)")
    try:
        check_sweep_name(fields_.name, f"{source}: name")
    except SweepInputError as error:
        raise SpaceError(str(error)) from None
    base = data.get("base") or {}
    if not isinstance(base, Mapping):
        raise _error(source, "base: a mapping of run config sections (data, model, has, optim, eval)")
    space = data.get("space") or {}
    if not isinstance(space, Mapping):
        raise _error(source, "space: a mapping of dotted keys to values or domains")
    fixed, domains = {}, {}
    for key, value in space.items():
        key = str(key)
        if key == SEED_KEY:
            raise _error(source, "space.seed: use the top-level `seeds: [...]`, which replicates every configuration")
        bundle = _parse_bundle(source, key, value, mixtures)
        if bundle is not None:
            domains[key] = bundle
            continue
        try:
            set_dotted({}, key, None, RunConfig)  # the key exists in a RunConfig
        except ConfigError as error:
            raise _error(source, f"space.{error}") from None
        domain = _parse_domain(source, key, value, mixtures)
        if domain is None:
            fixed[key] = _named_mixture(source, key, value, mixtures) if key == "has.mixture" else value
        else:
            domains[key] = domain
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    spec = SweepSpec(source, fields_, dict(base), fixed, domains, digest)
    _check_combinations(spec)
    return spec


def _check_baseline(spec: SweepSpec) -> None:
    from orchestrator.paired import parse_baseline

    try:
        pairs = parse_baseline(spec.fields.baseline)
    except ValueError as error:
        raise _error(spec.source, f"baseline: {str(error).removeprefix('--baseline: ')}") from None
    for key in pairs:
        try:
            set_dotted({}, key, None, RunConfig)
        except ConfigError as error:
            raise _error(spec.source, f"baseline: {error}") from None


def load_space(path: str | Path) -> SweepSpec:
    """parse_space of a file; a missing file is a SpaceError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpaceError(f"{path}: no such sweep file") from None
    return parse_space(text, str(path))


def _check_combinations(spec: SweepSpec) -> None:
    _check_baseline(spec)
    algorithm, scheduler = spec.fields.search.algorithm, spec.fields.scheduler.name
    if algorithm == "optuna" and scheduler == "pbt":
        raise _error(spec.source, "scheduler.name: pbt mutates configs itself; use search.algorithm grid or random")
    if scheduler == "pbt" and spec.fields.resources.workers > 1:
        raise _error(spec.source, "scheduler.name: pbt needs Tune-level checkpoints, which multi-worker trials "
                                  "(resources.workers > 1) do not have: use asha or fifo, or workers: 1")
    if scheduler == "pbt" and not spec.random_keys:
        raise _error(spec.source, "scheduler.name: pbt needs at least one random domain to mutate")
