"""Paired differences against a baseline: is a configuration's gain over the baseline real?

Trials that share a seed share their data order, initialisation and hiding draws, so a configuration
is compared with its baseline seed by seed: d_s = metric(configuration, seed s) - metric(baseline,
seed s), over the seeds both have. Reported: the mean of d and its 95% Student t interval,
mean ± t(0.975, n-1) · sd(d) / sqrt(n). A t interval, not a bootstrap: with the 2-5 seeds a sweep
affords, a bootstrap over seeds has a handful of distinct resamples and gives intervals that are too
narrow. The interval assumes the seed-to-seed differences are roughly normal; with one seed there is
no interval. (Choe et al. 2020: most WSOL gains vanish under fair tuning; this says whether the
sweep's do.)
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.table import IDENTITY, Row, Table, _shown, render

DEFAULT_BASELINE = {"has.mixture": "none"}  # no hiding, with the same backbone
LEVEL = 0.95


@dataclass
class Difference:
    """One metric of one configuration minus its baseline, over the seeds both have."""

    values: list[float]  # d_s, in the order of `seeds`
    seeds: list[int]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% t interval of the mean difference; None with fewer than two seeds."""
        if self.n < 2:
            return None
        half = t_quantile(1 - (1 - LEVEL) / 2, self.n - 1) * statistics.stdev(self.values) / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def excludes_zero(self) -> bool:
        interval = self.interval
        return interval is not None and (interval[0] > 0 or interval[1] < 0)


@dataclass
class Comparison:
    row: Row
    baseline: Row
    differences: dict[str, Difference] = field(default_factory=dict)  # metric -> difference


@dataclass
class Paired:
    split: str
    baseline: dict[str, str]  # what a baseline row is (config key -> value), besides the same backbone
    metrics: list[tuple[str, str]]
    comparisons: list[Comparison]
    unmatched: list[Row]  # rows with no baseline to compare with (or with no seed in common)

    @property
    def max_seeds(self) -> int:
        return max((d.n for c in self.comparisons for d in c.differences.values()), default=0)


def t_quantile(p: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


def parse_baseline(text: str | None) -> dict[str, str]:
    """'has.mixture=none' or 'has.mixture=24,has.fill=zero' -> {key: value}; None: no hiding."""
    if not text:
        return dict(DEFAULT_BASELINE)
    pairs = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--baseline: {part!r} is not KEY=VALUE (e.g. has.mixture=none, or "
                             "has.mixture=24,has.fill=zero)")
        pairs[key.strip()] = value.strip()
    return pairs


def _matches(row: Row, selector: Mapping[str, str]) -> bool:
    config = row.members[0].config
    return all(_shown(config.get(key, "")) == value for key, value in selector.items())


def by_seed(row: Row, split: str, metric: str) -> dict[int, float]:
    """One value per seed of the row's trials (a metric a trial lacks, or not finite, is left out)."""
    values = {}
    for trial in row.members:
        value = trial.metrics.get(f"{split}/{metric}")
        if value is not None and math.isfinite(value):
            values[int(trial.config.get("seed", 0))] = float(value)
    return values


def _baseline_of(row: Row, candidates: list[Row]) -> Row | None:
    """The baseline row of the same backbone; among several, the one that agrees on the other
    varying columns (a grid over lr without a choice on val: each lr against its own baseline)."""
    same = [c for c in candidates if c.key[0] == row.key[0]]
    if len(same) > 1:
        same = [c for c in same if c.key[len(IDENTITY):] == row.key[len(IDENTITY):]]
    return same[0] if len(same) == 1 else None


def paired_differences(table: Table, baseline: Mapping[str, str] | None = None) -> Paired:
    selector = dict(baseline or DEFAULT_BASELINE)
    candidates = [row for row in table.rows if _matches(row, selector)]
    comparisons, unmatched = [], []
    for row in table.rows:
        if row in candidates:
            continue
        base = _baseline_of(row, candidates)
        comparison = Comparison(row, base) if base is not None else None
        for metric, _ in table.metrics if comparison else ():
            mine, theirs = by_seed(row, table.split, metric), by_seed(base, table.split, metric)
            seeds = sorted(set(mine) & set(theirs))
            if seeds:
                comparison.differences[metric] = Difference([mine[s] - theirs[s] for s in seeds], seeds)
        if comparison and comparison.differences:
            comparisons.append(comparison)
        else:
            unmatched.append(row)
    return Paired(table.split, selector, table.metrics, comparisons, unmatched)


def _cell(difference: Difference | None, mark: tuple[str, str]) -> str:
    if difference is None:
        return "-"
    interval = difference.interval
    if interval is None:
        return f"{difference.mean:+.2f}"
    text = f"{difference.mean:+.2f} [{interval[0]:+.2f}, {interval[1]:+.2f}]"
    return f"{mark[0]}{text}{mark[1]}" if difference.excludes_zero else text


def _baseline_text(paired: Paired) -> str:
    what = ", ".join(f"{k}={v}" for k, v in paired.baseline.items())
    return "no hiding" if paired.baseline == DEFAULT_BASELINE else what


def describe_paired(paired: Paired) -> str:
    parts = [f"{paired.split} split; each configuration minus its baseline ({_baseline_text(paired)}, same "
             f"backbone), seed by seed: mean [95% t interval over seeds]; * / bold: the interval excludes 0"]
    if paired.comparisons and paired.max_seeds < 2:
        parts.append("one seed in common: no interval can be given (run more seeds)")
    if paired.unmatched:
        parts.append(f"{len(paired.unmatched)} configurations without a baseline to pair with")
    return "; ".join(parts)


def format_paired(paired: Paired, columns: list[str], fmt: str = "text") -> str:
    """The differences as a table (text, md or csv), the configuration columns of the table first."""
    header = [*(c.split(".")[-1] for c in columns), "seeds", *(f"Δ {title}" for _, title in paired.metrics)]
    if fmt == "csv":
        lines = [",".join([*columns, "seeds", *(f"{paired.split}/{m}_diff_{s}" for m, _ in paired.metrics
                                                  for s in ("mean", "low", "high"))])]
        for c in paired.comparisons:
            numbers = []
            for metric, _ in paired.metrics:
                d = c.differences.get(metric)
                interval = d.interval if d else None
                bounds = [f"{v:.4f}" for v in interval] if interval else ["", ""]
                numbers += [f"{d.mean:.4f}" if d else "", *bounds]
            lines.append(",".join([*c.row.key, str(_seeds(c)), *numbers]))
        return "\n".join(lines) + "\n"
    mark = ("**", "**") if fmt == "md" else ("", " *")
    return render(header, [[*c.row.key, str(_seeds(c)), *(_cell(c.differences.get(m), mark) for m, _ in paired.metrics)]
                           for c in paired.comparisons], fmt)


def _seeds(comparison: Comparison) -> int:
    return max(d.n for d in comparison.differences.values())


def _label(comparison: Comparison, columns: list[str]) -> str:
    key = comparison.row.key
    parts = [key[0], "no hiding" if key[1] == "none" else f"{key[1]}, {key[2]}, p {key[3]}"]
    parts += [f"{c.split('.')[-1]}={v}" for c, v in zip(columns[len(IDENTITY):], key[len(IDENTITY):])]
    return " | ".join(parts)


def plot_paired(paired: Paired, columns: list[str], path: Path) -> Path | None:
    """Each metric's differences with their intervals, one line per configuration, 0 marked."""
    from matplotlib.figure import Figure

    if not paired.comparisons:
        return None
    labels = [_label(c, columns) for c in paired.comparisons]
    figure = Figure(figsize=(3.6 * len(paired.metrics) + 3.0, 0.45 * len(labels) + 1.6), dpi=100)
    axes = figure.subplots(1, len(paired.metrics), squeeze=False, sharey=True)[0]
    ys = list(range(len(labels)))[::-1]
    for axis, (metric, title) in zip(axes, paired.metrics):
        axis.axvline(0.0, color="0.4", linewidth=1)
        for y, comparison in zip(ys, paired.comparisons):
            d = comparison.differences.get(metric)
            if d is None:
                continue
            interval = d.interval
            color = "tab:red" if d.excludes_zero else "tab:blue"
            if interval is not None:
                axis.errorbar([d.mean], [y], xerr=[[d.mean - interval[0]], [interval[1] - d.mean]], fmt="o",
                              color=color, capsize=3)
            else:
                axis.plot([d.mean], [y], marker="o", markerfacecolor="none", color=color)
        axis.set_title(f"Δ {title}", fontsize=9)
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, labels, fontsize=7)
    figure.suptitle(f"{paired.split}: minus {_baseline_text(paired)}, paired by seed, 95% t intervals "
                    f"(red: excludes 0; hollow: one seed)", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def paired_markdown(paired: Paired, columns: list[str]) -> str:
    """The md table and, under it, the line that says how to read it."""
    return f"{format_paired(paired, columns, 'md')}\n{describe_paired(paired)}\n"


def paired_report(table: Table, baseline: Mapping[str, str] | None = None) -> str:
    """The differences as text with the line that says how to read them; a sentence when there are none."""
    paired = paired_differences(table, baseline)
    if not paired.comparisons:
        return f"paired differences: no configuration to compare with a baseline ({_baseline_text(paired)})\n"
    return f"paired differences:\n{format_paired(paired, table.columns)}{describe_paired(paired)}\n"
