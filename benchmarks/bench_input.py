"""Input pipeline speed, images per second on one core, on real JPEGs.

    python benchmarks/bench_input.py [--photos ../shared/data/voc-animals] [--count 120] [--repeats 3]

Two sets of photos: the voc-animals photos as they are (178x154 to 2000x1333, median 600x400) and
the same photos upscaled 2x and saved again as JPEG (quality 90; median 1200x800, the size of
today's camera datasets such as OpenImages). For each, one process with one torch thread (a
DataLoader worker's setting) runs, image by image:

- train, before: full decode (torchvision.io), resize the whole image (torchvision, antialiased),
  crop, flip: the pipeline up to this change;
- train, decode_train_crop: scaled DCT decode, only the crop resampled (`data.cache: false`; the
  default pipeline of 2026-12-04 to -06, "today's" of issue 12);
- train, cache: trainers.datasets.cache (the default since 2026-12-06): its first read of an image
  (full decode, resize, write the entry; a fresh cache folder each pass) and its later reads (every
  later epoch, and every other trial on the node: read the entry, crop, flip);
- eval: full decode, resize straight to the input size, and the same from the cache;
- floors: a bare full decode (torchvision.io) and a bare decode at the scale `draft` picks, the least
  a core must spend on each photo when it decodes it.

Then the training batches as the engine reads them (trainers.datasets.sources.FolderSource: a
DataLoader with one worker process, batches of 64) without and with the cache.

The geometry (crop offsets, flips, mapped boxes) of every train pipeline is checked identical; the
cache's train and eval images are checked equal to the full-decode pipelines' to the bit, and
decode_train_crop's largest pixel difference from them is printed. The cache's entries sit in the
page cache here (a node's disk: a few GB/s of reads, tens of thousands of entries a second).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainers.datasets.cache import ImageCache, crop_and_flip
from trainers.datasets.decode import decode_rgb, decode_train_crop
from trainers.datasets.transforms import apply_geometry, eval_geometry, train_geometry


def photos_of(root: Path, count: int) -> list[Path]:
    """The first `count` JPEGs under root that decode whole (the data check rejects the others too)."""
    paths = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")):
        try:
            with Image.open(path) as image:
                image.load()
        except OSError as error:
            print(f"skipped {path}: {error}")
            continue
        paths.append(path)
        if len(paths) == count:
            break
    if not paths:
        raise SystemExit(f"--photos {root}: no readable JPEG files under it")
    return paths


def upscaled(paths: list[Path], folder: Path, factor: int) -> list[Path]:
    out = []
    for path in paths:
        with Image.open(path) as image:
            big = image.convert("RGB").resize((image.width * factor, image.height * factor), Image.Resampling.BICUBIC)
        target = folder / path.name
        big.save(target, quality=90)
        out.append(target)
    return out


def geometry_drawer(index: int, resize: int, crop: int):
    def draw(width: int, height: int):
        return train_geometry(width, height, resize, crop, torch.Generator().manual_seed(index))
    return draw


def train_before(path: Path, index: int, resize: int, crop: int):
    image = decode_rgb(path)
    geometry = geometry_drawer(index, resize, crop)(image.shape[2], image.shape[1])
    return apply_geometry(image, geometry), geometry


def train_now(path: Path, index: int, resize: int, crop: int):
    return decode_train_crop(path, geometry_drawer(index, resize, crop))


class Cached:
    """The dataset's cached path (trainers/datasets/sources.py, FolderDataset._cached) over `folder`."""

    def __init__(self, folder: Path, train: bool, cold: bool = False) -> None:
        self.folder, self.train, self.cold = folder, train, cold  # cold: each pass from an empty cache
        self.cache = ImageCache(folder)

    def __call__(self, path: Path, index: int, resize: int, crop: int):
        if not self.train:
            pixels, width, height = self.cache.resized(path, crop)
            return torch.from_numpy(pixels), eval_geometry(width, height, crop)
        pixels, width, height = self.cache.resized(path, resize)
        geometry = geometry_drawer(index, resize, crop)(width, height)
        return crop_and_flip(pixels, geometry.offset_x, geometry.offset_y, crop, geometry.flip), geometry

    def fresh(self) -> None:
        """An empty cache folder: the next pass reads each image for the first time."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.cache = ImageCache(self.folder)


def evaluate(path: Path, index: int, resize: int, crop: int):
    image = decode_rgb(path)
    return apply_geometry(image, eval_geometry(image.shape[2], image.shape[1], crop)), None


def decode_full(path: Path, index: int, resize: int, crop: int):
    return decode_rgb(path), None


def decode_scaled(path: Path, index: int, resize: int, crop: int):
    with Image.open(path) as image:
        image.draft("RGB", (resize, resize))
        image.load()
    return image, None


TODAY = "train, decode_train_crop (today's)"


def pipelines(folder: Path) -> dict:
    return {
        "train, full decode + torchvision resize": train_before,
        TODAY: train_now,
        "train, cache, first read (decode, resize, write)": Cached(folder / "cold", train=True, cold=True),
        "train, cache, later reads": Cached(folder / "warm", train=True),
        "eval, full decode + resize": evaluate,
        "eval, cache, later reads": Cached(folder / "eval", train=False),
        "floor: full decode only": decode_full,
        "floor: decode at draft's scale only": decode_scaled,
    }


def rate(pipeline, paths, resize, crop, repeats) -> float:
    """Median images/s over `repeats` passes (after one warm-up pass; a first-read pipeline starts
    each pass with an empty cache)."""
    times = []
    for attempt in range(repeats + 1):
        if getattr(pipeline, "cold", False):
            pipeline.fresh()
        start = time.perf_counter()
        for index, path in enumerate(paths):
            pipeline(path, index, resize, crop)
        if attempt:
            times.append(time.perf_counter() - start)
    return len(paths) / statistics.median(times)


def compare(paths, resize, crop, folder: Path) -> str:
    """Whether every train pipeline draws the same geometry, whether the cache's images equal the full
    decode's (train and eval, first and later reads), and decode_train_crop's pixel difference."""
    same_geometry, cache_equal, largest, total = True, True, 0, 0.0
    train_cached, eval_cached = Cached(folder / "compare-train", True), Cached(folder / "compare-eval", False)
    for _ in range(2):  # first reads, then later reads
        for index, path in enumerate(paths):
            before, geometry_before = train_before(path, index, resize, crop)
            now, geometry_now = train_now(path, index, resize, crop)
            cached, geometry_cached = train_cached(path, index, resize, crop)
            same_geometry &= geometry_before == geometry_now == geometry_cached
            cache_equal &= torch.equal(before, cached) and torch.equal(evaluate(path, index, resize, crop)[0],
                                                                       eval_cached(path, index, resize, crop)[0])
            difference = (before.int() - now.int()).abs()
            largest, total = max(largest, int(difference.max())), total + float(difference.float().mean())
    return (f"geometry identical: {same_geometry}; cache's train and eval images equal to the full decode's: "
            f"{cache_equal}; decode_train_crop's pixel difference (of 255): largest {largest}, "
            f"mean {total / len(paths) / 2:.2f}")


def loader_rates(paths: list[Path], resize: int, crop: int, folder: Path, images: int = 2000) -> dict[str, float]:
    """Images/s of the training split's batches through the DataLoader (FolderSource: one worker
    process, batches of 64, the collate included), as the engine reads them, without and with the
    cache (filled beforehand), over copies of the photos up to `images` (the worker starts once)."""
    from trainers.datasets.metadata import ImageRecord
    from trainers.datasets.sources import FolderDataset, FolderSource

    root = Path(os.path.commonpath(paths))
    records = [ImageRecord(str(p.relative_to(root)), 0, None) for p in paths] * -(-images // len(paths))
    rates = {}
    for label, cache in [("data.cache: false", None), ("data.cache: true", ImageCache(folder))]:
        source = FolderSource("train", FolderDataset(root, records, train=True, resize=resize, crop=crop, seed=0,
                                                     cache=cache), workers=1, pin_memory=False)
        indices = torch.arange(len(records))
        if cache is not None:  # every entry written: the later epochs' rate
            for path in paths:
                cache.resized(path, resize)
        start = time.perf_counter()
        count = sum(len(batch.labels) for batch in source.batches(indices, 64, train=True, epoch=0, seed=0))
        rates[label] = count / (time.perf_counter() - start)
    return rates


def gpu_rate(paths, resize: int, batch: int = 64) -> float:
    """Images/s of torchvision.io.decode_jpeg on the GPU (nvjpeg) plus a resize there, files in memory."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2.functional import resize as resize_image

    data = [read_file(str(p)) for p in paths]
    chunks = [data[i:i + batch] for i in range(0, len(data), batch)]

    def run():
        for chunk in chunks:
            images = decode_jpeg(chunk, mode=ImageReadMode.RGB, device="cuda")
            [resize_image(image, [resize, resize], antialias=True) for image in images]
        torch.cuda.synchronize()

    run()
    start = time.perf_counter()
    for _ in range(5):
        run()
    return 5 * len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/voc-animals")
    parser.add_argument("--count", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--gpu-decode", action="store_true", help="also torchvision.io.decode_jpeg on the GPU")
    args = parser.parse_args()
    torch.set_num_threads(1)
    photos = photos_of(args.photos, args.count)
    with tempfile.TemporaryDirectory() as folder:
        sets = {"voc-animals photos": photos, "upscaled 2x": upscaled(photos, Path(folder), 2)}
        sizes = {name: np.median([Image.open(p).size for p in paths], axis=0).astype(int) for name, paths in sets.items()}
        print(f"{len(photos)} photos, resize {args.resize} (square), crop {args.crop}, one core, "
              f"torch {torch.__version__}, Pillow {Image.__version__}")
        print("| photos (median size) | pipeline | images/s per core | vs today's train pipeline |")
        print("|---|---|---|---|")
        for number, (name, paths) in enumerate(sets.items()):
            runs = pipelines(Path(folder) / f"cache{number}")
            rates = {label: rate(run, paths, args.resize, args.crop, args.repeats) for label, run in runs.items()}
            for label, value in rates.items():
                print(f"| {name} ({sizes[name][0]}x{sizes[name][1]}) | {label} | {value:.0f} | {value / rates[TODAY]:.2f}x |")
        for number, (name, paths) in enumerate(sets.items()):
            print(f"{name}: {compare(paths, args.resize, args.crop, Path(folder) / f'compare{number}')}")
        for number, (name, paths) in enumerate(sets.items()):
            rates = loader_rates(paths, args.resize, args.crop, Path(folder) / f"loader{number}")
            print(f"{name}, through the DataLoader (one worker, batches of 64): " + ", ".join(
                f"{label} {value:.0f} images/s" for label, value in rates.items())
                + f" ({rates['data.cache: true'] / rates['data.cache: false']:.2f}x)")
        if args.gpu_decode:
            for name, paths in sets.items():
                print(f"{name}: nvjpeg on the GPU, batches of 64, decode + resize: {gpu_rate(paths, args.resize):.0f} images/s")


if __name__ == "__main__":
    main()
