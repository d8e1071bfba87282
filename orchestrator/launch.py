"""Starting a sweep on Ray: connect, check the cluster against the trials, build or restore the Tuner, fit."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
import uuid
from pathlib import Path

from orchestrator import storage
from orchestrator.checks import check_data, check_storage
from orchestrator.search import resolve, trial_values, tune_domains, tune_search
from orchestrator.spaces import TRIAL_DRIVER_CPU, WEIGHT_PREFIX, SweepInputError, SweepSpec
from orchestrator.storage import child_uri, is_uri
from orchestrator.paired import paired_report, parse_baseline
from orchestrator.table import TrialResult, build_table, describe, format_table
from trainers.config_parse import flatten

# What `ray up` leaves on the head node: the autoscaler's node types (overridable for tests).
BOOTSTRAP_CONFIG = Path(os.environ.get("HAS_SWEEP_AUTOSCALER_CONFIG", "~/ray_bootstrap_config.yaml")).expanduser()
STATE_FILE = "has_sweep.json"  # in the experiment folder: what --resume needs to rebuild the sweep
HEAD_RESOURCE = "node:__internal_head__"


def storage_root(spec: SweepSpec) -> str:
    """The storage path as Tune needs it: a URI as given, a local path made absolute."""
    path = spec.fields.storage.path
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def autoscaler_node_types() -> tuple[list[tuple[dict[str, float], int]], int | None] | None:
    """The worker types an autoscaler may start, as (resources, max count), and the cluster's cap on
    workers; from the autoscaler's config in the GCS (KubeRay, autoscaler v2) or ray up's bootstrap
    file; None on a fixed cluster."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older Ray or no GCS entry: fall back to the file
        config = None
    if config is not None and config.node_group_configs:
        types = [(dict(group.resources), int(group.max_count)) for group in config.node_group_configs
                 if group.max_count != 0]
        return types, None
    if BOOTSTRAP_CONFIG.is_file():
        import yaml

        config = yaml.safe_load(BOOTSTRAP_CONFIG.read_text()) or {}
        head_type = config.get("head_node_type")
        types = [(dict(node_type.get("resources") or {}), int(node_type.get("max_workers", 0)))
                 for name, node_type in (config.get("available_node_types") or {}).items()
                 if name != head_type and node_type.get("max_workers", 0) > 0]
        return types, config.get("max_workers")
    return None


def possible_nodes(live: list[dict[str, float]],
                   node_types: tuple[list[tuple[dict[str, float], int]], int | None] | None) -> list[dict[str, float]]:
    """Every node trials could ever use, each once: the live nodes on a fixed cluster; on an autoscaling
    one the head plus up to max count workers of each type (the live workers are among those),
    at most the cluster's cap on workers (the biggest kept)."""
    if node_types is None:
        return live
    types, cap = node_types
    head = [node for node in live if HEAD_RESOURCE in node]
    workers = [dict(resources) for resources, count in types for _ in range(max(count, 0))]
    workers.sort(key=lambda node: (node.get("GPU", 0), node.get("CPU", 0)), reverse=True)
    return head + (workers[:cap] if cap is not None else workers)


def node_capacities() -> list[dict[str, float]]:
    """Resources of every node a trial could use (see possible_nodes)."""
    import ray

    live = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return possible_nodes(live, autoscaler_node_types())


def _summary(nodes: list[dict[str, float]]) -> str:
    shown = {}
    for node in nodes:
        for name, amount in node.items():
            if not name.startswith(("node:", "memory", "object_store_memory", "accelerator_type")):
                shown[name] = shown.get(name, 0) + amount
    return f"{len(nodes)} node(s) with {', '.join(f'{k} {v:g}' for k, v in sorted(shown.items())) or 'nothing'}"


def check_resources(spec: SweepSpec, nodes: list[dict[str, float]]) -> int:
    """Refuse trials the cluster can never run (Tune would wait forever); return max concurrent trials.

    A multi-worker trial keeps all its workers on one node (STRICT_PACK: DDP within a node's
    interconnect), so a trial fits on a node only if all its workers do."""
    resources = spec.fields.resources
    per_worker = resources.per_worker()
    key = {"CPU": "resources.cpus", "GPU": "resources.gpus"}
    for name, amount in per_worker.items():
        if not any(node.get(name, 0) >= amount for node in nodes):
            biggest = max((node.get(name, 0) for node in nodes), default=0)
            raise SweepInputError(
                f"{spec.source}: {key.get(name, f'resources.extra.{name}')}: each trial worker needs {name} {amount:g}, "
                f"but no node has that much (largest: {biggest:g}; cluster: {_summary(nodes)})")
    if not per_worker:
        fitting = 1000
    else:
        workers_on = [min(math.floor(node.get(name, 0) / amount + 1e-9) for name, amount in per_worker.items())
                      for node in nodes]
        fitting = sum(count // resources.workers for count in workers_on)
    if resources.workers > 1:  # each trial's own driver process (TRIAL_DRIVER_CPU) needs a CPU share too
        fitting = min(fitting, math.floor(sum(n.get("CPU", 0) for n in nodes) / (TRIAL_DRIVER_CPU + resources.cpus * resources.workers)))
    if fitting < 1:
        raise SweepInputError(f"{spec.source}: resources.workers: a trial needs {resources.workers} workers of "
                              f"{per_worker} on one node, and no node fits them ({_summary(nodes)})")
    wanted = spec.fields.max_concurrent_trials
    return min(wanted, fitting) if wanted else fitting


def check_metric(spec: SweepSpec) -> None:
    """The sweep's metric must be one the trials report on validation epochs (or every epoch)."""
    from trainers.engine import TRAIN_METRICS
    from trainers.evaluator import metric_names

    config = resolve(spec, {"seed": spec.fields.seeds[0]})
    allowed = [*metric_names("val", config.eval.iou_thresholds), *TRAIN_METRICS]
    metric = spec.fields.metric
    if metric in allowed:
        return
    hint = " (test/ metrics exist only after the last epoch: choose on val)" if metric.startswith("test/") else ""
    raise SweepInputError(f"{spec.source}: metric: {metric!r} is never reported by the trials{hint}; allowed: "
                          f"{', '.join(allowed)}")


def write_state(spec: SweepSpec, text: str, overrides: list[str], data: str | None, root: str,
                sweep_id: str) -> None:
    """The sweep's state file, with the sweep's id: its identity in MLflow, kept here so that a resumed
    sweep finds its runs again wherever its storage was moved, and a new sweep of the same name never
    joins an old one's."""
    state = json.dumps({"space_text": text, "source": spec.source, "overrides": overrides, "data": data,
                        "storage": root, "space_hash": spec.space_hash, "sweep_id": sweep_id}, indent=1)
    storage.write_text(root, f"{spec.name}/{STATE_FILE}", state)


def read_sweep_id(root: str, name: str) -> str | None:
    """The id in a sweep's state file (None for sweeps started before ids existed: found by name)."""
    try:
        return json.loads(storage.read_text(root, f"{name}/{STATE_FILE}")).get("sweep_id")
    except (OSError, FileNotFoundError, ValueError):
        return None


def tracking_callbacks(spec: SweepSpec, uri: str | None, enabled: bool, several_nodes: bool, spill_dir: Path,
                       log_model: str, storage_root: str, sweep_id: str | None = None) -> list:
    """The MLflow callback, after checking the tracking URI can serve this cluster and answers now."""
    if not enabled:
        return []
    from orchestrator.tracking import (
        URI_ENV, cluster_uri_hint, default_tracking_uri, ensure_experiment, experiment_link, is_local_uri,
        quiet_mlflow_http,
    )
    from orchestrator.tracking_callback import MlflowCallback

    uri = uri or default_tracking_uri()
    if several_nodes and is_local_uri(uri):
        raise SweepInputError(f"--tracking-uri: {uri} is a store on this machine only, and trials run on other "
                              f"nodes of this cluster; use {cluster_uri_hint()}")
    quiet_mlflow_http()
    from mlflow import MlflowClient

    try:
        experiment_id = ensure_experiment(MlflowClient(uri), spec.name)
    except Exception as error:  # noqa: BLE001 - any failure here means: not usable now
        text = str(error).splitlines()[0][:200]
        if "401" in text or "not authenticated" in text.lower():
            raise SweepInputError(f"--tracking-uri: {uri} refused this client's login ({text}); set "
                                  "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (on the head node, "
                                  "cluster/start_mlflow.sh wrote them to ~/.mlflow/credentials)") from None
        raise SweepInputError(f"--tracking-uri: cannot reach {uri} ({text}); start the "
                              "server, or run with --no-tracking") from None
    os.environ[URI_ENV] = uri  # read by the callback, also after a restore (callbacks come back pickled)
    os.environ["HAS_SWEEP_SPILL_DIR"] = str(spill_dir)
    print(f"tracking: MLflow at {uri}, experiment {spec.name!r}: {experiment_link(uri, experiment_id)}")
    return [MlflowCallback(spec, _space_text(spec), log_model, storage_root, sweep_id)]


def make_trainable(spec: SweepSpec, root: str):
    from ray import tune

    from orchestrator.trial import run_multiworker_trial, run_trial

    resources = spec.fields.resources
    if resources.workers == 1:
        trainable = tune.with_parameters(run_trial, spec=spec)
        bundle = resources.per_worker() or {"CPU": 1}
    else:
        trainable = tune.with_parameters(run_multiworker_trial, spec=spec, storage_path=root)
        bundle = {"CPU": TRIAL_DRIVER_CPU}
    return tune.with_resources(trainable, tune.PlacementGroupFactory([bundle]))


def make_scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    scheduler = spec.fields.scheduler
    epochs = resolve(spec, {"seed": spec.fields.seeds[0]}).optim.epochs
    if scheduler.name == "asha":
        # The engine's epoch, not Tune's training_iteration: a restarted multi-worker trial starts
        # its iterations at 1 again while Ray Train resumes at its checkpoint's epoch.
        return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=scheduler.grace_period,
                             reduction_factor=scheduler.reduction_factor)
    if scheduler.name == "pbt":
        # The sampled values sit in each trial's "grid" entry: PBT perturbs them there.
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=scheduler.perturbation_interval,
                                       hyperparam_mutations={"grid": tune_domains(spec)})
    return None


def progress_reporter(spec: SweepSpec):
    """Tune's table with the columns people read: what varies, the epoch and the key metrics."""
    # The keys as they are in each trial's params: sampled mixture weights travel as has.mixture.w<size>.
    sampled = [f"{WEIGHT_PREFIX}{size}" if spec.domains[key].kind == "sampled_weights" else key
               for key in spec.random_keys for size in (spec.domains[key].values
                                                         if spec.domains[key].kind == "sampled_weights" else [None])]
    if spec.fields.search.algorithm == "optuna":
        varying = {f"trial/{key}": key.split(".")[-1] for key in (*spec.grid_keys, *sampled)}
    else:
        varying = {f"grid/{key}": key.split(".")[-1] for key in (*spec.shown_keys, *sampled, "seed")}
    metrics = {"epoch": "epoch", "train/loss": "loss", "val/cls_top1": "val cls",
               spec.fields.metric: spec.fields.metric.split("/")[-1]}
    return _reporter_class()(parameter_columns=varying, metric_columns=metrics, max_report_frequency=30,
                             sort_by_metric=True)


def all_have(metric: str, results: list[dict]) -> bool:
    """Whether every result has a number for `metric` (flat "val/x" keys, or nested as Tune may keep them)."""
    from ray.tune.utils import unflattened_lookup

    return all(isinstance(unflattened_lookup(metric, r, default=None), (int, float)) for r in results)


def _reporter_class():
    """CLIReporter whose table is sorted by the metric only while every finished trial has it: Ray
    sorts the finished trials with None for one that has not (a trial stopped before its first
    validation), which raises TypeError and ends the sweep in its final table."""
    from ray.tune import CLIReporter
    from ray.tune.experiment import Trial

    class SafeSortReporter(CLIReporter):
        def _progress_str(self, trials, done, *sys_info, **kwargs):
            wanted = self._sort_by_metric
            if not (wanted and self._metric):
                return super()._progress_str(trials, done, *sys_info, **kwargs)
            self._sort_by_metric = all_have(self._metric, [t.last_result for t in trials
                                                            if t.status == Trial.TERMINATED])
            try:
                return super()._progress_str(trials, done, *sys_info, **kwargs)
            finally:
                self._sort_by_metric = wanted
    return SafeSortReporter


def trial_results(spec: SweepSpec, grid) -> list[TrialResult]:
    """Flattened configs and last metrics of every trial of a ResultGrid."""
    epochs = resolve(spec, {"seed": spec.fields.seeds[0]}).optim.epochs
    results = []
    for result in grid:
        params = result.config or {}
        config = flatten(resolve(spec, trial_values(spec, params)).to_dict())
        metrics = dict(result.metrics or {})
        if result.error is not None:
            status = "ERROR"
        elif metrics.get("epoch", 0) < epochs:
            status = "STOPPED"
        else:
            status = "TERMINATED"
        results.append(TrialResult(config, metrics, status, str(metrics.get("trial_id", ""))))
    return results


def running_local_cluster(address_file: str | Path = "/tmp/ray/ray_current_cluster") -> str | None:
    """The Ray cluster this machine runs (the head of `ray up`, `ray start --head`), as Ray would find
    it: its address file; None when there is none or nothing answers there any more (a killed Ray leaves
    the file behind, and Ray would wait minutes on it), so the sweep starts its own local Ray."""
    try:
        address = Path(address_file).read_text().strip()
    except OSError:
        return None
    try:
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            return address
    except (OSError, ValueError):
        print(f"launch: {address_file} names a Ray cluster at {address!r} that does not answer: "
              "starting a local Ray", file=sys.stderr)
        return None


def launch(spec: SweepSpec, overrides: list[str], data: str | None, *, resume: bool, address: str | None,
           tracking_uri: str | None, tracking: bool, log_model: str = "mlflow") -> int:
    import ray
    from ray import tune

    root = storage_root(spec)
    experiment = child_uri(root, spec.name)
    # Multi-worker trials need the State API (Ray Train watches its controller through it), which
    # the dashboard serves; in-process sweeps do without it and save the memory.
    dashboard = spec.fields.resources.workers > 1
    address = address or os.environ.get("RAY_ADDRESS") or running_local_cluster()
    ray.init(address=address or "local", include_dashboard=None if address else dashboard,
             logging_level=logging.WARNING,
             configure_logging=True, log_to_driver=True)
    # Epochs without validation report no val/ metrics: Tune must accept them (ASHA and the
    # searchers act on the epochs that have the metric; check_metric made sure some do).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    try:
        nodes = node_capacities()
        concurrent = check_resources(spec, nodes)
        several_nodes = len(nodes) > 1
        if not resume and storage.exists(root, spec.name):
            raise SweepInputError(f"sweep {spec.name!r} already exists in {root}: resume it with --resume "
                                  f"{spec.name}, or start another with --name; nothing was overwritten")
        sweep_id = read_sweep_id(root, spec.name) if resume else uuid.uuid4().hex
        callbacks = tracking_callbacks(spec, tracking_uri, tracking, several_nodes,
                                       Path(experiment) if not is_uri(root) else Path.cwd() / "mlflow_unsent", log_model,
                                       root, sweep_id)
        check_storage(spec, root, several_nodes)
        print(f"checks: storage {root} written by a worker node and read back here")
        checked, checked_data = check_data(spec, resolve(spec, {"seed": spec.fields.seeds[0]}).to_dict()["data"])
        print(f"checks: data {checked}")
        for callback in callbacks:
            callback.checked_data = checked_data
        trainable = make_trainable(spec, root)
        if resume:
            if not tune.Tuner.can_restore(experiment):
                raise SweepInputError(f"--resume {spec.name}: {experiment} holds no Tune experiment to restore")
            tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
        else:
            write_state(spec, _space_text(spec), overrides, data, root, sweep_id)
            param_space, searcher, samples = tune_search(spec)
            # reuse_workers: false gives each trial a fresh process. With reuse, the two trial processes of
            # the voc_pretrained sweep held 10.5 GB each after three efficientnet_lite0_cam trials (one needs
            # ~3 GB) and Ray's memory monitor killed the sweep; fresh processes stayed at 3.5 GB.
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(metric=spec.fields.metric, mode=spec.fields.mode, search_alg=searcher,
                                            scheduler=make_scheduler(spec), num_samples=samples,
                                            max_concurrent_trials=concurrent,
                                            reuse_actors=spec.fields.reuse_workers),
                run_config=tune.RunConfig(name=spec.name, storage_path=root,
                                          failure_config=tune.FailureConfig(max_failures=spec.fields.max_failures),
                                          # PBT restores other trials from their older checkpoints: keep them all.
                                          checkpoint_config=tune.CheckpointConfig(
                                              num_to_keep=None if spec.fields.scheduler.name == "pbt" else 2),
                                          sync_config=tune.SyncConfig(sync_period=spec.fields.storage.sync_seconds),
                                          callbacks=list(callbacks), progress_reporter=progress_reporter(spec),
                                          verbose=1),
            )
        with state_period(spec.fields.storage.sync_seconds):
            grid = tuner.fit()
        results = trial_results(spec, grid)
        table = build_table(results, choose_by=spec.choose_by, mode=spec.fields.mode)
        print(f"\nsweep {spec.name}: {len(results)} trials, results in {experiment}")
        print(format_table(table, "text") + describe(table))
        print("\n" + paired_report(table, parse_baseline(spec.fields.baseline)), end="")
        return 1 if any(r.status == "ERROR" for r in results) else 0
    finally:
        ray.shutdown()


@contextlib.contextmanager
def state_period(seconds: float):
    """Tune saves the experiment state (which trials ended, the searcher) every TUNE_GLOBAL_CHECKPOINT_S
    seconds, by default "auto": at least 10 s, and 19x the last save's time when saving is slow. The
    state reaches storage only when saved, so that period, not SyncConfig's sync_period, is what a
    killed driver loses: storage.sync_seconds sets both, unless the user set the variable."""
    if "TUNE_GLOBAL_CHECKPOINT_S" in os.environ:
        yield
        return
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = f"{seconds:g}"
    try:
        yield
    finally:
        del os.environ["TUNE_GLOBAL_CHECKPOINT_S"]


def _space_text(spec: SweepSpec) -> str:
    return Path(spec.source).read_text() if Path(spec.source).is_file() else ""
