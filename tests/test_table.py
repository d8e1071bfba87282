"""Specification of the comparison table: grouping over seeds, baseline first, best marked, choice on val."""
from orchestrator.table import TrialResult, build_table, format_table


def trial(mixture, seed, maxbox, cls=90.0, fill="dataset_mean", lr=0.1, val=None, status="TERMINATED"):
    config = {"model.backbone": "tiny_cnn", "has.mixture": mixture, "has.fill": fill, "has.p_hide": 0.5,
              "seed": seed, "optim.lr": lr}
    metrics = {"test/maxboxacc_v2": maxbox, "test/cls_top1": cls, "val/maxboxacc_v2": val if val is not None else maxbox}
    return TrialResult(config, metrics, status)


def test_rows_group_seeds_and_the_baseline_comes_first():
    table = build_table([trial("24", 0, 60.0), trial("none", 0, 20.0), trial("24", 1, 70.0), trial("none", 1, 30.0)])
    assert table.split == "test"
    assert [row.key[1] for row in table.rows] == ["none", "24"]
    assert table.rows[0].key[2:4] == ("-", "-")  # fill and p_hide mean nothing without hiding
    assert table.rows[1].values["maxboxacc_v2"] == [60.0, 70.0] and table.rows[1].seeds == [0, 1]
    text = format_table(table, "text")
    assert "65.00 ± 7.07 *" in text and "25.00 ± 7.07 *" not in text  # the best of the column is marked


def test_markdown_bolds_the_best_and_csv_gives_mean_and_sd():
    table = build_table([trial("24", 0, 60.0), trial("none", 0, 20.0, cls=95.0)])
    md = format_table(table, "md")
    assert md.splitlines()[2:] == ["| tiny_cnn | none | - | - | 1 | **95.00** | 20.00 |",
                                   "| tiny_cnn | 24 | dataset_mean | 0.5 | 1 | 90.00 | **60.00** |"]
    csv = format_table(table, "csv").splitlines()
    assert csv[0] == ("model.backbone,has.mixture,has.fill,has.p_hide,seeds,test/cls_top1_mean,test/cls_top1_sd,"
                      "test/maxboxacc_v2_mean,test/maxboxacc_v2_sd")
    assert csv[1] == "tiny_cnn,none,-,-,1,95.0000,,20.0000,"


def test_other_searched_hyperparameters_are_chosen_on_val_per_variant():
    results = [trial("24", s, test, lr=lr, val=val) for s in (0, 1)
               for lr, val, test in ((0.1, 50.0, 70.0), (0.3, 60.0, 55.0))]
    table = build_table(results, choose_by="val/maxboxacc_v2")
    assert len(table.rows) == 1 and table.columns[-1] == "optim.lr"
    assert table.rows[0].key[-1] == "0.3"  # better on val, although worse on test
    assert table.rows[0].values["maxboxacc_v2"] == [55.0, 55.0]


def test_failed_and_stopped_trials_are_left_out_and_counted():
    table = build_table([trial("24", 0, 60.0), trial("24", 1, 0.0, status="ERROR"),
                         trial("none", 0, 10.0, status="STOPPED")])
    assert [row.key[1] for row in table.rows] == ["24"]
    assert table.left_out == {"failed": 1, "stopped before their last epoch (by the scheduler, or the sweep was interrupted)": 1}
