"""Specification of sweep files: domains, mixtures, seeds, bundles, validation before Ray starts."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.search import grid_points, resolve, trial_values, validate
from orchestrator.spaces import SpaceError, SweepInputError, check_sweep_name, load_space, parse_space

ROOT = Path(__file__).resolve().parent.parent


def space(text: str):
    return parse_space(text, "sweep.yaml")


def test_grids_cross_and_seeds_replicate_every_configuration():
    spec = space("""
space:
  has.mixture: {grid: ["8", "16"]}
  has.fill: {grid: [zero, blur]}
seeds: [0, 1, 2]
""")
    points = grid_points(spec)
    assert len(points) == 2 * 2 * 3
    assert points[0] == {"has.mixture": "8", "has.fill": "zero", "seed": 0}
    assert {p["seed"] for p in points} == {0, 1, 2}


def test_no_hiding_is_not_crossed_with_fills_it_cannot_use():
    spec = space("""
space:
  has.mixture: {grid: [none, "8"]}
  has.fill: {grid: [dataset_mean, shuffle, blur]}
seeds: [0, 1]
""")
    points = grid_points(spec)
    assert len(points) == (1 + 3) * 2
    assert [p["has.fill"] for p in points if p["has.mixture"] == "none"] == ["dataset_mean", "dataset_mean"]


def test_named_mixtures_and_mixture_forms_become_canonical_strings():
    spec = space("""
mixtures:
  paper: "mixed:0,16,32,44,56"
  small: {0: 1, 8: 3}
base: {data: {synthetic: {image_size: 64}}}
space:
  has.mixture: {grid: [none, 16, paper, small]}
""")
    assert spec.domains["has.mixture"].values == ("none", "16", "mixed:0,16,32,44,56", "weighted:0=0.25,8=0.75")


def test_random_draws_are_shared_by_the_seeds_and_reproducible():
    text = """
space:
  has.mixture: {grid: ["8"]}
  optim.lr: {loguniform: [0.001, 0.1]}
  has.p_hide: {uniform: [0.2, 0.8]}
seeds: [0, 1]
search: {algorithm: random, num_samples: 3, seed: 7}
"""
    points = grid_points(space(text))
    assert len(points) == 3 * 2
    for first, second in zip(points[0::2], points[1::2]):  # the same draw, two seeds
        assert {k: v for k, v in first.items() if k != "seed"} == {k: v for k, v in second.items() if k != "seed"}
        assert 0.001 <= first["optim.lr"] <= 0.1 and 0.2 <= first["has.p_hide"] <= 0.8
    assert grid_points(space(text)) == points


def test_sampled_mixture_weights_collapse_into_one_mixture():
    spec = space("""
space:
  has.mixture: {sampled_weights: [0, 8, 16]}
search: {algorithm: random, num_samples: 2}
""")
    point = grid_points(spec)[0]
    assert set(point) == {"has.mixture.w0", "has.mixture.w8", "has.mixture.w16", "seed"}
    config = resolve(spec, point)
    weights = {int(k.rsplit("w", 1)[1]): v for k, v in point.items() if k.startswith("has.mixture.w")}
    total = sum(weights.values())
    assert config.has.sizes == pytest.approx({s: w / total for s, w in weights.items()}, rel=1e-5)


def test_bundles_set_linked_values_together_and_win_over_samples():
    spec = space("""
space:
  recipe:
    grid:
      - {model.backbone: tiny_cnn, optim.epochs: 3, optim.lr: 0.5}
      - {model.backbone: tiny_cnn, optim.epochs: 5}
  optim.lr: {uniform: [0.01, 0.02]}
search: {algorithm: random, num_samples: 1}
""")
    first, second = grid_points(spec)
    assert resolve(spec, first).optim.epochs == 3 and resolve(spec, first).optim.lr == 0.5
    assert resolve(spec, second).optim.epochs == 5 and 0.01 <= resolve(spec, second).optim.lr <= 0.02


def test_tune_params_map_back_to_the_trials_values():
    spec = space("""
space:
  has.mixture: {grid: ["8"]}
seeds: [3, 4]
""")
    assert trial_values(spec, {"grid": {"has.mixture": "8", "seed": 4}}) == {"has.mixture": "8", "seed": 4}
    assert trial_values(spec, {"trial": {"has.mixture": "8"}, "__trial_index__": 1})["seed"] == 4


@pytest.mark.parametrize("text, message", [
    ("space: {optim.lrr: 0.1}", "sweep.yaml: space.optim.lrr: unknown key; did you mean optim.lr?"),
    ("spaces: {}", "sweep.yaml: spaces: unknown key; did you mean space?"),
    ("space: {optim.lr: {loguniform: [0, 1]}}", "sweep.yaml: space.optim.lr: loguniform[0, 1] needs low < high and low > 0"),
    ("space: {optim.lr: {uniformm: [0, 1]}}", "sweep.yaml: space.optim.lr: unknown domain 'uniformm'; did you mean uniform?"),
    ("space: {optim.epochs: {grid: [2, 2.5]}}", "sweep.yaml: optim.epochs: 2.5 is not allowed; allowed: an int"),
    ("space: {has.mixture: {grid: [none, 99]}}", "sweep.yaml: has.mixture: patch size 99 is larger than the input 48x48"),
    ("space: {has.mixture: {grid: [tiny]}}", "sweep.yaml: space.has.mixture: 'tiny' is not a mixture"),
    ("space: {seed: {grid: [1, 2]}}", "sweep.yaml: space.seed: use the top-level `seeds: [...]`"),
    ("scheduler: {name: hyperband}", "sweep.yaml: scheduler.name: 'hyperband' is not allowed; allowed: one of 'fifo', 'asha', 'pbt'"),
    ("resources: {gpus: one}", "sweep.yaml: resources.gpus: 'one' is not allowed; allowed: a number"),
    ("scheduler: {name: pbt}\nresources: {workers: 2}\nspace: {optim.lr: {uniform: [0.1, 0.2]}}",
     "sweep.yaml: scheduler.name: pbt needs Tune-level checkpoints"),
    ("space: [1, 2]", "sweep.yaml: space: a mapping of dotted keys"),
    ("storage: {sync_seconds: 0}", "sweep.yaml: storage.sync_seconds: 0 is not allowed; allowed: a number of seconds > 0"),
    ("space: {optim.lr: {uniform: [0.1, 0.2]}\n", "sweep.yaml: not valid YAML"),
])
def test_bad_sweep_files_are_refused_naming_the_file_and_the_key(text, message):
    with pytest.raises(SpaceError) as error:
        validate(space(text))
    assert str(error.value).startswith(message)


def test_every_shipped_sweep_file_is_valid():
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        spec = load_space(path)
        if spec.base.get("data", {}).get("name", "synthetic") != "synthetic":
            spec.base["data"]["root"] = "/data/somewhere"  # the folder is checked at launch, not here
        assert validate(spec) >= 1, path.name
        assert path.read_text().startswith("#"), f"{path.name} explains what it reproduces"


def cli(*args, timeout=60):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "orchestrator.sweep", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)
    return done, time.monotonic() - start


@pytest.mark.parametrize("args, message", [
    (["--space", "nope.yaml"], "error: nope.yaml: no such sweep file"),
    (["optim.lrr=3"], "error: override: optim.lrr: unknown key; did you mean optim.lr?"),
    (["has.mixture=8"], "error: has.mixture=8: has.mixture is searched by the sweep (space.has.mixture)"),
    (["--space", "search_spaces/wsol_cub.yaml"], "error: search_spaces/wsol_cub.yaml: data.root: required"),
    (["--name", "../../x"], "error: --name: '../../x' is not a sweep name; allowed: 1-100 letters, digits"),
    (["--resume", "a/b"], "error: --resume: 'a/b' is not a sweep name"),
    (["--space", "tests/data/bad_metric.yaml"], "error: tests/data/bad_metric.yaml: metric: 'val/foo' is never "
                                                 "reported by the trials; allowed: val/cls_top1, val/loc_gt_known"),
    (["--space", "tests/data/test_metric.yaml"], "error: tests/data/test_metric.yaml: metric: 'test/maxboxacc_v2' is "
                                                  "never reported by the trials (test/ metrics exist only after the last "
                                                  "epoch: choose on val)"),
])
def test_bad_input_is_one_line_and_exit_code_2_within_seconds(args, message):
    done, seconds = cli(*args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert seconds < 15


def test_dry_run_lists_the_trials_and_their_resources():
    done, _ = cli("--dry-run")
    assert done.returncode == 0, done.stderr
    assert "10 trials, each 1 worker(s) x {'CPU': 1.0}" in done.stdout
    assert "mixed:8,16,24  zero  1" in done.stdout


def test_an_existing_experiment_is_seen_in_local_and_uri_storage(tmp_path):
    from orchestrator.storage import exists

    (tmp_path / "taken").mkdir()
    assert exists(str(tmp_path), "taken") and not exists(str(tmp_path), "free")
    assert exists(f"file://{tmp_path}", "taken") and not exists(f"file://{tmp_path}", "free")


def test_an_experiment_below_a_uri_keeps_the_uri_options_at_the_end():
    from orchestrator.storage import child_uri

    assert child_uri("s3://bucket/sweeps?endpoint_override=127.0.0.1:9000&scheme=http", "quickstart") == \
        "s3://bucket/sweeps/quickstart?endpoint_override=127.0.0.1:9000&scheme=http"
    assert child_uri("s3://bucket", "q") == "s3://bucket/q" and child_uri("/tmp/r", "q") == "/tmp/r/q"


@pytest.mark.parametrize("name", ["quickstart", "wsol_cub-2", "a.b_c", "x" * 100])
def test_a_sweep_name_is_one_folder_name(name):
    assert check_sweep_name(name, "--name") == name


@pytest.mark.parametrize("name", ["", "..", "../x", "a/b", "-x", ".hidden", "a..b", "x" * 101, "a b", "s3://b"])
def test_anything_else_is_refused_as_a_sweep_name(name):
    with pytest.raises(SweepInputError, match="is not a sweep name"):
        check_sweep_name(name, "--name")


def test_a_sweep_file_named_outside_the_storage_root_is_refused():
    with pytest.raises(SpaceError, match=r"sweep.yaml: name: '\.\./up' is not a sweep name"):
        space("name: ../up\n")


def test_optuna_asha_and_pbt_sweeps_build_their_tune_objects():
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    from ray.tune.search import Repeater

    from orchestrator.launch import make_scheduler
    from orchestrator.search import tune_search

    optuna = space("""
space:
  has.mixture: {sampled_weights: [0, 8, 16]}
  has.fill: {choice: [zero, blur]}
seeds: [0, 1]
search: {algorithm: optuna, num_samples: 5}
scheduler: {name: asha, grace_period: 2}
""")
    param_space, searcher, samples = tune_search(optuna)
    assert isinstance(searcher, Repeater) and samples == 10  # 5 proposals x 2 seeds
    assert set(param_space["trial"]) == {"has.mixture.w0", "has.mixture.w8", "has.mixture.w16", "has.fill"}
    assert isinstance(make_scheduler(optuna), ASHAScheduler)
    pbt = space("""
space:
  optim.lr: {loguniform: [0.01, 0.5]}
search: {algorithm: random, num_samples: 4}
scheduler: {name: pbt, perturbation_interval: 2}
""")
    param_space, searcher, samples = tune_search(pbt)
    assert searcher is None and samples == 1 and len(param_space["grid"]["grid_search"]) == 4
    assert isinstance(make_scheduler(pbt), PopulationBasedTraining)


@pytest.mark.parametrize("search", ["{algorithm: optuna, num_samples: 3}", "{algorithm: random, num_samples: 2}"])
def test_the_progress_table_shows_keys_every_trial_has(search):
    from ray._private.dict import unflattened_lookup

    from orchestrator.launch import progress_reporter
    from orchestrator.search import tune_search

    spec = space(f"""
space:
  has.mixture: {{sampled_weights: [0, 16]}}
  has.fill: {{choice: [zero, blur]}}
  model.backbone: {{grid: [tiny_cnn]}}
search: {search}
""")
    param_space, _, _ = tune_search(spec)
    if "trial" in param_space:  # optuna: one sample of each domain
        params = {"trial": {key: (d.sample() if hasattr(d, "sample") else d) for key, d in param_space["trial"].items()}}
    else:
        params = {"grid": param_space["grid"]["grid_search"][0]}
    columns = progress_reporter(spec)._parameter_columns
    assert {unflattened_lookup(column, params) is not None for column in columns} == {True}
    assert {column.split("/", 1)[1] for column in columns} >= {"has.mixture.w0", "has.mixture.w16", "has.fill"}


def test_reuse_workers_is_read_and_checked():
    from orchestrator.spaces import SpaceError, parse_space

    text = "name: r\nspace: {has.fill: {grid: [zero]}}\n"
    assert parse_space(text).fields.reuse_workers is True
    assert parse_space(text + "reuse_workers: false\n").fields.reuse_workers is False
    with pytest.raises(SpaceError, match="reuse_workers"):
        parse_space(text + "reuse_workers: maybe\n")


def test_the_baseline_of_the_paired_differences_is_read_and_checked():
    from orchestrator.spaces import SpaceError, parse_space

    text = "name: r\nspace: {has.fill: {grid: [zero]}}\n"
    assert parse_space(text).fields.baseline == "has.mixture=none"
    assert parse_space(text + "baseline: has.mixture=24,has.fill=zero\n").fields.baseline == "has.mixture=24,has.fill=zero"
    with pytest.raises(SpaceError, match=r"<sweep>: baseline: 'has.fill' is not KEY=VALUE"):
        parse_space(text + "baseline: has.mixture=24,has.fill\n")
    with pytest.raises(SpaceError, match=r"<sweep>: baseline: .*has.mixtur"):
        parse_space(text + "baseline: has.mixtur=none\n")
