"""The comparison table: one row per configuration (backbone x HaS variant), mean ± s.d. over seeds."""
from __future__ import annotations

import csv
import html
import io
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The paper's columns, in its order; all percentages.
COLUMNS = (("loc_gt_known", "GT-known loc"), ("loc_top1", "Top-1 loc"), ("cls_top1", "Top-1 cls"),
           ("maxboxacc_v2", "MaxBoxAccV2"), ("pxap", "PxAP"))
IDENTITY = ("model.backbone", "has.mixture", "has.fill", "has.p_hide")  # always shown, in this order
IGNORED = frozenset({"seed", "output_dir", "device", "progress", "threads", "keep_checkpoints", "data.workers",
                     "eval.workers"})


@dataclass
class TrialResult:
    """One trial: its flattened run config, its last reported metrics, and how it ended."""

    config: Mapping[str, Any]
    metrics: Mapping[str, float]
    status: str = "TERMINATED"  # TERMINATED, ERROR, or STOPPED (by the scheduler)
    trial_id: str = ""
    run_id: str = ""  # its MLflow run, when read from the tracking store


@dataclass
class Row:
    key: tuple  # values of the identity and varying columns
    values: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per seed
    seeds: list[int] = field(default_factory=list)
    members: list[TrialResult] = field(default_factory=list)  # the trials of the row, one per seed

    @property
    def is_baseline(self) -> bool:
        return self.key[1] == "none"


@dataclass
class Table:
    split: str
    columns: list[str]  # configuration columns: IDENTITY, then the other keys that vary
    rows: list[Row]
    metrics: list[tuple[str, str]]  # (metric, title) present in at least one row
    left_out: dict[str, int]  # trials not in the table, by reason

    def best(self, metric: str) -> float | None:
        means = [statistics.fmean(r.values[metric]) for r in self.rows if r.values.get(metric)]
        return max(means) if means else None


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def build_table(results: Iterable[TrialResult], split: str | None = None, choose_by: str | None = None,
                mode: str = "max") -> Table:
    """Group finished trials by configuration (all config keys but the seed) over their seeds.

    `choose_by` (e.g. 'val/maxboxacc_v2'): of the rows of one backbone x HaS variant that differ in
    other hyperparameters, keep the one whose mean of that metric is best (chosen on val, shown on test).
    """
    results = list(results)
    finished = [r for r in results if r.status == "TERMINATED"]
    if split is None:  # the final test numbers when the trials have them
        split = "test" if any(f"test/{m}" in r.metrics for r in finished for m, _ in COLUMNS) else "val"
    usable = [r for r in finished if any(f"{split}/{m}" in r.metrics for m, _ in COLUMNS)]
    left_out: dict[str, int] = {}
    for r in results:
        if r not in usable:
            reason = {"ERROR": "failed", "STOPPED": "stopped before their last epoch (by the scheduler, or the sweep was interrupted)"}.get(r.status, f"no {split} metrics")
            left_out[reason] = left_out.get(reason, 0) + 1
    varying = sorted(k for k in {k for r in usable for k in r.config}
                     if k not in IGNORED and k not in IDENTITY and len({_shown(r.config.get(k)) for r in usable}) > 1)
    columns = [*IDENTITY, *varying]
    rows: dict[tuple, Row] = {}
    for r in usable:
        config = dict(r.config)
        if config.get("has.mixture") == "none":  # nothing hidden: fill and p_hide mean nothing
            config["has.fill"], config["has.p_hide"] = "-", "-"
        key = tuple(_shown(config.get(c, "")) for c in columns)
        row = rows.setdefault(key, Row(key))
        row.seeds.append(int(r.config.get("seed", 0)))
        row.members.append(r)
        for metric, _ in COLUMNS:
            value = r.metrics.get(f"{split}/{metric}")
            if value is not None and math.isfinite(value):
                row.values.setdefault(metric, []).append(float(value))
        if choose_by is not None and choose_by in r.metrics:
            row.values.setdefault(choose_by, []).append(float(r.metrics[choose_by]))
    if choose_by is not None and varying:
        rows = _choose(rows, choose_by, mode, len(IDENTITY))
    ordered = sorted(rows.values(), key=lambda row: (row.key[0], not row.is_baseline, row.key[1:]))
    present = [(m, t) for m, t in COLUMNS if any(m in row.values for row in ordered)]
    return Table(split, columns, ordered, present, left_out)


def _choose(rows: dict[tuple, Row], metric: str, mode: str, identity: int) -> dict[tuple, Row]:
    """Per identity (backbone x HaS variant), the row with the best mean of `metric`."""

    def score(row: Row) -> float:
        values = row.values.get(metric)
        if not values:
            return -math.inf
        return statistics.fmean(values) if mode == "max" else -statistics.fmean(values)

    best: dict[tuple, Row] = {}
    for key, row in rows.items():
        group = key[:identity]
        if group not in best or score(row) > score(best[group]):
            best[group] = row
    return {row.key: row for row in best.values()}


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def _header(table: Table) -> list[str]:
    return [*(c.split(".")[-1] for c in table.columns), "seeds", *(title for _, title in table.metrics)]


def format_table(table: Table, fmt: str = "text") -> str:
    """The table as text (console), md (best bold), csv (mean and s.d. columns) or html."""
    header = _header(table)
    best = {m: table.best(m) for m, _ in table.metrics}

    def cells(row: Row, mark: tuple[str, str]) -> list[str]:
        out = [*row.key, str(len(row.seeds))]
        for metric, _ in table.metrics:
            text = _cell(row.values.get(metric, []))
            values = row.values.get(metric)
            if values and best[metric] is not None and statistics.fmean(values) == best[metric]:
                text = f"{mark[0]}{text}{mark[1]}"
            out.append(text)
        return out

    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow([*(c for c in table.columns), "seeds",
                         *(f"{table.split}/{m}_{s}" for m, _ in table.metrics for s in ("mean", "sd"))])
        for row in table.rows:
            numbers = []
            for metric, _ in table.metrics:
                values = row.values.get(metric, [])
                numbers += [f"{statistics.fmean(values):.4f}" if values else "",
                            f"{statistics.stdev(values):.4f}" if len(values) > 1 else ""]
            writer.writerow([*row.key, len(row.seeds), *numbers])
        return buffer.getvalue()
    if fmt == "html":
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(row, ("<b>", "</b>"))) + "</tr>"
                       for row in table.rows)
        return f"<table>\n<tr>{head}</tr>\n{body}\n</table>\n"
    mark = ("**", "**") if fmt == "md" else ("", " *")
    return render(header, [cells(row, mark) for row in table.rows], fmt)


def render(header: list[str], rows: list[list[str]], fmt: str = "text") -> str:
    """Rows of cells under a header: a markdown table (md), or columns padded to their widest cell (text)."""
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"
    grid = [header, *rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def describe(table: Table) -> str:
    """A line under the table: which split, what the marks mean, which trials are left out."""
    parts = [f"{table.split} split, mean ± s.d. over seeds; * / bold: best of the column"]
    parts += [f"{count} trials {reason}" for reason, count in table.left_out.items()]
    return "; ".join(parts)
