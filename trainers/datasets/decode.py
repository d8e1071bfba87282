"""The training image path, made cheap: decode only the detail the crop keeps, resample only the crop.

The geometry (trainers.datasets.transforms: resize, random crop, flip, and how boxes map) is drawn
exactly as before, from the image's size, which Pillow reads from the header without decoding.
Then:

- a JPEG is decoded by libjpeg-turbo at 1/2, 1/4 or 1/8 of its size (scaled inverse DCT, Pillow's
  `draft`) when that is still at least the resized size, so no detail the network sees is lost;
  then only the crop window is resampled (Pillow's `resize(box=...)`: the same bilinear,
  antialiased filter at the same coordinates as resizing the whole image and cropping it after),
  and the flip is a row reversal of the small crop;
- otherwise (a photo less than twice the resized size) the path is the one before: full decode,
  torchvision's resize of the whole image, crop, flip.

The pixels differ from decoding everything and resizing with torchvision by rounding (at most a few
levels of 255; the DCT-scaled decode is a slightly different low-pass than the antialias filter), the
geometry not at all. Evaluation keeps the full decode (`decode_rgb`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from trainers.datasets.transforms import Geometry, apply_geometry


def decode_train_crop(path: Path, draw: Callable[[int, int], Geometry]) -> tuple[Tensor, Geometry]:
    """(3, size, size) uint8 crop of the image at `path` and its geometry, `draw(width, height)`.

    When libjpeg-turbo cannot decode at a reduced scale (the photo is less than twice the resized
    size), the whole photo is decoded and resized with torchvision as before: measured faster than
    Pillow's resampling of the crop alone on this CPU (benchmarks/bench_input.py).
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            geometry = draw(width, height)
            # draft keeps a scale whose size is at least the one asked for (JPEG only; others ignore it).
            image.draft("RGB", (geometry.resize_width, geometry.resize_height))
            if image.size == (width, height):
                return apply_geometry(decode_rgb(path), geometry), geometry
            scale_x, scale_y = image.size[0] / geometry.resize_width, image.size[1] / geometry.resize_height
            if image.mode != "RGB":
                image = image.convert("RGB")
            left, top, size = geometry.offset_x, geometry.offset_y, geometry.size
            box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
            crop = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise undecodable(path, error) from None
    pixels = np.asarray(crop)
    if geometry.flip:
        pixels = pixels[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), geometry


def decode_rgb(path: Path) -> Tensor:
    """A (3, H, W) uint8 RGB image from a JPEG or PNG file (grey and RGBA become RGB, 16-bit PNGs 8-bit).

    torchvision's decoder while torchvision has it (deprecated since 0.29, to be removed), else
    Pillow's: both are libjpeg-turbo with the same settings, identical pixels on every voc-animals
    photo (tests/test_decode.py), torchvision's ~15% faster here.
    """
    try:
        if _torchvision_decode is not None:
            return _torchvision_decode(path)
        return decode_rgb_pillow(path)
    except (RuntimeError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise undecodable(path, error) from None


def undecodable(path: Path, error: Exception) -> RuntimeError:
    """The one error of an image that cannot be read or decoded: the file, the reason, the check to run."""
    return RuntimeError(f"{path}: cannot decode the image ({error}); run `python -m trainers.datasets check`")


def decoder_name() -> str:
    """Which decoder `decode_rgb` uses, with its version (the image cache's entries depend on it)."""
    if _torchvision_decode is not None:
        import torchvision

        return f"torchvision {torchvision.__version__}"
    from PIL import features

    return f"pillow {Image.__version__} libjpeg-turbo {features.version('libjpeg_turbo')}"


def decode_rgb_pillow(path: Path) -> Tensor:
    """decode_rgb with Pillow (errors are Pillow's)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _torchvision_decoder() -> Callable[[Path], Tensor] | None:
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file
    except ImportError:  # a torchvision without its image decoders
        return None

    def decode(path: Path) -> Tensor:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        if image.dtype == torch.uint16:  # a 16-bit PNG: its high bytes, as Pillow's conversion to RGB
            image = (image.to(torch.int32) >> 8).to(torch.uint8)
        return image
    return decode


_torchvision_decode = _torchvision_decoder()
