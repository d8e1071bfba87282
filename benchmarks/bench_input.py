"""Input pipeline speed, images per second on one core, on real JPEGs.

    python benchmarks/bench_input.py [--photos ../shared/data/voc-animals] [--count 120] [--repeats 3]

Two sets of photos: the voc-animals photos as they are (178x154 to 2000x1333, median 600x400) and
the same photos upscaled 2x and saved again as JPEG (quality 90; median 1200x800, the size of
today's camera datasets such as OpenImages). For each, one process with one torch thread (a
DataLoader worker's setting) runs, image by image:

- train, before: full decode (torchvision.io), resize the whole image (torchvision, antialiased),
  crop, flip: the pipeline up to this change;
- train, now: trainers.datasets.decode.decode_train_crop (scaled DCT decode, only the crop resampled);
- eval: full decode, resize straight to the input size (unchanged);
- floors: a bare full decode (torchvision.io) and a bare decode at the scale `draft` picks, the least
  a core must spend on each photo.

The geometry (crop offsets, flips, mapped boxes) of both train pipelines is checked identical, and
the pixels' largest difference is printed.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainers.datasets.decode import decode_train_crop
from trainers.datasets.decode import decode_rgb
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


PIPELINES = {
    "train, before (full decode + torchvision resize)": train_before,
    "train, now (decode_train_crop)": train_now,
    "eval (full decode + resize, unchanged)": evaluate,
    "floor: full decode only": decode_full,
    "floor: decode at draft's scale only": decode_scaled,
}


def rate(pipeline, paths, resize, crop, repeats) -> float:
    """Median images/s over `repeats` passes (after one warm-up pass)."""
    times = []
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        for index, path in enumerate(paths):
            pipeline(path, index, resize, crop)
        if attempt:
            times.append(time.perf_counter() - start)
    return len(paths) / statistics.median(times)


def compare(paths, resize, crop) -> tuple[bool, int, float]:
    """Whether both train pipelines draw the same geometry; their pixels' largest and mean difference."""
    same_geometry, largest, total = True, 0, 0.0
    for index, path in enumerate(paths):
        before, geometry_before = train_before(path, index, resize, crop)
        now, geometry_now = train_now(path, index, resize, crop)
        same_geometry &= geometry_before == geometry_now
        difference = (before.int() - now.int()).abs()
        largest, total = max(largest, int(difference.max())), total + float(difference.float().mean())
    return same_geometry, largest, total / len(paths)


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
        print("| photos (median size) | pipeline | images/s per core | vs train before |")
        print("|---|---|---|---|")
        for name, paths in sets.items():
            rates = {label: rate(run, paths, args.resize, args.crop, args.repeats) for label, run in PIPELINES.items()}
            base = rates["train, before (full decode + torchvision resize)"]
            for label, value in rates.items():
                print(f"| {name} ({sizes[name][0]}x{sizes[name][1]}) | {label} | {value:.0f} | {value / base:.2f}x |")
        for name, paths in sets.items():
            same, largest, mean = compare(paths, args.resize, args.crop)
            print(f"{name}: geometry identical: {same}; pixel difference (of 255): largest {largest}, mean {mean:.2f}")
        if args.gpu_decode:
            for name, paths in sets.items():
                print(f"{name}: nvjpeg on the GPU, batches of 64, decode + resize: {gpu_rate(paths, args.resize):.0f} images/s")


if __name__ == "__main__":
    main()
