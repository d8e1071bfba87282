"""What the cluster can hold, counted before any trial starts (orchestrator.launch), and what Optuna
sees of a configuration's seeds (orchestrator.search.paired_score): exact values by hand."""
import math

import pytest

from orchestrator.launch import HEAD_RESOURCE, check_resources, possible_nodes
from orchestrator.search import paired_score
from orchestrator.spaces import SweepInputError, parse_space

HEAD = {"CPU": 0.0, HEAD_RESOURCE: 1.0, "memory": 1e10}
GPU_NODE = {"CPU": 48.0, "GPU": 4.0}


def sweep(resources: str, concurrent: int = 0):
    return parse_space(f"resources: {resources}\nmax_concurrent_trials: {concurrent}\n", "s.yaml")


def test_a_fixed_cluster_is_its_live_nodes():
    live = [HEAD, GPU_NODE, GPU_NODE]
    assert possible_nodes(live, None) == live


def test_live_workers_are_not_counted_again_beside_the_autoscalers_node_types():
    # ray up with min_workers 0..4: two workers are up. The cluster can have 4, not 2 + 4.
    live = [HEAD, GPU_NODE, GPU_NODE]
    nodes = possible_nodes(live, ([(GPU_NODE, 4)], None))
    assert nodes == [HEAD] + [GPU_NODE] * 4
    assert check_resources(sweep("{cpus: 8, gpus: 1}"), nodes) == 16  # 4 nodes x 4 GPUs, one trial each


def test_with_only_the_head_up_the_workers_it_may_start_count():
    nodes = possible_nodes([HEAD], ([(GPU_NODE, 4)], None))
    assert len(nodes) == 5 and check_resources(sweep("{cpus: 8, gpus: 1}"), nodes) == 16


def test_the_clusters_cap_on_workers_keeps_the_biggest_types():
    small = {"CPU": 8.0, "GPU": 1.0}
    nodes = possible_nodes([HEAD], ([(small, 3), (GPU_NODE, 2)], 3))
    assert nodes == [HEAD, GPU_NODE, GPU_NODE, small]


def test_a_multi_gpu_trial_needs_all_its_workers_on_one_node():
    # 4 workers of 1 GPU: a 4-GPU node holds one such trial; two 2-GPU nodes hold none (STRICT_PACK).
    four = sweep("{cpus: 8, gpus: 1, workers: 4}")
    assert check_resources(four, [HEAD, GPU_NODE, GPU_NODE]) == 2
    with pytest.raises(SweepInputError, match="a trial needs 4 workers of .* on one node, and no node fits them"):
        check_resources(four, [HEAD, {"CPU": 24.0, "GPU": 2.0}, {"CPU": 24.0, "GPU": 2.0}])


def test_ddp_trials_also_need_their_own_driver_cpu():
    # 2 workers x 0.5 CPU + 0.1 for the trial's driver: 1.1 CPU a trial; 2 nodes of 2 CPUs hold 3.
    assert check_resources(sweep("{cpus: 0.5, workers: 2}"), [HEAD, {"CPU": 2.0}, {"CPU": 2.0}]) == 3


def test_max_concurrent_trials_caps_what_fits():
    assert check_resources(sweep("{cpus: 8, gpus: 1}", concurrent=3), [HEAD, GPU_NODE]) == 3


def test_seeds_stopped_at_different_epochs_are_compared_at_the_deepest_common_epoch():
    # seed 0 stopped by ASHA after epoch 15 (validated every 5), seed 1 ran to 50
    stopped = {5: 10.0, 10: 20.0, 15: 30.0}
    full = {5: 12.0, 10: 22.0, 15: 40.0, 20: 60.0, 50: 90.0}
    assert paired_score([stopped, full]) == (30.0 + 40.0) / 2
    assert paired_score([full, full]) == 90.0


def test_a_seed_without_any_validated_epoch_gives_no_score():
    assert math.isnan(paired_score([{}, {5: 1.0}])) and math.isnan(paired_score([{4: 1.0}, {5: 1.0}]))
