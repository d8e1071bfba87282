"""python -m trainers --config FILE.yaml [--resume [CHECKPOINT]] [dotted.key=value ...]
python -m trainers --eval-only model.weights=RUN_DIR|CHECKPOINT|FILE|imagenet [--splits val,test] [...]

One run, no Ray and no MLflow: for debugging, profiling, and single experiments; or, with --eval-only,
the evaluation of given weights (metrics, CAM overlays, per-image Parquet, curves) without training.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (default: the built-in defaults: tiny_cnn on synthetic)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue from an epoch checkpoint folder (default: the latest in output_dir)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate model.weights (a run's output_dir, a checkpoint folder, a state_dict file or "
                             "'imagenet') without training; with no --config, a checkpoint's own config")
    parser.add_argument("--splits", default="val,test", help="--eval-only: the splits to evaluate (default: val,test)")
    parser.add_argument("--cam-class", default="label", choices=("label", "predicted"),
                        help="--eval-only: CAM of the label (default), or of the head's top-1 class for a head whose "
                             "classes are not the dataset's (box and mask metrics only)")
    parser.add_argument("--eval-dir", help="--eval-only: where to write (default: <output_dir>/eval/<weights>)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="e.g. optim.lr=0.05 has.mixture=8")
    args = parser.parse_intermixed_args(argv)  # overrides before or after the options

    from trainers.config import ConfigError, load_config

    if args.eval_only:
        return _eval_only(args)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0

    from trainers import checkpoint
    from trainers.engine import OutputDirInUse, Trainer
    from trainers.hooks import ProgressHook, MetricsLogHook

    resume = args.resume
    if resume == "latest":
        found = checkpoint.list_checkpoints(f"{config.output_dir}/checkpoints")
        if not found:
            print(f"error: --resume: no checkpoint in {config.output_dir}/checkpoints", file=sys.stderr)
            return 2
        resume = found[-1]
    hooks = [MetricsLogHook()] + ([ProgressHook()] if config.progress else [])
    try:
        metrics = Trainer(config, hooks).fit(resume_from=resume)
    except (OutputDirInUse, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    width = max(len(k) for k in metrics)
    print("\nfinal metrics:")
    for key in sorted(metrics):
        if key.startswith(("test/", "val/")):
            print(f"  {key:<{width}}  {metrics[key]:8.2f}")
    print(f"checkpoints and artifacts: {config.output_dir}/checkpoints")
    return 0


def _eval_only(args: argparse.Namespace) -> int:
    from trainers.config import ConfigError
    from trainers.eval_only import EvalOnlyError, config_for, evaluate_weights
    try:
        config = config_for(args.config, args.overrides)
        if args.print_config:
            print(config.to_yaml(), end="")
            return 0
        metrics, metrics_dir = evaluate_weights(config, [s.strip() for s in args.splits.split(",") if s.strip()],
                                   cam_class=args.cam_class, eval_dir=args.eval_dir)
    except (ConfigError, EvalOnlyError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    width = max(len(k) for k in metrics)
    print("metrics:")
    for key in sorted(metrics):
        if key.startswith(("test/", "val/")):
            print(f"  {key:<{width}}  {metrics[key]:8.2f}")
    print(f"metrics and artifacts: {metrics_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
