"""Specification of evaluation without training (python -m trainers --eval-only): the numbers and files a
training run's own final evaluation gives, for a run, a checkpoint, a state_dict file or ImageNet weights."""
import dataclasses
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from trainers.backbones import build_backbone
from trainers.cam import class_activation_maps
from trainers.config import RunConfig
from trainers.engine import Trainer
from trainers.eval_only import EvalOnlyError, evaluate_weights
from trainers.evaluator import LocalizationEvaluator

TIMING = ("train/epoch_seconds", "train/images_per_second")


def tiny(output_dir, *overrides) -> RunConfig:
    return RunConfig.from_dict({}, [
        f"output_dir={output_dir}", "data.synthetic.train_size=128", "data.synthetic.val_size=32",
        "data.synthetic.test_size=40", "data.batch_size=32", "optim.epochs=2", "eval.test_interval=0.01",
        "has.mixture=16", "progress=false", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-epoch run: its folder and its final metrics."""
    folder = tmp_path_factory.mktemp("run")
    metrics = Trainer(tiny(folder)).fit()
    return folder, metrics


def evaluated(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}


def test_the_cli_on_a_run_gives_its_final_evaluation_and_never_overwrites(trained, tmp_path):
    folder, final = trained
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    # overrides on both sides of an option, as users type them
    command = [sys.executable, "-m", "trainers", "--eval-only", f"model.weights={folder}", "--splits", "val,test",
               "progress=false"]
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    out = folder / "eval" / "epoch_0002"  # the run's own config (no --config), its latest checkpoint
    metrics = json.loads((out / "metrics.json").read_text())
    assert evaluated(metrics) == evaluated(final) and metrics["epoch"] == 2.0
    last = folder / "checkpoints" / "epoch_0002" / "artifacts"
    for split in ("val", "test"):
        assert (pq.read_table(out / "artifacts" / f"{split}_predictions.parquet").to_pydict()
                == pq.read_table(last / f"{split}_predictions.parquet").to_pydict())
        assert (out / "artifacts" / f"{split}_cam_overlay.png").stat().st_size > 0
        assert (out / "artifacts" / f"{split}_box_accuracy.png").stat().st_size > 0
    assert json.loads((out / "weights.json").read_text())["kind"] == "checkpoint"
    assert "test/maxboxacc_v2" in run.stdout and "eval-only: test: 40 images" in run.stderr

    before = (out / "metrics.json").read_bytes()
    again = subprocess.run(command, capture_output=True, text=True, env=env)
    assert again.returncode == 2
    assert again.stderr.strip() == (f"error: {out} already holds an evaluation; nothing was overwritten: "
                                    "choose another --eval-dir or remove it")
    assert (out / "metrics.json").read_bytes() == before


def test_a_state_dict_file_evaluates_as_the_checkpoint_it_came_from(trained, tmp_path):
    folder, final = trained
    state = torch.load(folder / "checkpoints" / "epoch_0002" / "state.pt", weights_only=True)["model"]
    torch.save(state, tmp_path / "weights.pt")
    config = tiny(tmp_path / "out", f"model.weights={tmp_path / 'weights.pt'}")
    metrics, out = evaluate_weights(config, ["test"])
    assert out == tmp_path / "out" / "eval" / "weights"
    assert evaluated(metrics) == {k: v for k, v in evaluated(final).items() if k.startswith("test/")}
    assert sorted(p.name for p in (out / "artifacts").iterdir()) == [
        "test_box_accuracy.png", "test_cam_overlay.png", "test_predictions.parquet"]


def test_a_checkpoint_folder_brings_its_architecture(trained, tmp_path):
    folder, final = trained
    checkpoint = folder / "checkpoints" / "epoch_0002"
    # a config naming another backbone: the checkpoint's tiny_cnn is evaluated (its weights fit nothing else)
    config = tiny(tmp_path, f"model.weights={checkpoint}", "model.backbone=alexnet_gap")
    metrics, _ = evaluate_weights(config, ["val"], eval_dir=tmp_path / "e")
    assert evaluated(metrics) == {k: v for k, v in evaluated(final).items() if k.startswith("val/")}


def test_weights_without_a_head_for_the_data_are_refused_with_what_to_do(tmp_path):
    config = tiny(tmp_path, "model.backbone=efficientnet_lite0_cam", "model.weights=imagenet")
    with pytest.raises(EvalOnlyError) as error:
        evaluate_weights(config, ["test"])
    assert str(error.value) == (
        "model.weights: the head has 1000 classes, the dataset 6 (class 0, class 1, class 2, class 3, class 4 ...): "
        "its scores are not about the dataset's labels. Fine-tune first, or --cam-class predicted for the CAM of the "
        "head's top-1 class (box and mask metrics only)")
    assert not (tmp_path / "eval").exists()

    trunk_only = {k: v for k, v in build_backbone("tiny_cnn", 6).state_dict().items() if not k.startswith("classifier.")}
    torch.save(trunk_only, tmp_path / "trunk.pt")
    with pytest.raises(EvalOnlyError, match=r"trunk.pt has no classifier for backbone 'tiny_cnn'"):
        evaluate_weights(tiny(tmp_path, f"model.weights={tmp_path / 'trunk.pt'}"), ["test"])
    with pytest.raises(EvalOnlyError, match=r"--splits: 'train' is not allowed; allowed: a comma list of val, test"):
        evaluate_weights(tiny(tmp_path, "model.weights=imagenet"), ["train"])
    with pytest.raises(EvalOnlyError, match=r"model.weights: --eval-only needs weights to evaluate"):
        evaluate_weights(tiny(tmp_path), ["test"])


def test_predicted_class_cams_of_the_imagenet_head_are_the_reference_ones(tmp_path):
    """--cam-class predicted: each image's CAM is of the 1000-class head's top-1 class, computed here directly."""
    overrides = ("model.backbone=efficientnet_lite0_cam", "model.weights=imagenet", "data.synthetic.image_size=64",
                 "channels_last=false")
    metrics, out = evaluate_weights(tiny(tmp_path, *overrides), ["test"], cam_class="predicted")
    assert out == tmp_path / "eval" / "imagenet"

    config = tiny(tmp_path / "ref", *overrides)
    reference = Trainer(config.replace(model=dataclasses.replace(config.model, weights=None)))  # its data only
    net = build_backbone("efficientnet_lite0_cam", 1000, "imagenet").eval()
    evaluator = LocalizationEvaluator("test", interval=config.eval.test_interval, iou_thresholds=config.eval.iou_thresholds,
                                      loc_fraction=config.eval.loc_fraction)
    source = reference.data.test
    with torch.no_grad():
        for batch in source.batches(torch.arange(len(source)), 16, train=False, epoch=0, seed=0):
            images = (batch.images.float() - reference.mean) / reference.std
            features = net.forward_features(images)
            logits = net.forward_head(features)
            cams = class_activation_maps(features, net.classifier.weight, logits.argmax(1), (64, 64))
            evaluator.update(cams, logits, batch.labels, batch.boxes if source.has_boxes else None,
                             batch.masks if source.has_masks else None,
                             [source.image_ids[i] for i in batch.indices.tolist()])
    expected = {k: v for k, v in evaluator.compute().items() if not k.endswith(("/cls_top1", "/loc_top1"))}
    assert evaluated(metrics).keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    rows = pq.read_table(out / "artifacts" / "test_predictions.parquet").to_pydict()
    assert max(rows["prediction"]) >= 6  # ImageNet's classes, not the dataset's
