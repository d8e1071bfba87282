"""The image cache: every pixel as the full decode + resize + crop + flip, kept across processes,
safe under parallel writers, crashes and full disks."""
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.datasets import cache as cache_module
from trainers.datasets import decode
from trainers.datasets.cache import HEADER, ImageCache, cache_folder
from trainers.datasets.decode import decode_rgb
from trainers.datasets.metadata import ImageRecord
from trainers.datasets.sources import FolderDataset
from trainers.datasets.transforms import apply_geometry, eval_geometry, resize_image, sample_seed, train_geometry

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT.parent / "shared/data/voc-animals"
pytestmark = pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"{PHOTOS}: the team's real photos are not here")
GREY = "raccoon-images/raccoon-150.jpg"


def photos(count: int = 6) -> list[Path]:
    """Photos of several sizes, one of them greyscale."""
    chosen = sorted(PHOTOS.glob("*-images/*.jpg"))[3:3 + count - 1]
    return [*chosen, PHOTOS / GREY]


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.img"))


@pytest.mark.parametrize("mode", ["square", "shorter_side"])
def test_train_crops_are_the_full_decode_resized_cropped_and_flipped_on_the_first_and_later_reads(tmp_path, mode):
    cache = ImageCache(tmp_path / "cache")
    for attempt in range(2):  # 0: decoded and written, 1: read back
        for index, path in enumerate(photos()):
            pixels, width, height = cache.resized(path, 256, mode)
            image = decode_rgb(path)
            assert (width, height) == (image.shape[2], image.shape[1])
            for flip_seed in range(3):  # offsets and flips drawn as the dataset draws them
                geometry = train_geometry(width, height, 256, 224, torch.Generator().manual_seed(index * 7 + flip_seed), mode)
                crop = cache_module.crop_and_flip(pixels, geometry.offset_x, geometry.offset_y, 224, geometry.flip)
                assert torch.equal(crop, apply_geometry(image, geometry)), (path, geometry)
        assert (cache.misses, cache.hits) == (6, 6 * attempt)
    assert len(entries(tmp_path / "cache")) == 6


def test_eval_images_are_the_full_decode_resized_to_the_input(tmp_path):
    cache = ImageCache(tmp_path)
    for path in photos():
        for _ in range(2):
            pixels, width, height = cache.resized(path, 224, "square")
            image = decode_rgb(path)
            assert torch.equal(torch.from_numpy(pixels), apply_geometry(image, eval_geometry(width, height, 224)))


def test_the_dataset_gives_the_same_samples_with_the_cache_as_the_full_decode_path(tmp_path):
    # Train: the same geometry (crop offsets, flips, mapped boxes) as without the cache, and the pixels
    # of decoding in full, resizing, cropping and flipping; eval: the very samples of the uncached path.
    paths = photos()
    records = [ImageRecord(str(p.relative_to(PHOTOS)), k % 2, None, ((10 + k, 12, 90, 100 + k),))
               for k, p in enumerate(paths)]
    for train in (True, False):
        plain = FolderDataset(PHOTOS, records, train=train, resize=256, crop=224, seed=5)
        cached = FolderDataset(PHOTOS, records, train=train, resize=256, crop=224, seed=5,
                               cache=ImageCache(tmp_path / "cache"))
        for epoch in (0, 1):
            plain.epoch = cached.epoch = epoch
            for index, path in enumerate(paths):
                a, b = plain[index], cached[index]
                assert np.array_equal(a["boxes"], b["boxes"]) and a["label"] == b["label"]
                if train:
                    generator = torch.Generator().manual_seed(sample_seed(5, epoch, index))
                    image = decode_rgb(path)
                    geometry = train_geometry(image.shape[2], image.shape[1], 256, 224, generator)
                    assert torch.equal(b["image"], apply_geometry(image, geometry))
                else:
                    assert torch.equal(a["image"], b["image"])


def test_another_process_reads_the_entries_without_decoding(tmp_path, monkeypatch):
    # A trial in another process on the same node: it finds what the first one wrote.
    script = ("import sys; from pathlib import Path; from trainers.datasets.cache import ImageCache\n"
              "cache = ImageCache(Path(sys.argv[1]))\n"
              "for p in sys.argv[2:]: cache.resized(Path(p), 256)\n"
              "print(cache.misses, cache.hits)")
    paths = [str(p) for p in photos()]
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), *paths], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert done.stdout.split() == ["6", "0"]
    expected = [resize_image(decode_rgb(Path(p)), 256, 256) for p in paths]

    def no_decoding(path):
        raise AssertionError(f"{path} decoded again")
    monkeypatch.setattr(decode, "decode_rgb", no_decoding)
    cache = ImageCache(tmp_path)
    for path, image in zip(paths, expected):
        assert torch.equal(torch.from_numpy(cache.resized(Path(path), 256)[0]), image)
    assert (cache.misses, cache.hits) == (0, 6)


def test_a_changed_file_is_a_new_entry(tmp_path):
    path = tmp_path / "photo.jpg"
    first, second = photos()[:2]
    path.write_bytes(first.read_bytes())
    cache = ImageCache(tmp_path / "cache")
    cache.resized(path, 64)
    path.write_bytes(second.read_bytes())
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    pixels, width, height = cache.resized(path, 64)
    assert (width, height) == Image.open(second).size and cache.misses == 2
    assert torch.equal(torch.from_numpy(pixels), apply_geometry(decode_rgb(second), eval_geometry(width, height, 64)))


def test_the_resize_is_part_of_the_key(tmp_path):
    cache = ImageCache(tmp_path)
    path = photos()[0]
    shapes = [cache.resized(path, side, mode)[0].shape for side, mode in [(64, "square"), (48, "square"), (48, "shorter_side")]]
    width, height = Image.open(path).size
    assert shapes == [(3, 64, 64), (3, 48, 48), (3, 48, int(48 * width / height)) if width > height
                      else (3, int(48 * height / width), 48)]
    assert cache.misses == 3 and len(entries(tmp_path)) == 3


def test_a_truncated_or_foreign_entry_is_decoded_again_and_rewritten(tmp_path):
    # Cut short, zeros, a stub, and one of the right length whose magic is wrong.
    cache = ImageCache(tmp_path)
    path = photos()[0]
    expected, _, _ = cache.resized(path, 64)
    (entry,) = entries(tmp_path)
    whole = entry.read_bytes()
    for broken in (whole[:HEADER + 100], b"\0" * len(whole), whole[:10], bytes([whole[0] ^ 0xFF]) + whole[1:]):
        entry.write_bytes(broken)
        again = ImageCache(tmp_path)
        assert np.array_equal(again.resized(path, 64)[0], expected) and again.misses == 1
        assert entry.read_bytes() == whole
    assert whole[:4] == np.array([cache_module.MAGIC], dtype="<u4").tobytes()


def test_parallel_writers_leave_whole_entries_and_no_temporaries(tmp_path):
    paths = [str(p) for p in sorted(PHOTOS.glob("*-images/*.jpg"))[:24]]
    with multiprocessing.get_context("fork").Pool(4) as pool:  # four writers of the same entries at once
        pool.starmap(_fill, [(str(tmp_path), paths)] * 4)
    assert len(entries(tmp_path)) == 24
    assert list(tmp_path.rglob(".*")) == []  # temporaries all renamed
    assert (tmp_path / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    cache = ImageCache(tmp_path)
    for path in paths:
        pixels, width, height = cache.resized(Path(path), 48)
        assert torch.equal(torch.from_numpy(pixels), apply_geometry(decode_rgb(Path(path)), eval_geometry(width, height, 48)))
    assert cache.misses == 0


def _fill(folder: str, paths: list[str]) -> None:
    cache = ImageCache(Path(folder))
    for path in paths:
        cache.resized(Path(path), 48)


def test_writing_stops_before_the_disk_fills_and_the_pixels_stay_the_same(tmp_path, capfd):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    cache = ImageCache(tmp_path, reserve=free)  # the first entry would go below the reserve
    path = photos()[0]
    for _ in range(3):
        pixels, width, height = cache.resized(path, 64)
        assert torch.equal(torch.from_numpy(pixels), apply_geometry(decode_rgb(path), eval_geometry(width, height, 64)))
    assert entries(tmp_path) == [] and not cache.writing and cache.misses == 3
    assert capfd.readouterr().err.count(f"image cache {tmp_path}: less than") == 1


def test_an_unwritable_folder_decodes_each_time_and_says_so_once(tmp_path, capfd):
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    cache = ImageCache(blocked / "cache")
    path = photos()[0]
    assert np.array_equal(cache.resized(path, 64)[0], cache.resized(path, 64)[0])
    assert cache.misses == 2 and not cache.writing
    assert capfd.readouterr().err.count(f"image cache {blocked / 'cache'}: cannot write there") == 1


def test_a_missing_file_names_itself(tmp_path):
    with pytest.raises(RuntimeError, match="nope.jpg: cannot decode the image"):
        ImageCache(tmp_path).resized(tmp_path / "nope.jpg", 64)


def test_the_folder_is_the_configured_one_else_the_environments_else_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NODE_DISK", "/nvme")
    monkeypatch.setenv("HAS_SWEEP_CACHE", "/scratch/images")
    assert cache_folder("$NODE_DISK/cache") == Path("/nvme/cache")
    assert cache_folder(None) == Path("/scratch/images")
    monkeypatch.delenv("HAS_SWEEP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert cache_folder(None) == Path("/xdg/has-sweep/images")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_folder(None) == tmp_path / "home/.cache/has-sweep/images"


def test_a_file_replaced_with_its_old_size_and_mtime_is_a_new_entry(tmp_path):
    # cp -p, rsync -a and tar keep the modification time: the inode and change time still differ.
    first, second = [p for p in sorted(PHOTOS.glob("*-images/*.jpg")) if p.stat().st_size > 20_000][:2]
    path = tmp_path / "photo.jpg"
    path.write_bytes(first.read_bytes()[:20_000])
    cache = ImageCache(tmp_path / "cache")
    stat = path.stat()
    replacement = tmp_path / "new.jpg"
    replacement.write_bytes(second.read_bytes()[:20_000])  # the same size
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    key_before = cache._entry(path, stat, 64, "square")
    os.replace(replacement, path)
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert cache._entry(path, path.stat(), 64, "square") != key_before


def test_a_symlinked_or_relative_path_finds_the_same_entry(tmp_path, monkeypatch):
    link = tmp_path / "data"
    link.symlink_to(PHOTOS)
    path = photos()[0]
    cache = ImageCache(tmp_path / "cache")
    cache.resized(path, 64)
    monkeypatch.chdir(PHOTOS.parent)
    cache.resized(link / path.relative_to(PHOTOS), 64)
    cache.resized(Path(PHOTOS.name) / path.relative_to(PHOTOS), 64)
    assert (cache.misses, cache.hits) == (1, 2) and len(entries(tmp_path / "cache")) == 1


def test_another_decoder_or_torchvision_is_a_miss(tmp_path, monkeypatch):
    path = photos()[0]
    ImageCache(tmp_path).resized(path, 64)
    monkeypatch.setattr(decode, "decoder_name", lambda: "pillow 99 libjpeg-turbo 9")
    cache = ImageCache(tmp_path)
    cache.resized(path, 64)
    assert cache.misses == 1 and len(entries(tmp_path)) == 2


class _Disk:
    """os.statvfs's answer for a disk of `total` bytes with `free` left (4 KiB blocks)."""

    def __init__(self, total: int, free: int) -> None:
        self.f_frsize, self.f_blocks, self.f_bavail = 4096, total // 4096, free // 4096


def test_the_reserve_is_10_percent_of_the_disk_or_2_gib_counting_the_entry(tmp_path, monkeypatch):
    path = photos()[0]
    entry = HEADER + 3 * 64 * 64
    for total, reserve in [(100 << 30, 10 << 30), (10 << 30, 2 << 30)]:  # 10% of 100 GiB; 2 GiB of 10 GiB
        enough = -(-(reserve + entry) // 4096) * 4096  # in whole blocks
        for free, kept in [(enough, True), (enough - 4096, False)]:
            folder = tmp_path / f"{total}-{free}"
            monkeypatch.setattr(cache_module.os, "statvfs", lambda _, disk=_Disk(total, free): disk)
            cache = ImageCache(folder)
            cache.resized(path, 64)
            assert (len(entries(folder)) == 1) == kept and cache.writing == kept, (total, free)


def test_a_failed_write_leaves_no_temporary(tmp_path, monkeypatch, capfd):
    def refuse(source, target):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache_module.os, "replace", refuse)
    cache = ImageCache(tmp_path)
    cache.resized(photos()[0], 64)
    assert list(tmp_path.rglob("*.img*")) == [] and not cache.writing
    assert "No space left on device" in capfd.readouterr().err


def test_a_16_bit_png_is_kept_once_with_pillows_8_bit_pixels(tmp_path):
    import cv2

    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 65535, (40, 50, 3)).astype(np.uint16))
    cache = ImageCache(tmp_path / "cache")
    for _ in range(2):
        pixels, width, height = cache.resized(path, 32)
    expected = apply_geometry(decode.decode_rgb_pillow(path), eval_geometry(width, height, 32))
    assert torch.equal(torch.from_numpy(pixels), expected) and (cache.misses, cache.hits) == (1, 1)


def test_the_dataset_crops_shorter_side_images_from_the_cache(tmp_path):
    paths = photos()
    records = [ImageRecord(str(p.relative_to(PHOTOS)), 0, None, ((5, 6, 70, 80),)) for p in paths]
    cached = FolderDataset(PHOTOS, records, train=True, resize=80, crop=64, seed=2, resize_mode="shorter_side",
                           cache=ImageCache(tmp_path))
    for index, path in enumerate(paths):
        sample = cached[index]
        image = decode_rgb(path)
        geometry = train_geometry(image.shape[2], image.shape[1], 80, 64,
                                  torch.Generator().manual_seed(sample_seed(2, 0, index)), "shorter_side")
        assert torch.equal(sample["image"], apply_geometry(image, geometry))
        assert np.array_equal(sample["boxes"], geometry.map_boxes(np.array([(5, 6, 70, 80)])))


def test_stale_temporaries_are_removed_fresh_ones_kept(tmp_path):
    old, fresh = tmp_path / "ab" / ".abcd.img.12.ff", tmp_path / "ab" / ".abce.img.13.ee"
    old.parent.mkdir()
    old.write_bytes(b"half"), fresh.write_bytes(b"half")
    os.utime(old, (1, 1))
    assert cache_module.remove_stale_temporaries(tmp_path) == 1 and not old.exists() and fresh.exists()


# ---------------------------------------------------------------- python -m trainers.datasets cache


def small_dataset(root: Path) -> Path:
    """Two voc-animals photos per split in the wsolevaluation layout, with their sizes and a box."""
    from test_dataset_metadata import split_files

    chosen = sorted(PHOTOS.glob("*-images/*.jpg"))
    for number, split in enumerate(("train", "val", "test")):
        rows = []
        for label, photo in enumerate(chosen[2 * number:2 * number + 2]):
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / split / photo.name).write_bytes(photo.read_bytes())
            width, height = Image.open(photo).size
            rows.append((f"{split}/{photo.name}", label, (width, height), [(1, 1, width - 2, height - 2)]))
        split_files(root / "metadata", split, rows)
    return root


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainers.datasets", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_the_cache_command_fills_what_training_reads_and_only_once(tmp_path, monkeypatch):
    root, folder = small_dataset(tmp_path / "data"), tmp_path / "node cache"
    args = ("cache", str(root), "--cache-dir", str(folder), "--resize-size", "64", "--crop-size", "48",
            "--workers", "1")  # one process: the pool is check.py's, tested there
    size = (2 * (HEADER + 3 * 64 * 64) + 4 * (HEADER + 3 * 48 * 48)) / 2**20  # train at 64, val and test at 48
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == (f"image cache {folder}: 6 images of train, val, test: 6 decoded and kept, 0 already "
                            f"there, 0 not kept, 0 failed; {size:.1f} MiB for this dataset\n")
    assert "caching 6/6" in first.stderr and len(entries(folder)) == 6
    again = cli(*args)
    assert again.returncode == 0 and "0 decoded and kept, 6 already there, 0 not kept, 0 failed" in again.stdout

    def no_decoding(path):
        raise AssertionError(f"{path} decoded again")
    monkeypatch.setattr(decode, "decode_rgb", no_decoding)
    from trainers.datasets.check import check_dataset

    report, cache = check_dataset(root, root / "metadata", decode=False), ImageCache(folder)
    for split in ("train", "val", "test"):
        dataset = FolderDataset(root, report.records(split), train=split == "train", resize=64, crop=48, seed=0,
                                cache=cache)
        assert [dataset[k]["image"].shape for k in range(2)] == [(3, 48, 48)] * 2
    assert (cache.misses, cache.hits) == (0, 6)


def test_the_cache_command_says_what_it_could_not_keep_and_fails(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(cache_module, "MIN_RESERVE", 1 << 60)  # no disk is that large: nothing fits
    jobs = [(str(p), 48, "square") for p in photos()]
    results = cache_module.fill_cache(tmp_path, jobs, workers=1)
    assert sorted(kind for kind, _ in results.values()) == ["not kept"] * 6 and entries(tmp_path) == []
    assert capfd.readouterr().err.count("image cache") == 1  # said once, the rest skipped
    blocked = tmp_path / "a file"
    blocked.write_text("")
    result = cli("cache", str(small_dataset(tmp_path / "data")), "--cache-dir", str(blocked / "cache"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert f"--cache-dir: cannot write the image cache at {blocked / 'cache'}" in result.stderr


def test_the_cache_commands_defaults_are_the_runs():
    from trainers.config import DataConfig
    from trainers.datasets.__main__ import _parser

    args = _parser().parse_args(["cache", "root"])
    assert (args.resize_size, args.resize, args.crop_size) == (DataConfig.resize_size, DataConfig.resize,
                                                               DataConfig.crop_size)


@pytest.mark.parametrize("args, says", [
    (["cache", "/nonexistent/root"], "ROOT: /nonexistent/root is not a folder"),
    (["cache", "{root}", "--crop-size", "300"], "--crop-size 300 / --resize-size 256: need 8 <= crop size <= resize size"),
    (["cache", "{root}", "--workers", "0"], "--workers: 0 is not allowed"),
    (["cache", "{root}", "--splits", "train,dev"], "--splits: 'train,dev' is not allowed"),
    (["cache", "{root}", "--resize", "long_side"], "argument --resize: invalid choice: 'long_side'"),
])
def test_the_cache_commands_bad_arguments_exit_2_with_one_line(tmp_path, args, says):
    small_dataset(tmp_path)
    result = cli(*[a.format(root=tmp_path) for a in args])
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and says in result.stderr, result.stderr
