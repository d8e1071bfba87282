"""Batches of a folder split: the same whatever the worker count, epoch after epoch, with the
training workers kept from one epoch to the next."""
import numpy as np
import pytest
import torch

from test_image_cache import PHOTOS, small_dataset
from trainers.datasets.cache import ImageCache
from trainers.datasets.check import check_dataset
from trainers.datasets.sources import FolderDataset, FolderSource

pytestmark = pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"{PHOTOS}: the team's real photos are not here")


def sources(root, workers: int, cache):
    report = check_dataset(root, root / "metadata", decode=False)
    return {split: FolderSource(split, FolderDataset(root, report.records(split), train=split == "train", resize=64,
                                                     crop=48, seed=3, cache=cache), workers, pin_memory=False)
            for split in ("train", "val")}


def passes(source, train: bool, epochs=(0, 1, 2)):
    out = []
    for epoch in epochs:
        indices = torch.tensor([1, 0]) if epoch % 2 else torch.tensor([0, 1])  # the order changes per epoch
        out.append([(b.images.clone(), b.labels, b.indices, b.boxes)
                    for b in source.batches(indices, 1, train=train, epoch=epoch, seed=3)])
    return out


@pytest.mark.parametrize("cached", [False, True])
def test_batches_are_the_same_with_workers_and_without_epoch_after_epoch(tmp_path, cached):
    root = small_dataset(tmp_path / "data")
    cache = ImageCache(tmp_path / "cache") if cached else None
    alone, pooled = sources(root, 0, cache), sources(root, 2, cache)
    for split in ("train", "val"):
        expected, found = passes(alone[split], split == "train"), passes(pooled[split], split == "train")
        for epoch_expected, epoch_found in zip(expected, found):
            for (image, label, index, boxes), (image2, label2, index2, boxes2) in zip(epoch_expected, epoch_found):
                assert torch.equal(image, image2) and torch.equal(label, label2) and torch.equal(index, index2)
                assert all(np.array_equal(a, b) for a, b in zip(boxes, boxes2))
    train = passes(alone["train"], True, epochs=(0, 2))  # the same order, other epochs: other crops or flips
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(train[0], train[1]))


def test_training_workers_live_from_one_epoch_to_the_next(tmp_path):
    source = sources(small_dataset(tmp_path / "data"), 2, None)["train"]
    pids = []
    for epoch in range(3):
        batches = source.batches(torch.tensor([0, 1]), 1, train=True, epoch=epoch, seed=3)
        assert len(list(batches)) == 2
        pids.append(sorted(worker.pid for worker in source._train_loader._iterator._workers))
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]
