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
import itertools
import math
import random
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
    def random(self) -> bool:
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
    sync_seconds: float = 30.0  # how often the driver's state reaches storage: what a killed driver can lose


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
        return [k for k, d in self.domains.items() if d.random]


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


def load_space(path: str | Path) -> SweepSpec:
    """parse_space of a file; a missing file is a SpaceError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpaceError(f"{path}: no such sweep file") from None
    return parse_space(text, str(path))


def _check_combinations(spec: SweepSpec) -> None:
    algorithm, scheduler = spec.fields.search.algorithm, spec.fields.scheduler.name
    if algorithm == "optuna" and scheduler == "pbt":
        raise _error(spec.source, "scheduler.name: pbt mutates configs itself; use search.algorithm grid or random")
    if scheduler == "pbt" and spec.fields.resources.workers > 1:
        raise _error(spec.source, "scheduler.name: pbt needs Tune-level checkpoints, which multi-worker trials "
                                  "(resources.workers > 1) do not have: use asha or fifo, or workers: 1")
    if scheduler == "pbt" and not spec.random_keys:
        raise _error(spec.source, "scheduler.name: pbt needs at least one random domain to mutate")


def _apply(data: dict, values: Mapping[str, Any]) -> dict:
    out = yaml.safe_load(yaml.safe_dump(data))  # a deep copy of plain data
    for key, value in values.items():
        set_dotted(out, key, value)
    return out


def collapse_weights(values: Mapping[str, Any]) -> dict[str, Any]:
    """has.mixture.w<size> sampled weights -> one has.mixture value ('weighted:...')."""
    weights = {int(k[len(WEIGHT_PREFIX):]): float(v) for k, v in values.items() if k.startswith(WEIGHT_PREFIX)}
    rest = {k: v for k, v in values.items() if not k.startswith(WEIGHT_PREFIX)}
    if weights:
        if sum(weights.values()) <= 0:
            weights = {size: 1.0 for size in weights}
        rest["has.mixture"] = format_mixture(weights)
    return rest


def resolve(spec: SweepSpec, values: Mapping[str, Any]) -> RunConfig:
    """The RunConfig of one trial: base, then fixed values, then the trial's own values."""
    merged = collapse_weights({**spec.fixed, **values})
    return RunConfig.from_dict(_apply(spec.base, merged))


def effective_key(config: RunConfig) -> str:
    """Two configs that train the same thing have the same key (the fill does not matter without hiding)."""
    if not config.has.enabled:
        defaults = RunConfig().has
        config = config.replace(has=type(config.has)(mixture="none", p_hide=defaults.p_hide, fill=defaults.fill))
    return yaml.safe_dump(config.replace(output_dir="").to_dict(), sort_keys=True)


def grid_points(spec: SweepSpec, with_seeds: bool = True) -> list[dict[str, Any]]:
    """Every trial of a grid / random search: grid combinations x `num_samples` draws of the random
    domains (drawn here, reproducibly from search.seed, and shared by the seeds) x seeds; duplicates
    that would train the same thing are dropped."""
    keys = spec.grid_keys
    rng = random.Random(spec.fields.search.seed)
    draws = spec.fields.search.num_samples if spec.random_keys else 1
    seeds = spec.fields.seeds if with_seeds else (spec.fields.seeds[0],)
    points, seen = [], set()
    for combo in itertools.product(*(spec.domains[k].values for k in keys)):
        for _ in range(draws):
            sampled = _sample_random(spec, rng)
            axes: dict[str, Any] = {}
            for key, value in zip(keys, combo):
                axes.update(value if spec.domains[key].kind == "bundle" else {key: value})
            own = {k: v for k, v in sampled.items() if k not in axes}  # a bundle's values win over samples
            for seed in seeds:
                point = {**axes, **own, SEED_KEY: seed}
                key = effective_key(resolve(spec, point))
                if key in seen:
                    continue
                seen.add(key)
                points.append(point if with_seeds else {k: v for k, v in point.items() if k != SEED_KEY})
    return points


def _sample_random(spec: SweepSpec, rng: random.Random) -> dict[str, Any]:
    """One draw of every random domain (sampled mixture weights as has.mixture.w<size>)."""
    values = {}
    for key, domain in spec.domains.items():
        if not domain.random:
            continue
        if domain.kind == "sampled_weights":
            for size in domain.values:
                values[f"{WEIGHT_PREFIX}{size}"] = round(rng.random(), 4)
        else:
            value = domain.sample(rng)
            values[key] = round(value, 6) if isinstance(value, float) else value
    return values


def validate(spec: SweepSpec, samples: int = 8) -> int:
    """Turn every trial (and for optuna `samples` draws per grid point) into a RunConfig; returns the count."""
    rng = random.Random(spec.fields.search.seed)
    try:
        points = grid_points(spec)
    except (ConfigError, ValueError) as error:
        raise _error(spec.source, str(error)) from None
    extra = samples if spec.fields.search.algorithm == "optuna" and spec.random_keys else 0
    for point in points:
        for _ in range(extra):
            values = {**point, **_sample_random(spec, rng)}
            try:
                resolve(spec, values)
            except (ConfigError, ValueError) as error:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise _error(spec.source, f"{error} (in the trial {shown})") from None
    for key, domain in spec.domains.items():  # the bounds themselves must be valid values
        if domain.kind in ("uniform", "loguniform", "randint"):
            for bound in (domain.values[0], domain.values[1] - (1 if domain.kind == "randint" else 0)):
                try:
                    resolve(spec, {**points[0], key: bound})
                except (ConfigError, ValueError) as error:
                    raise _error(spec.source, f"space.{key}: the bound {bound!r} gives: {error}") from None
    return len(points)


def trial_values(spec: SweepSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted values of one Tune trial's params (grid point, sampled values, repeat index -> seed)."""
    from ray.tune.search.repeater import TRIAL_INDEX

    values: dict[str, Any] = {}
    for key, value in {**params.get("grid", {}), **params.get("trial", {})}.items():
        domain = spec.domains.get(key)
        if domain is not None and domain.kind == "bundle":  # optuna picks a bundle by its index
            values.update(domain.values[value] if isinstance(value, int) else value)
        else:
            values[key] = value
    if TRIAL_INDEX in params:  # optuna with several seeds: the Repeater numbers the copies
        values[SEED_KEY] = spec.fields.seeds[int(params[TRIAL_INDEX]) % len(spec.fields.seeds)]
    values.setdefault(SEED_KEY, spec.fields.seeds[0])
    return values


def tune_domains(spec: SweepSpec) -> dict[str, Any]:
    """The random domains as Tune domains, under their dotted keys (optuna's space, PBT's mutations)."""
    from ray import tune

    domains: dict[str, Any] = {}
    for key, domain in spec.domains.items():
        if domain.kind == "choice":
            domains[key] = tune.choice(list(domain.values))
        elif domain.kind == "uniform":
            domains[key] = tune.uniform(*domain.values)
        elif domain.kind == "loguniform":
            domains[key] = tune.loguniform(*domain.values)
        elif domain.kind == "randint":
            domains[key] = tune.randint(*domain.values)
        elif domain.kind == "sampled_weights":
            for size in domain.values:
                domains[f"{WEIGHT_PREFIX}{size}"] = tune.uniform(0.0, 1.0)
    return domains


def tune_search(spec: SweepSpec):
    """(param_space, search_alg or None, num_samples) for ray.tune.Tuner."""
    from ray import tune

    search = spec.fields.search
    if search.algorithm != "optuna":  # every trial is listed: random draws are made in grid_points
        return {"grid": tune.grid_search(grid_points(spec))}, None, 1
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    sampled = tune_domains(spec)
    for key in spec.grid_keys:  # optuna has no grids: a grid becomes a categorical choice
        domain = spec.domains[key]
        options = range(len(domain.values)) if domain.kind == "bundle" else domain.values
        sampled[key] = tune.choice(list(options))
    searcher = OptunaSearch(metric=spec.fields.metric, mode=spec.fields.mode, seed=search.seed)
    repeats = len(spec.fields.seeds)
    if repeats > 1:  # every configuration Optuna proposes runs once per seed; it sees their mean
        searcher = Repeater(searcher, repeat=repeats)
    return {"trial": sampled}, searcher, search.num_samples * repeats
