"""Specification of the paired differences: seed by seed against the baseline, 95% t intervals."""
import math

import pytest

from orchestrator.paired import (
    describe_paired, format_paired, paired_differences, paired_report, parse_baseline, plot_paired,
)
from orchestrator.table import TrialResult, build_table

# Student t's 97.5% quantiles in closed form (printed tables: 4.303 and 12.706): with 2 degrees of
# freedom t_p = (2p - 1) / sqrt(2 p (1 - p)); with 1 (the Cauchy distribution) t_p = tan(pi (p - 1/2)).
T_975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
T_975_DF1 = math.tan(math.pi * 0.475)


def trial(mixture, seed, maxbox, fill="dataset_mean", backbone="tiny_cnn", lr=0.1, val=None):
    config = {"model.backbone": backbone, "has.mixture": mixture, "has.fill": fill, "has.p_hide": 0.5,
              "seed": seed, "optim.lr": lr}
    return TrialResult(config, {"test/maxboxacc_v2": maxbox, "val/maxboxacc_v2": maxbox if val is None else val})


def test_the_t_quantiles_are_the_printed_ones():
    from orchestrator.paired import t_quantile

    assert t_quantile(0.975, 2) == pytest.approx(T_975_DF2, abs=1e-9)
    assert t_quantile(0.975, 1) == pytest.approx(T_975_DF1, abs=1e-9)


def test_differences_are_taken_seed_by_seed_with_a_t_interval():
    # baseline 20, 30, 40; HaS 25, 36, 47: d = 5, 6, 7 (an unpaired comparison would see 36 vs 30 ± 10)
    table = build_table([trial("none", s, v) for s, v in ((0, 20.0), (1, 30.0), (2, 40.0))]
                        + [trial("24", s, v) for s, v in ((0, 25.0), (1, 36.0), (2, 47.0))])
    paired = paired_differences(table)
    [comparison] = paired.comparisons
    d = comparison.differences["maxboxacc_v2"]
    assert d.seeds == [0, 1, 2] and d.values == [5.0, 6.0, 7.0] and d.mean == 6.0
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # sd(5, 6, 7) = 1
    assert d.interval == pytest.approx((6.0 - half, 6.0 + half), abs=1e-9)  # (3.516, 8.484)
    assert d.excludes_zero
    text = format_paired(paired, table.columns)
    assert text.splitlines()[2].split() == ["tiny_cnn", "24", "dataset_mean", "0.5", "3", "+6.00", "[+3.52,", "+8.48]", "*"]


def test_an_interval_that_covers_zero_is_not_marked():
    table = build_table([trial("none", s, 50.0) for s in (0, 1, 2)]
                        + [trial("24", s, v) for s, v in ((0, 52.0), (1, 54.0), (2, 56.0))])
    d = paired_differences(table).comparisons[0].differences["maxboxacc_v2"]
    half = T_975_DF2 * 2.0 / math.sqrt(3)  # d = 2, 4, 6: mean 4, sd 2
    assert d.interval == pytest.approx((4.0 - half, 4.0 + half), abs=1e-9)  # (-0.97, 8.97)
    assert not d.excludes_zero
    assert "+4.00 [-0.97, +8.97]" in format_paired(paired_differences(table), table.columns)
    assert "*" not in format_paired(paired_differences(table), table.columns).splitlines()[2]


def test_only_seeds_both_have_are_paired_and_one_seed_gives_no_interval():
    table = build_table([trial("none", 0, 10.0), trial("none", 1, 30.0), trial("24", 1, 33.0), trial("24", 2, 90.0)])
    paired = paired_differences(table)
    d = paired.comparisons[0].differences["maxboxacc_v2"]
    assert d.seeds == [1] and d.values == [3.0] and d.interval is None and not d.excludes_zero
    assert "no interval can be given" in describe_paired(paired)
    assert format_paired(paired, table.columns).splitlines()[2].split()[-2:] == ["1", "+3.00"]


def test_each_configuration_is_paired_with_the_baseline_of_its_own_backbone():
    table = build_table([trial("none", s, 10.0 + s, backbone="a") for s in (0, 1)]
                        + [trial("none", s, 50.0 + s, backbone="b") for s in (0, 1)]
                        + [trial("24", s, 12.0 + 2 * s, backbone="a") for s in (0, 1)]
                        + [trial("24", s, 49.0, backbone="b") for s in (0, 1)])
    paired = paired_differences(table)
    got = {c.row.key[0]: c.differences["maxboxacc_v2"].values for c in paired.comparisons}
    assert got == {"a": [2.0, 3.0], "b": [-1.0, -2.0]}
    d = next(c for c in paired.comparisons if c.row.key[0] == "a").differences["maxboxacc_v2"]
    half = T_975_DF1 * math.sqrt(0.5) / math.sqrt(2)  # sd(2, 3) = sqrt(1/2)
    assert d.interval == pytest.approx((2.5 - half, 2.5 + half), abs=1e-9)


def test_with_a_choice_on_val_each_side_keeps_its_own_best_learning_rate():
    # the baseline is best at lr 0.3 on val, HaS at lr 0.1: their chosen rows are paired
    results = [trial("none", s, 40.0 + s, lr=0.1, val=10.0) for s in (0, 1)]
    results += [trial("none", s, 45.0 + s, lr=0.3, val=20.0) for s in (0, 1)]
    results += [trial("24", s, 50.0 + 3 * s, lr=0.1, val=30.0) for s in (0, 1)]
    results += [trial("24", s, 20.0, lr=0.3, val=5.0) for s in (0, 1)]
    table = build_table(results, choose_by="val/maxboxacc_v2")
    [comparison] = paired_differences(table).comparisons
    assert comparison.baseline.key[-1] == "0.3" and comparison.row.key[-1] == "0.1"
    assert comparison.differences["maxboxacc_v2"].values == [5.0, 7.0]


def test_a_chosen_baseline_and_bad_baselines():
    table = build_table([trial("none", s, 10.0) for s in (0, 1)] + [trial("24", s, 20.0 + s, fill="zero") for s in (0, 1)]
                        + [trial("24", s, 30.0, fill="dataset_mean") for s in (0, 1)])
    paired = paired_differences(table, parse_baseline("has.mixture=24,has.fill=zero"))
    got = {c.row.key[1:3]: c.differences["maxboxacc_v2"].values for c in paired.comparisons}
    assert got == {("none", "-"): [-10.0, -11.0], ("24", "dataset_mean"): [10.0, 9.0]}
    assert parse_baseline(None) == {"has.mixture": "none"}
    with pytest.raises(ValueError, match="'has.fill' is not KEY=VALUE"):
        parse_baseline("has.mixture=24,has.fill")
    assert paired_report(build_table([trial("24", 0, 1.0)])).startswith("paired differences: no configuration")


def test_csv_and_plot(tmp_path):
    table = build_table([trial("none", s, 20.0 + 10 * s) for s in (0, 1, 2)]
                        + [trial("24", s, 25.0 + 11 * s) for s in (0, 1, 2)])
    paired = paired_differences(table)
    lines = format_paired(paired, table.columns, "csv").splitlines()
    assert lines[0].endswith("seeds,test/maxboxacc_v2_diff_mean,test/maxboxacc_v2_diff_low,test/maxboxacc_v2_diff_high")
    half = T_975_DF2 / math.sqrt(3)
    assert lines[1] == f"tiny_cnn,24,dataset_mean,0.5,3,6.0000,{6 - half:.4f},{6 + half:.4f}"
    path = plot_paired(paired, table.columns, tmp_path / "paired.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
