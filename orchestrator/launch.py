"""Starting a sweep on Ray: connect, check the cluster against the trials, build or restore the Tuner, fit."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from orchestrator.search import resolve, trial_values, tune_domains, tune_search
from orchestrator.spaces import TRIAL_DRIVER_CPU, SweepInputError, SweepSpec
from orchestrator.table import TrialResult, build_table, describe, format_table
from trainers.config_parse import flatten

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml").expanduser()  # what `ray up` leaves on the head node
STATE_FILE = "has_sweep.json"  # in the experiment folder: what --resume needs to rebuild the sweep


def experiment_exists(root: str, name: str) -> bool:
    """Whether storage already holds a folder of this name (local path or any pyarrow filesystem URI)."""
    if "://" not in root:
        return Path(root, name).exists()
    import pyarrow.fs as pafs

    filesystem, base = pafs.FileSystem.from_uri(root)
    return filesystem.get_file_info(f"{base}/{name}").type != pafs.FileType.NotFound


def storage_root(spec: SweepSpec) -> str:
    """The storage path as Tune needs it: a URI as given, a local path made absolute."""
    path = spec.fields.storage.path
    return path if "://" in path else str(Path(path).expanduser().resolve())


def node_capacities() -> list[dict[str, float]]:
    """Resources of every node a trial could use: the live ones, and the autoscaler's node types."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    if BOOTSTRAP_CONFIG.is_file():  # an autoscaling cluster can still add these
        import yaml

        config = yaml.safe_load(BOOTSTRAP_CONFIG.read_text()) or {}
        for node_type in (config.get("available_node_types") or {}).values():
            if node_type.get("max_workers", 0) > 0:
                nodes += [dict(node_type.get("resources") or {})] * int(node_type["max_workers"])
    return nodes


def _summary(nodes: list[dict[str, float]]) -> str:
    shown = {}
    for node in nodes:
        for name, amount in node.items():
            if not name.startswith(("node:", "memory", "object_store_memory", "accelerator_type")):
                shown[name] = shown.get(name, 0) + amount
    return f"{len(nodes)} node(s) with {', '.join(f'{k} {v:g}' for k, v in sorted(shown.items())) or 'nothing'}"


def check_resources(spec: SweepSpec, nodes: list[dict[str, float]]) -> int:
    """Refuse trials the cluster can never run (Tune would wait forever); return max concurrent trials."""
    resources = spec.fields.resources
    per_worker = resources.per_worker()
    key = {"CPU": "resources.cpus", "GPU": "resources.gpus"}
    for name, amount in per_worker.items():
        if not any(node.get(name, 0) >= amount for node in nodes):
            biggest = max((node.get(name, 0) for node in nodes), default=0)
            raise SweepInputError(
                f"{spec.source}: {key.get(name, f'resources.extra.{name}')}: each trial worker needs {name} {amount:g}, "
                f"but no node has that much (largest: {biggest:g}; cluster: {_summary(nodes)})")
    # How many workers fit, node by node, and so how many trials can hold all theirs at once.
    slots = sum(min(math.floor(node.get(name, 0) / amount + 1e-9) for name, amount in per_worker.items())
                for node in nodes) if per_worker else resources.workers * 1000
    if resources.workers > 1:
        slots = min(slots, math.floor(sum(n.get("CPU", 0) for n in nodes) / (TRIAL_DRIVER_CPU + resources.cpus)))
    fitting = slots // resources.workers
    if fitting < 1:
        raise SweepInputError(f"{spec.source}: resources.workers: a trial needs {resources.workers} workers of "
                              f"{per_worker}, the cluster fits {slots} ({_summary(nodes)})")
    wanted = spec.fields.max_concurrent_trials
    return min(wanted, fitting) if wanted else fitting


def check_storage(spec: SweepSpec, nodes_alive: int) -> None:
    """On several nodes, checkpoints must land where every node can read them."""
    storage = spec.fields.storage
    if nodes_alive > 1 and "://" not in storage.path and not storage.shared:
        raise SweepInputError(
            f"{spec.source}: storage.path: {storage.path!r} is local to this node, and the cluster has "
            f"{nodes_alive} nodes: trials on other nodes could not resume from their checkpoints. Use a shared "
            "URI (--storage-path s3://bucket/sweeps) or a path every node mounts with storage.shared: true")


def write_state(spec: SweepSpec, text: str, overrides: list[str], data: str | None, root: str) -> None:
    state = json.dumps({"space_text": text, "source": spec.source, "overrides": overrides, "data": data,
                        "storage": root, "space_hash": spec.space_hash}, indent=1)
    if "://" in root:
        import pyarrow.fs as pafs

        filesystem, base = pafs.FileSystem.from_uri(root)
        filesystem.create_dir(f"{base}/{spec.name}", recursive=True)
        with filesystem.open_output_stream(f"{base}/{spec.name}/{STATE_FILE}") as stream:
            stream.write(state.encode())
        return
    folder = Path(root) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE_FILE).write_text(state)


def tracking_callbacks(spec: SweepSpec, uri: str | None, enabled: bool, nodes_alive: int, spill_dir: Path,
                       log_model: str) -> list:
    """The MLflow callback, after checking the tracking URI can serve this cluster and answers now."""
    if not enabled:
        return []
    from orchestrator.tracking import (
        URI_ENV, cluster_uri_hint, default_tracking_uri, is_local_uri, quiet_mlflow_http,
    )
    from orchestrator.tracking_callback import MlflowCallback

    uri = uri or default_tracking_uri()
    if nodes_alive > 1 and is_local_uri(uri):
        raise SweepInputError(f"--tracking-uri: {uri} is a store on this machine only, and the cluster has "
                              f"{nodes_alive} nodes; use {cluster_uri_hint()}")
    quiet_mlflow_http()
    from mlflow import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means: not usable now
        raise SweepInputError(f"--tracking-uri: cannot reach {uri} ({str(error).splitlines()[0][:200]}); start the "
                              "server, or run with --no-tracking") from None
    os.environ[URI_ENV] = uri  # read by the callback, also after a restore (callbacks come back pickled)
    os.environ["HAS_SWEEP_SPILL_DIR"] = str(spill_dir)
    print(f"tracking: MLflow at {uri}, experiment {spec.name!r}")
    return [MlflowCallback(spec, _space_text(spec), log_model)]


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
        return ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=scheduler.grace_period,
                             reduction_factor=scheduler.reduction_factor)
    if scheduler.name == "pbt":
        # The sampled values sit in each trial's "grid" entry: PBT perturbs them there.
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=scheduler.perturbation_interval,
                                       hyperparam_mutations={"grid": tune_domains(spec)})
    return None


def progress_reporter(spec: SweepSpec):
    """Tune's table with the columns people read: what varies, the epoch and the key metrics."""
    from ray.tune import CLIReporter

    if spec.fields.search.algorithm == "optuna":
        varying = {f"trial/{key}": key.split(".")[-1] for key in (*spec.shown_keys, *spec.random_keys)}
    else:
        varying = {f"grid/{key}": key.split(".")[-1] for key in (*spec.shown_keys, *spec.random_keys, "seed")}
    metrics = {"training_iteration": "epoch", "train/loss": "loss", "val/cls_top1": "val cls",
               spec.fields.metric: spec.fields.metric.split("/")[-1]}
    return CLIReporter(parameter_columns=varying, metric_columns=metrics, max_report_frequency=30,
                       sort_by_metric=True)


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
        elif metrics.get("training_iteration", 0) < epochs:
            status = "STOPPED"
        else:
            status = "TERMINATED"
        results.append(TrialResult(config, metrics, status, str(metrics.get("trial_id", ""))))
    return results


def launch(spec: SweepSpec, overrides: list[str], data: str | None, *, resume: bool, address: str | None,
           tracking_uri: str | None, tracking: bool, log_model: str = "state_dict") -> int:
    import ray
    from ray import tune

    root = storage_root(spec)
    experiment = f"{root}/{spec.name}"
    # Multi-worker trials need the State API (Ray Train watches its controller through it), which
    # the dashboard serves; in-process sweeps do without it and save the memory.
    dashboard = spec.fields.resources.workers > 1
    ray.init(address=address, include_dashboard=None if address else dashboard, logging_level=logging.WARNING,
             configure_logging=True, log_to_driver=True)
    try:
        nodes = node_capacities()
        concurrent = check_resources(spec, nodes)
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        check_storage(spec, alive)
        spill = Path(experiment) if "://" not in root else Path.cwd() / "mlflow_unsent"
        callbacks = tracking_callbacks(spec, tracking_uri, tracking, alive, spill, log_model)
        trainable = make_trainable(spec, root)
        if resume:
            if not tune.Tuner.can_restore(experiment):
                raise SweepInputError(f"--resume {spec.name}: {experiment} holds no Tune experiment to restore")
            tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
        else:
            if experiment_exists(root, spec.name):
                raise SweepInputError(f"sweep {spec.name!r} already exists in {root}: resume it with --resume "
                                      f"{spec.name}, or start another with --name; nothing was overwritten")
            write_state(spec, _space_text(spec), overrides, data, root)
            param_space, searcher, samples = tune_search(spec)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(metric=spec.fields.metric, mode=spec.fields.mode, search_alg=searcher,
                                            scheduler=make_scheduler(spec), num_samples=samples,
                                            max_concurrent_trials=concurrent, reuse_actors=True),
                run_config=tune.RunConfig(name=spec.name, storage_path=root,
                                          failure_config=tune.FailureConfig(max_failures=spec.fields.max_failures),
                                          # PBT restores other trials from their older checkpoints: keep them all.
                                          checkpoint_config=tune.CheckpointConfig(
                                              num_to_keep=None if spec.fields.scheduler.name == "pbt" else 2),
                                          sync_config=tune.SyncConfig(sync_period=spec.fields.storage.sync_seconds),
                                          callbacks=list(callbacks), progress_reporter=progress_reporter(spec),
                                          verbose=1),
            )
        grid = tuner.fit()
        results = trial_results(spec, grid)
        table = build_table(results, choose_by=spec.choose_by, mode=spec.fields.mode)
        print(f"\nsweep {spec.name}: {len(results)} trials, results in {experiment}")
        print(format_table(table, "text") + describe(table))
        return 1 if any(r.status == "ERROR" for r in results) else 0
    finally:
        ray.shutdown()


def _space_text(spec: SweepSpec) -> str:
    return Path(spec.source).read_text() if Path(spec.source).is_file() else ""
