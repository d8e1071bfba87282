"""Specification of the trials' run names and dataset inputs in MLflow."""
import hashlib

from orchestrator.dataset_input import metadata_digest, trial_dataset
from orchestrator.run_names import run_name, short_names

CONFIG = {"model.backbone": "resnet50_cam", "has.mixture": "mixed:0,16,32", "has.fill": "dataset_mean",
          "has.p_hide": 0.5, "optim.lr": 0.000316227766, "optim.weight_decay": 1e-4, "data.crop_size": 224,
          "eval.crop_size": 224, "seed": 2}


def test_run_names_carry_every_searched_key_shortened():
    assert run_name(CONFIG, ["has.mixture", "optim.lr", "optim.weight_decay"]) == \
        "resnet50_cam | mixed:0,16,32 | dataset_mean | p 0.5 | lr 0.000316 | weight_decay 0.0001 | seed 2"
    # keys whose last parts collide keep one more part; seed and the variant keys are not repeated
    assert run_name(CONFIG, ["data.crop_size", "eval.crop_size", "seed", "has.fill"]) == \
        "resnet50_cam | mixed:0,16,32 | dataset_mean | p 0.5 | data.crop_size 224 | eval.crop_size 224 | seed 2"
    # without hiding, fill and p_hide mean nothing
    assert run_name({**CONFIG, "has.mixture": "none"}, ["optim.lr"]) == "resnet50_cam | none | lr 0.000316 | seed 2"
    assert len(run_name(CONFIG, [f"k{i}.x{i}" for i in range(100)] + ["optim.lr"])) <= 250


def test_short_names():
    assert short_names(["a.b.c", "x.b.c", "y.z", "optim.lr"]) == {"a.b.c": "a.b.c", "x.b.c": "x.b.c", "y.z": "z",
                                                                   "optim.lr": "lr"}


def test_dataset_digests(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "image_ids.txt").write_bytes(b"a.jpg\n")
    (tmp_path / "class_labels.txt").write_bytes(b"a.jpg,0\n")
    expected = hashlib.sha256(b"class_labels.txt\0a.jpg,0\n\0train/image_ids.txt\0a.jpg\n\0").hexdigest()[:12]
    assert metadata_digest(tmp_path) == expected
    (tmp_path / "train" / "image_ids.txt").write_bytes(b"b.jpg\n")  # another version of the data
    assert metadata_digest(tmp_path) != expected
    folder = {"name": "voc", "root": "/data/voc", "metadata": None}
    assert trial_dataset(folder, {"root": "/data/voc", "digest": "0123456789ab"}) == \
        {"name": "voc", "source": "/data/voc", "digest": "0123456789ab"}
    other = trial_dataset({**folder, "root": "/data/voc2"}, {"root": "/data/voc", "digest": "0123456789ab"})
    assert other["digest"] != "0123456789ab" and other["source"] == "/data/voc2"
    synthetic = trial_dataset({"name": "synthetic", "synthetic": {"train_size": 10}})
    assert synthetic == {"name": "synthetic", "source": "trainers.datasets.synthetic",
                         "digest": hashlib.sha256(b'{"train_size": 10}').hexdigest()[:12]}
