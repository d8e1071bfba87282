"""Specification of one training run: hiding in the loop, checkpoints, exact resume, artifacts, DDP."""
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.checkpoint import list_checkpoints
from trainers.config import RunConfig
from trainers.cam import class_activation_maps
from trainers.engine import Hook, OutputDirInUse, Trainer
from trainers.evaluator import LocalizationEvaluator

TIMING = ("train/epoch_seconds", "train/images_per_second")


def tiny(output_dir, *overrides) -> RunConfig:
    """A run of a few seconds: a small synthetic set, 3 epochs."""
    return RunConfig.from_dict({}, [
        f"output_dir={output_dir}", "data.synthetic.train_size=192", "data.synthetic.val_size=48",
        "data.synthetic.test_size=40", "data.batch_size=64", "optim.epochs=3",
        "eval.test_interval=0.01", "progress=false", *overrides])


def without_timing(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING}


class CrashAfter(Hook):
    def __init__(self, epochs):
        self.epochs = epochs

    def after_epoch(self, trainer, report):
        if report.epoch == self.epochs:
            raise RuntimeError("simulated crash")


def test_resume_gives_bit_identical_weights_and_metrics(tmp_path):
    overrides = ("has.mixture=mixed:0,8,16", "has.fill=gaussian_noise")  # hiding draws random numbers
    straight = Trainer(tiny(tmp_path / "a", *overrides))
    final = straight.fit()
    crashed = Trainer(tiny(tmp_path / "b", *overrides), hooks=[CrashAfter(2)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    resumed = Trainer(tiny(tmp_path / "b", *overrides))
    resumed_final = resumed.fit(resume_from=tmp_path / "b" / "checkpoints" / "epoch_0002")
    for name, tensor in straight.net.state_dict().items():
        assert torch.equal(tensor, resumed.net.state_dict()[name]), name
    assert without_timing(resumed_final) == without_timing(final)


class RecordOptimizer(Hook):
    def __init__(self):
        self.seen = {}  # epoch -> {(lr, weight decay) of the first group}

    def after_step(self, trainer, info):
        if info.step < info.steps - 1:  # after the epoch's last step the scheduler already set the next rate
            group = trainer.optimizer.param_groups[0]
            self.seen.setdefault(info.epoch, set()).add((round(group["lr"], 12), group["weight_decay"]))


def test_each_epoch_trains_with_its_stages_rate_and_weight_decay_also_after_a_resume(tmp_path):
    staged = ("optim.schedule=multistep", "optim.warmup_fraction=0", "optim.lr=0.2", "optim.weight_decay=1e-4",
              "optim.milestones=[1, 2]", "optim.lr_factors=[1, 0.5, 0.25]", "optim.weight_decay_factors=[1, 0, 2]")
    straight = RecordOptimizer()
    Trainer(tiny(tmp_path / "a", *staged), hooks=[straight]).fit()
    assert straight.seen == {0: {(0.2, 1e-4)}, 1: {(0.1, 0.0)}, 2: {(0.05, 2e-4)}}
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(tiny(tmp_path / "b", *staged), hooks=[CrashAfter(2)]).fit()
    resumed = RecordOptimizer()
    last = tmp_path / "b" / "checkpoints" / "epoch_0002"
    Trainer(tiny(tmp_path / "b", *staged), hooks=[resumed]).fit(resume_from=last)
    assert resumed.seen == {2: {(0.05, 2e-4)}}


def test_resuming_another_config_is_refused_and_changes_nothing(tmp_path):
    Trainer(tiny(tmp_path, "optim.epochs=1")).fit()
    folder = tmp_path / "checkpoints" / "epoch_0001"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with pytest.raises(ValueError) as error:
        Trainer(tiny(tmp_path, "optim.epochs=1", "optim.lr=0.3", "has.mixture=8")).fit(resume_from=folder)
    assert "this checkpoint is of a different config" in str(error.value)
    assert "has.mixture: checkpoint 'none', now '8'" in str(error.value)
    assert "optim.lr: checkpoint 0.2, now 0.3" in str(error.value)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_a_second_run_in_the_same_output_dir_is_refused(tmp_path):
    Trainer(tiny(tmp_path, "optim.epochs=1")).fit()
    with pytest.raises(OutputDirInUse, match="already holds a run .* nothing was overwritten"):
        Trainer(tiny(tmp_path, "optim.epochs=1")).fit()


def test_every_epoch_leaves_a_checkpoint_with_metrics_and_artifacts(tmp_path):
    Trainer(tiny(tmp_path, "keep_checkpoints=2")).fit()
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["epoch_0002", "epoch_0003"]  # the oldest was dropped
    last = kept[-1]
    assert {p.name for p in (last / "artifacts").iterdir()} == {
        f"{split}_{kind}" for split in ("val", "test")
        for kind in ("cam_overlay.png", "box_accuracy.png", "predictions.parquet")}
    table = pq.read_table(last / "artifacts" / "test_predictions.parquet")
    assert table.num_rows == 40
    assert {"image_id", "target", "prediction", "cls_correct", "fixed_iou", "best_iou", "correct_iou50",
            "split", "epoch"} <= set(table.column_names)
    metrics = json.loads((last / "metrics.json").read_text())
    assert metrics["epoch"] == 3.0 and "test/maxboxacc_v2" in metrics and "val/pxap" in metrics
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines() if (tmp_path / "metrics.jsonl").exists() else []
    assert lines == []  # the metrics log is a hook of the CLI, not of the bare Trainer


class Inputs(Hook):
    """Records what the network sees in training and in evaluation."""

    def __init__(self):
        self.train, self.eval = [], []

    def before_train(self, trainer):
        first_stage = getattr(trainer.net, trainer.net.stage_names[0])  # runs in training and in evaluation
        first_stage.register_forward_pre_hook(
            lambda module, args: (self.train if module.training else self.eval).append(args[0].detach().clone()))


def test_hiding_happens_on_the_normalised_batch_in_training_only(tmp_path):
    recorder = Inputs()
    trainer = Trainer(tiny(tmp_path, "optim.epochs=1", "has.mixture=8", "has.p_hide=1.0"), hooks=[recorder])
    trainer.fit()
    # Every patch hidden with the dataset mean, which is 0 after normalising with the dataset's stats.
    assert all(torch.equal(batch, torch.zeros_like(batch)) for batch in recorder.train)
    first = next(trainer.data.val.batches(torch.arange(48), 64, train=False, epoch=0, seed=0))
    assert torch.equal(recorder.eval[0], trainer.normalize(first.images))


def _ddp_evaluate(rank, world, init_file, output_dir, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = Trainer(tiny(output_dir, "optim.epochs=1"))
        trainer.load(output_dir / "checkpoints" / "epoch_0001")
        metrics = trainer.evaluate("test", 0.01)
        (results / f"rank{rank}.json").write_text(json.dumps(metrics))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (seen once: SIGABRT)
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_report_the_numbers_of_one_process(tmp_path):
    single = Trainer(tiny(tmp_path, "optim.epochs=1"))
    single.fit()
    expected = single.evaluate("test", 0.01)
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_ddp_evaluate, args=(2, tmp_path / "init", tmp_path, results), nprocs=2, join=True)
    for rank in range(2):
        assert json.loads((results / f"rank{rank}.json").read_text()) == expected


def _ddp_train(rank, world, init_file, output_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        Trainer(tiny(output_dir, "optim.epochs=1")).fit()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_training_shards_the_data_and_rank_zero_checkpoints(tmp_path):
    mp.spawn(_ddp_train, args=(2, tmp_path / "init", tmp_path / "run"), nprocs=2, join=True)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["epoch_0001"]
    trainer = Trainer(tiny(tmp_path / "run", "optim.epochs=1"))
    assert len(trainer._train_indices(0)) == 192  # one process sees all; each of 2 ranks saw 96


def test_cli_runs_one_experiment_and_refuses_bad_keys(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    bad = subprocess.run([sys.executable, "-m", "trainers", "optim.lrr=0.1"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: optim.lrr: unknown key; did you mean optim.lr? allowed keys here: name, lr, "
                                  "momentum, weight_decay, nesterov, epochs, schedule, warmup_fraction, step_epochs, "
                                  "gamma, milestones, lr_factors, weight_decay_factors, label_smoothing")
    args = [f"output_dir={tmp_path}", "data.synthetic.train_size=128", "data.synthetic.val_size=32",
            "data.synthetic.test_size=32", "optim.epochs=1", "eval.test_interval=0.01"]
    run = subprocess.run([sys.executable, "-m", "trainers", *args], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "test/maxboxacc_v2" in run.stdout and "epoch 1/1" in run.stderr
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)])
def test_amp_auto_on_cpu_is_bf16_only_with_bf16_instructions(tmp_path, monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert Trainer(tiny(tmp_path / "auto", "device=cpu")).amp_dtype == expected
    assert Trainer(tiny(tmp_path / "off", "device=cpu", "amp=off")).amp_dtype is None
    assert Trainer(tiny(tmp_path / "bf16", "device=cpu", "amp=bf16")).amp_dtype == torch.bfloat16


def test_evaluation_cams_are_float32_even_when_training_autocasts_to_bf16(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path, "device=cpu", "amp=bf16"))
    with torch.no_grad(), trainer._autocast():  # what the training step runs under: bf16 features
        images = next(trainer.data.val.batches(torch.arange(4), 4, train=False, epoch=0, seed=0)).images
        assert trainer.net.forward_features(trainer.normalize(images)).dtype == torch.bfloat16
    received = []
    update = LocalizationEvaluator.update

    def record(self, cams, logits, *args, **kwargs):
        received.append((cams.clone(), logits.clone()))
        return update(self, cams, logits, *args, **kwargs)

    monkeypatch.setattr(LocalizationEvaluator, "update", record)
    trainer.evaluate("val", 0.01)
    source, side = trainer.data.val, trainer.data.input_size
    batches = source.batches(torch.arange(len(source)), trainer.rank_batch_size, train=False, epoch=0, seed=0)
    pairs = list(zip(received, batches, strict=True))
    assert pairs
    for (cams, logits), batch in pairs:
        with torch.no_grad():  # a plain float32 forward
            features = trainer.net.forward_features(trainer.normalize(batch.images))
            expected = class_activation_maps(features, trainer.net.classifier.weight, batch.labels, (side, side))
            assert torch.equal(cams, expected) and torch.equal(logits, trainer.net.forward_head(features))


def test_resuming_a_finished_run_elsewhere_returns_its_final_metrics(tmp_path):
    """What population-based training does with a trial whose donor finished: nothing left to train, the
    metrics are the checkpoint's, also when this run's own output_dir is empty."""
    metrics = Trainer(tiny(tmp_path / "a", "optim.epochs=1")).fit()
    last = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    again = Trainer(tiny(tmp_path / "b", "optim.epochs=1")).fit(resume_from=last)
    assert again == json.loads((last / "metrics.json").read_text()) == metrics
