"""python -m orchestrator.report NAME: the sweep's comparison table and plots, from the tracking store.

    python -m orchestrator.report quickstart                          # ./mlflow.db
    python -m orchestrator.report wsol_cub --tracking-uri http://10.0.0.5:5000 --format md

The table as the papers lay it out: rows backbone x HaS variant (mixture, fill, p_hide), columns
GT-known loc, top-1 loc, top-1 cls, MaxBoxAccV2, PxAP, mean ± s.d. over seeds, the best of each
column marked, the no-hiding baseline first. Also written (with `--out DIR`): the table as md, csv,
html and parquet, each metric against the patch size per backbone and fill, and the CAM overlays
of the best HaS trial next to the baseline's on the same test images.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from orchestrator.paired import (
    format_paired, paired_differences, paired_markdown, paired_report, parse_baseline, plot_paired,
)
from orchestrator.table import COLUMNS, Table, TrialResult, build_table, describe, format_table
from orchestrator.tracking import ROLE_TAG, SWEEP_ID_TAG, SWEEP_TAG, TRIAL_TAG


def results_from_mlflow(client, sweep: str, sweep_id: str | None = None) -> tuple[object, list[TrialResult]]:
    """The parent run of `sweep` and one TrialResult per child run (params, latest metrics, status).

    Several sweeps of one name (started anew, each with its own id): the latest, unless `sweep_id`
    names one; the others are listed on stderr."""
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        raise LookupError(f"no sweep named {sweep!r} in the tracking store {client.tracking_uri}")
    base = f"tags.`{SWEEP_TAG}` = '{sweep}'"
    if sweep_id:
        base += f" and tags.`{SWEEP_ID_TAG}` = '{sweep_id}'"
    parents = client.search_runs([experiment.experiment_id], f"{base} and tags.`{ROLE_TAG}` = 'sweep'",
                                 order_by=["attributes.start_time DESC"])
    if not parents:
        raise LookupError(f"no parent run of sweep {sweep!r}{f' with id {sweep_id}' if sweep_id else ''} in "
                          f"{client.tracking_uri}")
    parent = parents[0]
    if len(parents) > 1:
        others = ", ".join(f"{p.data.tags.get(SWEEP_ID_TAG, '(no id)')} (started {_date(p)})" for p in parents[1:])
        print(f"note: {len(parents)} sweeps are named {sweep!r}; showing the latest, "
              f"{parent.data.tags.get(SWEEP_ID_TAG, '(no id)')} (started {_date(parent)}); the others: {others} "
              "(--sweep-id ID)", file=sys.stderr)
    if parent.data.tags.get(SWEEP_ID_TAG):
        base = f"tags.`{SWEEP_ID_TAG}` = '{parent.data.tags[SWEEP_ID_TAG]}'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], f"{base} and tags.`{ROLE_TAG}` = 'trial'",
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    results = []
    for run in runs:
        status = {"FINISHED": "TERMINATED", "FAILED": "ERROR"}.get(run.info.status, run.info.status)
        if run.data.tags.get("status") == "stopped_early":
            status = "STOPPED"
        config = {k: _typed(v) for k, v in run.data.params.items()}
        results.append(TrialResult(config, dict(run.data.metrics), status, run.data.tags.get(TRIAL_TAG, ""),
                                   run.info.run_id))
    return parent, results


def _date(run) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")


def _typed(text: str):
    """MLflow keeps params as strings: numbers back to numbers, for sorting and grouping."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def patch_size(mixture: str) -> float | None:
    """A single patch size (0 for no hiding); None for a mixture of several sizes."""
    if mixture == "none":
        return 0.0
    return float(mixture) if re.fullmatch(r"\d+", mixture) else None


def plot_metrics_vs_patch_size(table: Table, path: Path) -> Path | None:
    """Each metric against the patch size, a line per backbone and fill; mixtures as labelled points."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    if not table.rows:
        return None
    metrics = table.metrics
    figure = Figure(figsize=(4.2 * len(metrics), 3.6), dpi=100)
    axes = figure.subplots(1, len(metrics), squeeze=False)
    mixtures = sorted({row.key[1] for row in table.rows if patch_size(row.key[1]) is None})
    sizes = sorted({patch_size(row.key[1]) for row in table.rows if patch_size(row.key[1]) is not None})
    right = (max(sizes) if sizes else 0) + 8
    for axis, (metric, title) in zip(axes[0], metrics):
        for backbone in sorted({row.key[0] for row in table.rows}):
            for fill in sorted({row.key[2] for row in table.rows if row.key[2] != "-"} or {"-"}):
                points = []
                for row in table.rows:
                    if row.key[0] != backbone or (row.key[2] not in (fill, "-")) or metric not in row.values:
                        continue
                    size = patch_size(row.key[1])
                    x = size if size is not None else right + 8 * mixtures.index(row.key[1])
                    values = row.values[metric]
                    points.append((x, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0))
                if points:
                    points.sort()
                    xs, ys, errors = zip(*points)
                    axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=f"{backbone}, {fill}")
        ticks = sizes + [right + 8 * i for i in range(len(mixtures))]
        axis.set_xticks(ticks, [f"{s:g}" if s else "none" for s in sizes] + [m.split(":")[0] for m in mixtures],
                        fontsize=7)
        axis.set_title(title)
        axis.set_xlabel("patch size (px)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{table.split} (%)")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def best_and_baseline(table: Table, metric: str) -> tuple[TrialResult, TrialResult] | None:
    """A trial of the best HaS row (by `metric`) and one of the no-hiding row of the same backbone."""
    name = metric.split("/")[-1]
    scored = [(statistics.fmean(row.values[name]), row) for row in table.rows
              if not row.is_baseline and row.values.get(name)]
    if not scored:
        return None
    best = max(scored, key=lambda pair: pair[0])[1]
    baseline = next((row for row in table.rows if row.is_baseline and row.key[0] == best.key[0]), None)
    if baseline is None:
        return None
    return best.members[0], baseline.members[0]


def mosaic(best: Path, baseline: Path, captions: tuple[str, str], path: Path) -> Path:
    """Two overlay grids side by side, each under its caption."""
    import cv2
    import numpy as np

    images = [cv2.imread(str(p))[:, :, ::-1] for p in (baseline, best)]
    height = max(i.shape[0] for i in images)
    panels = []
    for image, caption in zip(images, captions[::-1]):
        image = np.pad(image, ((0, height - image.shape[0]), (0, 0), (0, 0)), constant_values=255)
        banner = np.full((28, image.shape[1], 3), 255, np.uint8)
        cv2.putText(banner, caption[:120], (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        panels.append(np.concatenate([banner, image]))
    gap = np.full((panels[0].shape[0], 16, 3), 255, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.concatenate([panels[0], gap, panels[1]], axis=1)[:, :, ::-1])
    return path


def write_report(table: Table, folder: Path, baseline: dict[str, str] | None = None) -> dict[str, Path]:
    """table.md / .csv / .html / .parquet, the metric plot, and the paired differences against the
    baseline (paired.md / .csv, paired_differences.png) in `folder`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for fmt in ("md", "csv", "html"):
        path = folder / f"table.{fmt}"
        text = format_table(table, fmt)
        path.write_text(text + (f"\n{describe(table)}\n" if fmt == "md" else ""))
        written[f"table_{fmt}"] = path
    rows = {column: [row.key[i] for row in table.rows] for i, column in enumerate(table.columns)}
    rows["seeds"] = [len(row.seeds) for row in table.rows]
    for metric, _ in COLUMNS:
        rows[f"{table.split}/{metric}_mean"] = [statistics.fmean(r.values[metric]) if r.values.get(metric) else None
                                                for r in table.rows]
        rows[f"{table.split}/{metric}_sd"] = [statistics.stdev(r.values[metric]) if len(r.values.get(metric, [])) > 1
                                              else None for r in table.rows]
    pq.write_table(pa.table(rows), folder / "table.parquet")
    written["table_parquet"] = folder / "table.parquet"
    plot = plot_metrics_vs_patch_size(table, folder / "metrics_vs_patch_size.png")
    if plot:
        written["plot"] = plot
    paired = paired_differences(table, baseline)
    if paired.comparisons:
        (folder / "paired.md").write_text(paired_markdown(paired, table.columns))
        (folder / "paired.csv").write_text(format_paired(paired, table.columns, "csv"))
        written["paired_md"], written["paired_csv"] = folder / "paired.md", folder / "paired.csv"
        written["paired_plot"] = plot_paired(paired, table.columns, folder / "paired_differences.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the sweep's name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: ./mlflow.db)")
    parser.add_argument("--sweep-id", help="which sweep of that name (its parent run's sweep_id tag; default: the latest)")
    parser.add_argument("--format", choices=("text", "md", "csv", "html"), default="text")
    parser.add_argument("--split", choices=("val", "test"), help="default: test when the trials have it")
    parser.add_argument("--baseline", metavar="KEY=VALUE[,KEY=VALUE]",
                        help="what the paired differences compare against, with the same backbone "
                             "(default: the sweep file's baseline, itself by default has.mixture=none: no hiding)")
    parser.add_argument("--out", help="also write the table files, plots and the CAM mosaic into this folder")
    args = parser.parse_args(argv)

    from orchestrator.tracking import default_tracking_uri, quiet_mlflow_http

    quiet_mlflow_http()
    from mlflow import MlflowClient

    client = MlflowClient(args.tracking_uri or default_tracking_uri())
    try:
        parent, results = results_from_mlflow(client, args.name, args.sweep_id)
    except LookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - an unreachable store is the user's to fix: one line
        print(f"error: cannot read the tracking store {client.tracking_uri}: {str(error).splitlines()[0]}",
              file=sys.stderr)
        return 2
    try:  # the sweep file's baseline (a parent tag) unless --baseline says otherwise
        baseline = parse_baseline(args.baseline or parent.data.tags.get("baseline"))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metric = parent.data.tags.get("metric", "val/maxboxacc_v2")
    searched = parent.data.tags.get("searched", "")
    table = build_table(results, args.split, choose_by=metric if searched else None,
                        mode=parent.data.tags.get("mode", "max"))
    print(format_table(table, args.format), end="")
    if args.format == "text":
        print(describe(table))
        print("\n" + paired_report(table, baseline), end="")
    elif args.format == "md":
        paired = paired_differences(table, baseline)
        if paired.comparisons:
            print("\n" + paired_markdown(paired, table.columns), end="")
    if args.out:
        written = write_report(table, Path(args.out), baseline)
        pair = best_and_baseline(table, metric)
        if pair:
            overlays = [_download_overlay(client, r.run_id, Path(args.out) / "overlays" / r.trial_id) for r in pair]
            if all(overlays):
                written["mosaic"] = mosaic(overlays[0], overlays[1], (_caption(pair[0]), _caption(pair[1])),
                                           Path(args.out) / "cam_best_vs_baseline.png")
        print(f"written: {', '.join(str(p) for p in written.values())}")
    return 0


def _caption(result: TrialResult) -> str:
    c = result.config
    variant = "no hiding" if c.get("has.mixture") == "none" else f"HaS {c.get('has.mixture')}, {c.get('has.fill')}"
    return f"{c.get('model.backbone')}, {variant}, seed {c.get('seed')}"


def _download_overlay(client, run_id: str, folder: Path) -> Path | None:
    """The test CAM overlay of the run's last evaluation."""
    epochs = sorted(a.path for a in client.list_artifacts(run_id, "evaluations"))
    for epoch in reversed(epochs):
        names = [a.path for a in client.list_artifacts(run_id, epoch)]
        picture = next((n for n in names if n.endswith("test_cam_overlay.png")), None)
        if picture:
            folder.mkdir(parents=True, exist_ok=True)
            return Path(client.download_artifacts(run_id, picture, str(folder)))
    return None


if __name__ == "__main__":
    sys.exit(main())
