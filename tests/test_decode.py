"""The training decode path: the same geometry as resize-then-crop, the pixels within rounding."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.datasets import decode
from trainers.datasets.decode import decode_rgb, decode_rgb_pillow, decode_train_crop
from trainers.datasets.transforms import Geometry, apply_geometry, train_geometry

PHOTOS = Path(__file__).resolve().parents[2] / "shared/data/voc-animals"
pytestmark = pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"{PHOTOS}: the team's real photos are not here")


def photo(name: str) -> Path:
    return next(PHOTOS.rglob(name))


def fixed(resize_width, resize_height, offset_x, offset_y, flip, size=224):
    def draw(width, height):
        return Geometry(width, height, resize_width, resize_height, offset_x, offset_y, flip, size)
    return draw


def upscaled(tmp_path, factor=4):
    path, big = sorted(PHOTOS.rglob("*.jpg"))[3], tmp_path / "big.jpg"
    with Image.open(path) as image:
        image.convert("RGB").resize((image.width * factor, image.height * factor), Image.Resampling.BICUBIC).save(big, quality=92)
    return big


def test_a_photo_under_twice_the_size_takes_the_path_before():
    path = sorted(PHOTOS.rglob("*.jpg"))[3]
    with Image.open(path) as image:
        assert image.width < 2 * 256 or image.height < 2 * 256
    crop, geometry = decode_train_crop(path, fixed(256, 256, 17, 29, True))
    assert torch.equal(crop, apply_geometry(decode_rgb(path), geometry))


def test_only_the_crop_is_resampled_as_resizing_the_whole_image_would(tmp_path):
    # A large photo is decoded at a reduced scale; the crop must then be exactly Pillow's resize of
    # the whole (reduced) image, cropped: the same filter at the same coordinates.
    big = upscaled(tmp_path)
    with Image.open(big) as image:
        image.draft("RGB", (256, 256))
        assert min(image.size) >= 256 and image.size != Image.open(big).size  # decoded at 1/2 or 1/4
        whole = np.asarray(image.convert("RGB").resize((256, 256), Image.Resampling.BILINEAR))
    crop, _ = decode_train_crop(big, fixed(256, 256, 17, 29, False))
    assert crop.shape == (3, 224, 224) and crop.dtype == torch.uint8
    assert np.array_equal(crop.permute(1, 2, 0).numpy(), whole[29:29 + 224, 17:17 + 224])


def test_flip_mirrors_the_same_crop(tmp_path):
    big = upscaled(tmp_path)
    plain, _ = decode_train_crop(big, fixed(256, 256, 10, 20, False))
    flipped, _ = decode_train_crop(big, fixed(256, 256, 10, 20, True))
    assert torch.equal(flipped, plain.flip(-1))


def test_large_photo_is_decoded_at_a_reduced_scale_and_stays_close(tmp_path):
    # 4x the photo: libjpeg-turbo decodes it at 1/2 or 1/4 (still >= 256 px), a different low-pass
    # than decoding everything and antialiasing, close on average.
    big = upscaled(tmp_path)
    generator = torch.Generator().manual_seed(3)
    crop, geometry = decode_train_crop(big, lambda w, h: train_geometry(w, h, 256, 224, generator))
    before = apply_geometry(decode_rgb(big), geometry)
    assert float((before.float() - crop.float()).abs().mean()) < 2.0


def test_geometry_is_drawn_from_the_files_size_as_before():
    path = sorted(PHOTOS.rglob("*.jpg"))[7]
    draws = []

    def draw(width, height):
        draws.append((width, height))
        return train_geometry(width, height, 256, 224, torch.Generator().manual_seed(11), "shorter_side")

    _, geometry = decode_train_crop(path, draw)
    image = decode_rgb(path)
    assert draws == [(image.shape[2], image.shape[1])]
    assert geometry == train_geometry(image.shape[2], image.shape[1], 256, 224,
                                      torch.Generator().manual_seed(11), "shorter_side")


def test_grey_photos_become_three_equal_channels(tmp_path):
    grey = tmp_path / "grey.jpg"
    with Image.open(upscaled(tmp_path)) as image:
        image.convert("L").save(grey)
    crop, _ = decode_train_crop(grey, fixed(256, 256, 0, 0, False))
    assert torch.equal(crop[0], crop[1]) and torch.equal(crop[1], crop[2])


@pytest.mark.skipif(decode._torchvision_decode is None, reason="this torchvision has no image decoders")
def test_pillow_decodes_every_photo_as_torchvision_does():
    """Evaluation's decoder once torchvision drops its own (deprecated since 0.29): the same pixels."""
    photos = [p for p in sorted(PHOTOS.rglob("*.jpg")) if p.name != "00090.jpg" or "kangaroo" not in str(p)]
    assert len(photos) == 363  # every photo but the truncated one
    grey = 0
    for path in photos:
        pillow = decode_rgb_pillow(path)
        assert torch.equal(pillow, decode._torchvision_decode(path)), path
        grey += torch.equal(pillow[0], pillow[1]) and torch.equal(pillow[1], pillow[2])
    assert grey == 3  # greyscale JPEGs among them


def test_without_torchvision_decoders_pillow_decodes(monkeypatch):
    path = sorted(PHOTOS.rglob("*.jpg"))[3]
    expected = decode_rgb(path)
    monkeypatch.setattr(decode, "_torchvision_decode", None)
    assert torch.equal(decode_rgb(path), expected)
    with pytest.raises(RuntimeError, match="00090.jpg: cannot decode the image"):
        decode_rgb(next(p for p in PHOTOS.rglob("00090.jpg") if "kangaroo" in str(p)))


def test_a_broken_file_names_itself(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(RuntimeError, match="broken.jpg: cannot decode the image"):
        decode_train_crop(broken, fixed(256, 256, 0, 0, False))
