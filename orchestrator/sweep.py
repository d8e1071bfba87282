"""python -m orchestrator.sweep: load -> validate every trial -> check the cluster -> Tuner.fit -> table.

    python -m orchestrator.sweep                                   # the quickstart, on this machine
    python -m orchestrator.sweep --space search_spaces/wsol_cub.yaml --data /data/CUB
    python -m orchestrator.sweep --resume wsol_cub                 # finished trials are not rerun
    python -m orchestrator.sweep --dry-run optim.epochs=2          # what would run, and on what
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "quickstart.yaml"

# A readable console: no usage reporting, no duplicated-log folding, no V2 migration notices, the
# classic progress table (its columns can be chosen), no warning about snapshots every epoch.
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
             "RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", help=f"sweep YAML (default: {DEFAULT_SPACE.relative_to(DEFAULT_SPACE.parents[1])})")
    parser.add_argument("--name", help="experiment name (default: the sweep file's name)")
    parser.add_argument("--resume", metavar="NAME", nargs="?", const="", default=None,
                        help="restore an interrupted sweep (errored trials resumed, finished ones kept)")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and their resources, run nothing")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else the Ray this machine runs, e.g. on a head node, else a new local Ray)")
    parser.add_argument("--data", help="images root of a folder dataset (sets base data.root)")
    parser.add_argument("--storage-path", help="where Tune keeps results and checkpoints (local path or s3://...)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: ./mlflow.db; on a cluster its server)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--log-model", choices=("mlflow", "state_dict", "none", "pytorch"), default="mlflow",
                        help="the final model of each trial: an MLflow logged model (registrable, linked to the "
                             "trial's test metrics) plus its state_dict file (default), the state_dict file only, "
                             "or none (the checkpoints in storage keep it); pytorch: the same as mlflow")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="run config overrides, e.g. optim.epochs=2")
    return parser.parse_args(argv)


def load_sweep(args: argparse.Namespace):
    """The sweep spec (from --space, or from the experiment folder on --resume) with overrides applied."""
    from orchestrator.spaces import SpaceError, SweepInputError, check_sweep_name, load_space, parse_space
    from trainers.config import RunConfig
    from trainers.config_parse import ConfigError, parse_override, set_dotted

    storage = args.storage_path
    if args.resume is not None:
        name = args.resume or args.name
        if not name:
            raise SweepInputError("--resume: give the sweep's name (--resume NAME)")
        state = _read_state(storage, name)
        spec = parse_space(state["space_text"], state["source"])
        overrides, data = state["overrides"], state["data"]
        if args.overrides or args.data:
            raise SweepInputError("--resume: overrides and --data cannot change a sweep; it resumes as it started")
        storage = storage or state["storage"]
    else:
        spec = load_space(args.space or DEFAULT_SPACE)
        overrides, data = list(args.overrides), args.data
        name = args.name or spec.name
    check_sweep_name(name, "--resume" if args.resume is not None else "--name" if args.name else f"{spec.source}: name")
    base = json.loads(json.dumps(spec.base))
    try:
        for text in overrides:
            key, value = parse_override(text)
            if key in spec.domains:
                raise SweepInputError(f"{text}: {key} is searched by the sweep (space.{key}); edit the sweep file")
            set_dotted(base, key, value, RunConfig)
        if data:  # read on the worker nodes: only a relative path is made absolute (from here)
            set_dotted(base, "data.root", data if data.startswith(("/", "~", "$")) else str(Path(data).resolve()))
    except ConfigError as error:
        raise SweepInputError(f"override: {error}") from None
    from dataclasses import replace

    spec = replace(spec, base=base, fields=replace(spec.fields, name=name))
    if storage:
        spec = replace(spec, fields=replace(spec.fields, storage=replace(spec.fields.storage, path=storage)))
    try:
        from orchestrator.search import validate

        validate(spec)
        from orchestrator.launch import check_metric

        check_metric(spec)
    except SweepInputError:
        raise
    except (SpaceError, ConfigError, ValueError) as error:
        raise SweepInputError(str(error)) from None
    return spec, overrides, data


def _read_state(storage: str | None, name: str) -> dict:
    from orchestrator import storage as store
    from orchestrator.launch import STATE_FILE
    from orchestrator.spaces import StorageSpec, SweepInputError, check_sweep_name

    check_sweep_name(name, "--resume")
    root = storage or StorageSpec().path
    root = root if store.is_uri(root) else str(Path(root).expanduser().resolve())
    try:
        return json.loads(store.read_text(root, f"{name}/{STATE_FILE}"))
    except FileNotFoundError:
        raise SweepInputError(f"--resume {name}: no sweep named {name!r} under {root} (no {STATE_FILE}); "
                              "give the storage it ran with (--storage-path)") from None


def describe_trials(spec) -> str:
    """The dry run: every trial (grid point x seed, random domains as domains) and what it needs."""
    from orchestrator.search import grid_points, resolve

    points = grid_points(spec)
    resources = spec.fields.resources
    search = spec.fields.search
    config = resolve(spec, points[0])
    lines = [f"sweep {spec.name!r} from {spec.source}: {spec.fields.description}".rstrip(": ")]
    per_trial = resources.per_trial()
    trials = len(points) if search.algorithm != "optuna" else search.num_samples * len(spec.fields.seeds)
    lines.append(f"{trials} trials, each {resources.workers} worker(s) x {resources.per_worker()} "
                 f"= {per_trial}; scheduler {spec.fields.scheduler.name}, search {search.algorithm}, "
                 f"metric {spec.fields.metric} ({spec.fields.mode}), {config.optim.epochs} epochs")
    if spec.fields.gpu_hours:
        lines.append(f"estimate from the sweep file: {spec.fields.gpu_hours:g} GPU-hours")
    for key, domain in spec.domains.items():
        if domain.is_random:
            lines.append(f"  sampled per trial: {key} ~ {domain.describe()}")
    if search.algorithm == "optuna":
        lines.append(f"  optuna proposes {search.num_samples} configurations, each run with seeds {list(spec.fields.seeds)}")
        return "\n".join(lines)
    keys = [k for k in points[0]]
    lines.append("  " + "  ".join(keys))
    for point in points:
        lines.append("  " + "  ".join(str(point[k]) for k in keys))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from orchestrator.spaces import SpaceError, SweepInputError
    from trainers.config_parse import ConfigError

    try:
        spec, overrides, data = load_sweep(args)
        if args.dry_run:
            print(describe_trials(spec))
            return 0
        from orchestrator.launch import launch

        return launch(spec, overrides, data, resume=args.resume is not None, address=args.address,
                      tracking_uri=args.tracking_uri, tracking=not args.no_tracking, log_model=args.log_model)
    except (SweepInputError, SpaceError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
