"""Images decoded and resized once per node, kept on its disk: later epochs and trials only crop them.

Every epoch resizes each training image to the same size before its random crop (wsolevaluation:
256x256; or the shorter side to 256), and evaluation resizes each image straight to the input size:
both depend on the file and the config alone. A sweep trains many trials for many epochs over the
same images, and decoding plus resizing is most of the input pipeline's time (docs/benchmarks.md),
so the first read of an image on a node decodes it in full and resizes it as wsolevaluation's
transform does (`decode_rgb`, then torchvision's antialiased resize), and writes the result; every
later read, by any epoch, worker or trial on that node, reads it back and crops it. The pixels the
network sees are those of decoding in full and resizing every time, to the bit
(tests/test_image_cache.py); `data.cache: false` decodes large photos at a reduced scale instead
(trainers/datasets/decode.py: the same geometry, pixels within rounding).

An entry is `<folder>/<2 hex>/<32 hex>.img`: a 20-byte header (magic, original width and height,
resized width and height, uint32) and the resized image, 3 x H x W uint8, uncompressed (192 KiB at
256x256: ~250 GB for ImageNet's 1.28 M training images; ~2.2 GB for CUB's three splits). Its name
hashes the file's real path (symlinks resolved), size, inode, modification and change times (a file
replaced or rewritten, even with its old size and mtime, is a new entry), the resize (mode, side),
the decoder and torchvision's version (they make the pixels) and FORMAT.

Entries are written to a temporary file and renamed over the name (os.replace), so readers see a
whole entry or none whatever crashes or runs in parallel (DataLoader workers, trials on the same
node); a short or foreign file is a miss, decoded again and rewritten. Writing stops, for the process,
when the disk would keep less free space than `reserve` (10% of it, at least 2 GiB) or when a write
fails; reads go on and missed images are decoded each time, with the same pixels. A writer killed
mid-write leaves its temporary (`.<name>.<pid>.<hex>`), which `python -m trainers.datasets cache`
removes once it is an hour old. The folder carries a CACHEDIR.TAG (backup tools skip it); delete it
whenever you like.
"""
from __future__ import annotations

import functools
import hashlib
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from trainers.datasets import decode
from trainers.datasets.transforms import ResizeMode, resize_image, resized_size

FORMAT = 1
MAGIC = 0x31_43_53_48  # b"HSC1" little-endian
HEADER = np.dtype("<u4").itemsize * 5
MIN_RESERVE = 2 << 30
RESERVE_FRACTION = 0.10  # Ray stops spilling objects on a disk over 95% full; checkpoints and logs need room too
ENV = "HAS_SWEEP_CACHE"
_STOPPED: set[Path] = set()  # the folders this process has said it stopped writing to
TAG = "Signature: 8a477f597d28d172789f06886806bc55\n# has-sweep's decoded and resized images (trainers/datasets/cache.py)\n"


def cache_folder(configured: str | None = None) -> Path:
    """Where this node keeps the images: `configured` (data.cache_dir), else $HAS_SWEEP_CACHE, else
    $XDG_CACHE_HOME/has-sweep/images or ~/.cache/has-sweep/images; $VARIABLES and ~ expanded here."""
    if configured:
        return Path(os.path.expandvars(os.path.expanduser(configured)))
    if os.environ.get(ENV):
        return Path(os.path.expandvars(os.path.expanduser(os.environ[ENV])))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "has-sweep" / "images"


class ImageCache:
    """Resized images on this node's disk, keyed by file and resize; see the module's docstring."""

    def __init__(self, folder: Path, reserve: int | None = None) -> None:
        self.folder = Path(folder)
        self.reserve = reserve  # bytes to leave free; None: 10% of the disk, at least 2 GiB
        self.writing = True
        self._started = False
        self.hits = self.misses = self.written = 0  # this process's
        self._salt = f"{FORMAT}|{decode.decoder_name()}|{_torchvision_version()}"

    def __getstate__(self) -> dict:  # DataLoader workers start with their own counts
        return {**self.__dict__, "hits": 0, "misses": 0, "written": 0}

    def resized(self, path: Path, side: int, mode: ResizeMode = "square") -> tuple[np.ndarray, int, int]:
        """(pixels (3, H, W) uint8, original width, original height) of `path` resized as
        `resized_size(width, height, side, mode)` says: from the cache, else decoded, resized and kept."""
        try:
            stat = os.stat(path)
        except OSError as error:
            raise decode.undecodable(path, error) from None
        entry = self._entry(path, stat, side, mode)
        found = self._read(entry)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        image = decode.decode_rgb(path)  # (3, h, w) uint8 (16-bit PNGs scaled down); errors name the file
        height, width = image.shape[1:]
        resize_width, resize_height = resized_size(width, height, side, mode)
        pixels = resize_image(image, resize_width, resize_height).numpy()
        self._write(entry, np.array([MAGIC, width, height, resize_width, resize_height], dtype="<u4"), pixels)
        return pixels, width, height

    def _entry(self, path: Path, stat: os.stat_result, side: int, mode: str) -> Path:
        key = (f"{self._salt}|{os.path.realpath(path)}|{stat.st_size}|{stat.st_ino}|{stat.st_mtime_ns}|"
               f"{stat.st_ctime_ns}|{mode}|{side}")
        name = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        return self.folder / name[:2] / f"{name}.img"

    @staticmethod
    def _read(entry: Path) -> tuple[np.ndarray, int, int] | None:
        try:
            with open(entry, "rb", buffering=0) as file:
                size = os.fstat(file.fileno()).st_size
                if size < HEADER:
                    return None
                data = np.empty(size, dtype=np.uint8)
                view, done = memoryview(data), 0
                while done < size:  # network file systems may return less than asked
                    count = file.readinto(view[done:])
                    if not count:
                        return None
                    done += count
        except OSError:  # not there (a miss), or unreadable: decoded instead
            return None
        magic, width, height, resize_width, resize_height = data[:HEADER].view("<u4").tolist()
        if magic != MAGIC or size != HEADER + 3 * resize_width * resize_height:
            return None
        return data[HEADER:].reshape(3, resize_height, resize_width), width, height

    def _write(self, entry: Path, header: np.ndarray, pixels: np.ndarray) -> None:
        if not self.writing:
            return
        if pixels.dtype != np.uint8:  # decode_rgb gives uint8; anything else would never read back whole
            raise TypeError(f"image cache: {pixels.dtype} pixels cannot be kept; uint8 only")
        temporary = entry.with_name(f".{entry.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            if not self._started:
                self.prepare()
            disk = os.statvfs(self.folder)
            reserve = self.reserve if self.reserve is not None else max(
                MIN_RESERVE, int(RESERVE_FRACTION * disk.f_blocks * disk.f_frsize))
            if disk.f_bavail * disk.f_frsize - HEADER - pixels.nbytes < reserve:
                return self._stop(f"less than {reserve / 2**30:.1f} GiB would stay free on its disk")
            entry.parent.mkdir(exist_ok=True)
            with open(temporary, "wb") as file:
                file.write(header.tobytes())
                file.write(np.ascontiguousarray(pixels).data)
            os.replace(temporary, entry)
            self.written += 1
        except OSError as error:
            try:
                temporary.unlink(missing_ok=True)
            except OSError:  # the folder itself is the problem
                pass
            self._stop(f"cannot write there ({error})")

    def prepare(self) -> None:
        """Make the folder, with its CACHEDIR.TAG (OSError if it cannot be made); done by the first write."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tag = self.folder / "CACHEDIR.TAG"
        if not tag.exists():
            temporary = self.folder / f".CACHEDIR.TAG.{os.getpid()}.{secrets.token_hex(4)}"
            temporary.write_text(TAG)
            os.replace(temporary, tag)
        self._started = True

    def _stop(self, why: str) -> None:
        self.writing = False
        if self.folder in _STOPPED:  # said already by this process (another split's or chunk's cache)
            return
        _STOPPED.add(self.folder)
        print(f"image cache {self.folder}: {why}; images not cached yet are decoded each time "
              f"(the same pixels, more CPU) in process {os.getpid()}", file=sys.stderr, flush=True)


def fill_cache(folder: Path, jobs: Sequence[tuple[str, int, str]], workers: int = 2,
               progress: Callable[[int, int], None] | None = None) -> dict[tuple[str, int, str], tuple[str, int] | str]:
    """Each job (image path, side, resize mode) resized into the cache at `folder`, in `workers`
    processes: ("decoded", "already there" or "not kept", the entry's bytes) per job, or the error message."""
    from trainers.datasets.check import map_chunks

    return map_chunks(functools.partial(_fill_chunk, str(folder)), list(jobs), workers, progress)


def _fill_chunk(folder: str, jobs: list[tuple[str, int, str]]) -> dict:
    cache, results = ImageCache(Path(folder)), {}
    for path, side, mode in jobs:
        if not cache.writing:  # the disk is full or the folder unwritable: said once, the rest skipped
            results[(path, side, mode)] = ("not kept", 0)
            continue
        misses, written = cache.misses, cache.written
        try:
            pixels, _, _ = cache.resized(Path(path), side, mode)  # type: ignore[arg-type]
        except RuntimeError as error:
            results[(path, side, mode)] = str(error)
            continue
        kind = "already there" if cache.misses == misses else "decoded" if cache.written > written else "not kept"
        results[(path, side, mode)] = (kind, HEADER + pixels.nbytes)
    return results


def remove_stale_temporaries(folder: Path, age: float = 3600.0) -> int:
    """Delete the temporaries of writers killed mid-write (older than `age` seconds); how many."""
    import time

    removed, now = 0, time.time()
    for temporary in folder.glob("*/.*.img.*"):
        try:
            if now - temporary.stat().st_mtime > age:
                temporary.unlink()
                removed += 1
        except OSError:  # gone meanwhile (another cleaner, or renamed by a slow writer)
            pass
    return removed


def crop_and_flip(pixels: np.ndarray, left: int, top: int, size: int, flip: bool) -> torch.Tensor:
    """A (3, size, size) uint8 tensor: the window of `pixels` (3, H, W) at (left, top), mirrored if `flip`."""
    window = torch.from_numpy(pixels)[:, top:top + size, left:left + size]
    return window.flip(-1) if flip else window.clone()  # torch's strided copies: ~3x numpy's here


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__
