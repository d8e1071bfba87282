"""Trials of a sweep: the grid (x random draws x seeds), each trial's RunConfig, the Tune search space.

`grid_points` lists every trial of a grid or random search, with duplicates that would train the
same thing removed; `resolve` turns one trial's values into its RunConfig; `tune_search` gives Ray
Tune the param space and search algorithm (Optuna with a Repeater over the seeds).
"""
from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Mapping
from typing import Any

import yaml

from orchestrator.spaces import SEED_KEY, WEIGHT_PREFIX, SweepSpec, _error
from trainers.config import RunConfig
from trainers.config_parse import ConfigError, set_dotted
from trainers.hide import format_mixture


def _apply(data: dict, values: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(data)
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
        if not domain.is_random:
            continue
        if domain.kind == "sampled_weights":
            for size in domain.values:
                values[f"{WEIGHT_PREFIX}{size}"] = round(rng.random(), 4)
        else:
            value = domain.sample(rng)
            # Six significant digits, not decimals: a loguniform lr near 1e-5 keeps its value.
            values[key] = float(f"{value:.6g}") if isinstance(value, float) else value
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
    from ray.tune.search.optuna import OptunaSearch

    sampled = tune_domains(spec)
    for key in spec.grid_keys:  # optuna has no grids: a grid becomes a categorical choice
        domain = spec.domains[key]
        options = range(len(domain.values)) if domain.kind == "bundle" else domain.values
        sampled[key] = tune.choice(list(options))
    searcher = OptunaSearch(metric=spec.fields.metric, mode=spec.fields.mode, seed=search.seed)
    repeats = len(spec.fields.seeds)
    # Every configuration Optuna proposes runs once per seed; Optuna sees one score per configuration.
    return {"trial": sampled}, seed_repeater(searcher, repeats), search.num_samples * repeats


def paired_score(histories: list[dict[int, float]]) -> float:
    """The mean over seeds of the metric at the deepest epoch that every seed reached with a value
    (a scheduler may stop the seeds of one configuration at different epochs); nan if none did."""
    import math

    common = set.intersection(*(set(h) for h in histories)) if histories and all(histories) else set()
    if not common:
        return math.nan
    epoch = max(common)
    return sum(h[epoch] for h in histories) / len(histories)


def seed_repeater(searcher, repeats: int):
    """A Repeater whose score of a configuration is `paired_score` of its seeds' metric histories."""
    from ray.tune.search import Repeater

    class SeedRepeater(Repeater):
        def __init__(self, searcher, repeat: int) -> None:
            super().__init__(searcher, repeat=repeat)
            self.histories: dict[str, dict[int, float]] = {}  # trial id -> epoch -> metric

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            metric = self.searcher.metric
            if metric in result:  # epochs without validation carry no metric
                epoch = int(result.get("epoch", result.get("training_iteration", 0)))
                self.histories.setdefault(trial_id, {})[epoch] = float(result[metric])

        def on_trial_complete(self, trial_id: str, result: dict | None = None, **kwargs) -> None:
            if result is not None:
                self.on_trial_result(trial_id, result)
            group = self._trial_id_to_group.get(trial_id)
            if group is None:
                return
            group.report(trial_id, 0.0)  # marks it done; the score is computed from the histories
            if group.finished_reporting():
                score = paired_score([self.histories.get(t, {}) for t in group._trials])
                self.searcher.on_trial_complete(group.primary_trial_id, result={self.searcher.metric: score}, **kwargs)

    return SeedRepeater(searcher, repeats)
