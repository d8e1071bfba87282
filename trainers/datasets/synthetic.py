"""An in-memory synthetic WSOL dataset that contains the problem Hide-and-Seek addresses.

Each image holds one object: a textured ellipse (the "body") with a small saturated disc (the
"part", its head) at one end, on a smooth coloured background with plain clutter discs. The class
is written twice: the part's hue gives it away perfectly and is the easiest feature a CNN can learn
(one colour, a 1x1 filter); the body carries it in a faint sinusoidal grating (tilt 0, +-45 or 90
degrees x period), a reliable but harder cue (oriented filters over several pixels, against pixel
noise), while the body's own colour is drawn independently of the class and shared with the
clutter. A plain CAM network solves the task with the part and stops learning (its CAM covers the
part); when HaS hides the part the loss is only lowered by reading the body's texture, so the CAM
spreads over the whole object. Both cues are mirror-symmetric: horizontal flips keep the labels.
Ground truth: box and mask of body + part, plus the part's box for diagnostics.

Everything is drawn from explicit `torch.Generator`s seeded by (seed, split) and rendered
vectorised over the images (loops only over clutter discs and chunks of images).
"""
from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from trainers.datasets.metadata import SPLITS

# Geometry below is in pixels of this reference side and scales with `image_size`.
REFERENCE_SIZE = 48
# Grating tilts of the classes (degrees from the x axis, sign random per image): the texture cue
# must survive the horizontal flip of training, so a class is a mirror-symmetric set of tilts.
TILTS = (0.0, 45.0, 90.0)
# Period levels per tilt: num_classes <= len(TILTS) * MAX_PERIOD_LEVELS.
MAX_PERIOD_LEVELS = 3
# Images rendered at once: bounds the float buffers (~2048 x 3 x H x W) whatever the split size.
CHUNK = 2048


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that defines the dataset; equal specs give byte-identical splits."""

    num_classes: int = 6
    image_size: int = 48
    train_size: int = 4000
    val_size: int = 250  # small and fully annotated, like wsolevaluation's train-fullsup (~40 per class)
    test_size: int = 1000
    seed: int = 0
    # Body half-length range (reference px): large objects, so a part-sized CAM blob has IoU < 0.3.
    body_length: tuple[float, float] = (11.0, 18.0)
    # Body half-width as a fraction of the half-length: varies the aspect ratio.
    body_aspect: tuple[float, float] = (0.45, 0.75)
    # Part (head disc) radius range (reference px): small, about 1/10 of the object box area.
    part_radius: tuple[float, float] = (3.0, 4.0)
    # Peak relative amplitude of the body's grating: faint, so a CNN learns the part's hue first.
    texture_contrast: tuple[float, float] = (0.08, 0.16)
    # Shortest and longest class period of the grating (reference px); levels are geometric between.
    texture_period: tuple[float, float] = (3.5, 7.0)
    # Relative jitter of the period: the cue stays reliable (levels differ by >= 1.4x) but is noisy.
    period_jitter: float = 0.08
    # Fraction of images whose body texture is their class's; the others show another class's texture.
    texture_reliability: float = 1.0
    # Jitter (degrees) of the grating's tilt around its class tilt (classes are 45 degrees apart).
    orientation_jitter: float = 6.0
    # Clutter discs per image are uniform in 0..max_clutter; same colours as bodies, no texture.
    max_clutter: int = 5
    # Std of the Gaussian pixel noise in [0, 1] units.
    noise_std: float = 0.05

    def __post_init__(self) -> None:
        _check_int(self, "num_classes", 2, len(TILTS) * MAX_PERIOD_LEVELS)
        _check_int(self, "image_size", 32, 256)
        if self.image_size % 4:
            _fail("image_size", self.image_size, "a multiple of 4 (tiny_cnn's stride)")
        for name in ("train_size", "val_size", "test_size"):
            _check_int(self, name, 1, 10_000_000)
        _check_int(self, "seed", 0, 2**63 - 1)
        _check_range(self, "body_length", 4.0, 20.0)
        _check_range(self, "body_aspect", 0.2, 1.0)
        _check_range(self, "part_radius", 1.0, 8.0)
        _check_range(self, "texture_contrast", 0.0, 1.0)
        _check_range(self, "texture_period", 2.0, 24.0)
        if not _is_real(self.orientation_jitter) or not 0 <= self.orientation_jitter <= 15:
            _fail("orientation_jitter", self.orientation_jitter, "degrees in [0, 15] (classes are 45 apart)")
        if not _is_real(self.texture_reliability) or not 0 <= self.texture_reliability <= 1:
            _fail("texture_reliability", self.texture_reliability, "a fraction in [0, 1]")
        if not _is_real(self.period_jitter) or not 0 <= self.period_jitter <= 0.15:
            _fail("period_jitter", self.period_jitter, "a fraction in [0, 0.15] (period levels are >= 1.4x apart)")
        levels = period_levels(self.num_classes)
        if levels > 1 and self.texture_period[1] / self.texture_period[0] < 1.4 ** (levels - 1):
            _fail("texture_period", self.texture_period,
                  f"a range whose {levels} geometric levels are >= 1.4x apart (hi / lo >= {1.4 ** (levels - 1):.2f})")
        _check_int(self, "max_clutter", 0, 32)
        if not _is_real(self.noise_std) or not 0 <= self.noise_std <= 0.5:
            _fail("noise_std", self.noise_std, "a float in [0, 0.5]")
        # The largest object must fit in the image: length 2a + 1.6 r_max along its axis.
        scale = self.image_size / REFERENCE_SIZE
        extent = (2 * self.body_length[1] + 1.6 * self.part_radius[1]) * scale
        if extent > self.image_size - 2:
            _fail("body_length", self.body_length,
                  f"ranges whose largest object (2 * length + 1.6 * part radius = {extent:g} px) "
                  f"fits in image_size - 2 = {self.image_size - 2}")

    def size_of(self, split: str) -> int:
        _check_split(split)
        return getattr(self, f"{split}_size")


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"SyntheticSpec.{name}: {value!r} is not allowed; allowed: {allowed}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(spec: SyntheticSpec, name: str, low: int, high: int) -> None:
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        _fail(name, value, f"an int in [{low}, {high}]")


def _check_range(spec: SyntheticSpec, name: str, low: float, high: float) -> None:
    """A (lo, hi) range; a list (as YAML gives it) is stored as a tuple of floats, keeping the spec hashable."""
    value = getattr(spec, name)
    if (not isinstance(value, (tuple, list)) or len(value) != 2 or not all(map(_is_real, value))
            or not low <= value[0] <= value[1] <= high):
        _fail(name, value, f"a pair (lo, hi) with {low} <= lo <= hi <= {high}")
    object.__setattr__(spec, name, (float(value[0]), float(value[1])))


def _check_split(split: object) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not allowed; allowed: {', '.join(SPLITS)}")


@dataclass(frozen=True)
class SyntheticSplit:
    """One split. Boxes are inclusive (x0, y0, x1, y1) pixel indices; masks 1 = object."""

    images: Tensor  # (N, 3, H, W) uint8
    labels: Tensor  # (N,) int64
    boxes: Tensor  # (N, 4) int64, the whole object (body + part): the bbox of `masks`
    masks: Tensor  # (N, H, W) uint8, 1 = object, 0 = background
    part_boxes: Tensor  # (N, 4) int64, the discriminative part (head disc) alone
    mean: tuple[float, float, float]  # per channel, of the TRAIN split, in [0, 1] units
    std: tuple[float, float, float]  # per channel, of the TRAIN split, in [0, 1] units

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def part_colors(num_classes: int) -> Tensor:
    """(K, 3) the saturated part colour of each class: hues equally spaced, full saturation."""
    hues = torch.arange(num_classes, dtype=torch.float32) / num_classes
    return _hsv_to_rgb(hues, torch.ones(num_classes), torch.ones(num_classes))


def period_levels(num_classes: int) -> int:
    """How many grating periods the classes use: one per group of len(TILTS) classes."""
    return math.ceil(num_classes / len(TILTS))


def class_textures(spec: SyntheticSpec) -> tuple[Tensor, Tensor]:
    """(K,) tilt in radians and (K,) period in reference px of each class's body grating.

    Class k: tilt TILTS[k % 3] (its sign drawn per image), period level k // 3, geometric in
    `texture_period`. Mirror images and 180-degree turns keep every class's texture in its class.
    """
    k = torch.arange(spec.num_classes)
    tilt = torch.tensor(TILTS, dtype=torch.float32)[k % len(TILTS)] * (math.pi / 180)
    levels = period_levels(spec.num_classes)
    lo, hi = spec.texture_period
    fraction = (k // len(TILTS)).float() / max(levels - 1, 1)
    period = lo * (hi / lo) ** fraction if levels > 1 else torch.full((spec.num_classes,), math.sqrt(lo * hi))
    return tilt, period


def split_generator(seed: int, split: str) -> torch.Generator:
    """The generator of one (seed, split): independent streams via a hash, no global RNG."""
    _check_split(split)
    digest = hashlib.sha256(f"has-sweep/synthetic/{seed}/{split}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


_TRAIN_STATS: dict[SyntheticSpec, tuple[tuple[float, ...], tuple[float, ...]]] = {}


def train_statistics(spec: SyntheticSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the train split in [0, 1] units (generated once per spec, cached)."""
    if spec not in _TRAIN_STATS:
        generate_synthetic(spec, "train")
    return _TRAIN_STATS[spec]


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images, from 256-bin histograms."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        m = float((counts * levels).sum() / counts.sum())
        mean.append(m)
        std.append(math.sqrt(max(float((counts * levels * levels).sum() / counts.sum()) - m * m, 0.0)))
    return tuple(mean), tuple(std)


def generate_synthetic(spec: SyntheticSpec, split: str) -> SyntheticSplit:
    """The split `split` of `spec`: deterministic from (spec.seed, split), vectorised over images."""
    if not isinstance(spec, SyntheticSpec):
        raise ValueError(f"spec: {spec!r} is not a SyntheticSpec")
    count = spec.size_of(split)
    generator = split_generator(spec.seed, split)
    params = _draw_params(spec, count, generator)
    images = torch.empty((count, 3, spec.image_size, spec.image_size), dtype=torch.uint8)
    masks = torch.empty((count, spec.image_size, spec.image_size), dtype=torch.uint8)
    part_masks = torch.empty_like(masks)
    for start in range(0, count, CHUNK):
        chunk = {name: value[start:start + CHUNK] for name, value in params.items()}
        images[start:start + CHUNK], masks[start:start + CHUNK], part_masks[start:start + CHUNK] = (
            _render(spec, chunk, generator))
    if split == "train":
        _TRAIN_STATS[spec] = _channel_stats(images)
    mean, std = train_statistics(spec)
    return SyntheticSplit(images=images, labels=params["label"].clone(), boxes=mask_boxes(masks),
                          masks=masks, part_boxes=mask_boxes(part_masks), mean=mean, std=std)


def mask_boxes(masks: Tensor) -> Tensor:
    """(N, 4) int64 inclusive (x0, y0, x1, y1) bounding boxes of non-empty (N, H, W) masks."""
    on = masks.bool()
    cols, rows = on.any(dim=1), on.any(dim=2)  # (N, W), (N, H)
    if not (cols.any(dim=1).all()):
        raise ValueError("masks: an empty mask has no bounding box")

    def first_last(line: Tensor) -> tuple[Tensor, Tensor]:
        index = torch.arange(line.shape[1])
        first = torch.where(line, index, line.shape[1]).amin(dim=1)
        last = torch.where(line, index, -1).amax(dim=1)
        return first, last

    x0, x1 = first_last(cols)
    y0, y1 = first_last(rows)
    return torch.stack([x0, y0, x1, y1], dim=1).long()


def _uniform(generator: torch.Generator, count: int, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def _draw_params(spec: SyntheticSpec, count: int, g: torch.Generator) -> dict[str, Tensor]:
    """Every random number of the split except the pixel noise, drawn up front (chunking-independent)."""
    size, scale = spec.image_size, spec.image_size / REFERENCE_SIZE
    label = torch.randperm(count, generator=g) % spec.num_classes  # balanced to within one image
    a = _uniform(g, count, *spec.body_length) * scale
    b = a * _uniform(g, count, *spec.body_aspect)
    r = _uniform(g, count, *spec.part_radius) * scale
    phi = _uniform(g, count, 0.0, 2 * math.pi)  # the direction the head points
    head_offset = a + 0.6 * r  # the head overlaps the tip of the body
    hx, hy = head_offset * torch.cos(phi), head_offset * torch.sin(phi)
    # Axis-aligned half-extents of the rotated ellipse, then of the body + head union.
    ex = torch.sqrt((a * torch.cos(phi)) ** 2 + (b * torch.sin(phi)) ** 2)
    ey = torch.sqrt((a * torch.sin(phi)) ** 2 + (b * torch.cos(phi)) ** 2)
    x_lo, x_hi = torch.minimum(-ex, hx - r), torch.maximum(ex, hx + r)
    y_lo, y_hi = torch.minimum(-ey, hy - r), torch.maximum(ey, hy + r)
    margin = 0.5
    cx = (margin - x_lo) + torch.rand(count, generator=g) * ((size - 1 - margin - x_hi) - (margin - x_lo))
    cy = (margin - y_lo) + torch.rand(count, generator=g) * ((size - 1 - margin - y_hi) - (margin - y_lo))
    jitter = math.radians(spec.orientation_jitter)
    tilts, periods = class_textures(spec)
    sign = torch.randint(0, 2, (count,), generator=g) * 2 - 1
    # Unreliable bodies wear the texture of a different class (uniform over the K - 1 others).
    swap = torch.rand(count, generator=g) >= spec.texture_reliability
    other = (label + torch.randint(1, spec.num_classes, (count,), generator=g)) % spec.num_classes
    texture = torch.where(swap, other, label)
    theta = sign * (tilts[texture] + _uniform(g, count, -jitter, jitter))
    period = periods[texture] * scale * (1 + _uniform(g, count, -spec.period_jitter, spec.period_jitter))
    clutter = spec.max_clutter
    return {
        "label": label, "cx": cx, "cy": cy, "a": a, "b": b, "phi": phi, "r": r,
        "hx": cx + hx, "hy": cy + hy,
        "theta": theta,
        "period": period,
        "contrast": _uniform(g, count, *spec.texture_contrast),
        "phase": _uniform(g, count, 0.0, 2 * math.pi),
        "body_rgb": _muted_colors(g, count),
        "part_value": _uniform(g, count, 0.8, 1.0),  # brightness jitter of the saturated part colour
        "bg_cells": _muted_colors(g, count * 16).view(count, 4, 4, 3),  # 4x4 smooth background field
        "clutter_n": torch.randint(0, clutter + 1, (count,), generator=g),
        "clutter_x": torch.rand(count, clutter, generator=g) * (size - 1),
        "clutter_y": torch.rand(count, clutter, generator=g) * (size - 1),
        "clutter_r": (2.0 + 3.0 * torch.rand(count, clutter, generator=g)) * scale,
        "clutter_rgb": _muted_colors(g, count * clutter).view(count, clutter, 3),
    }


def _muted_colors(g: torch.Generator, count: int) -> Tensor:
    """(count, 3) desaturated colours of any hue: bodies, clutter and background share them."""
    hue = torch.rand(count, generator=g)
    saturation = 0.05 + 0.35 * torch.rand(count, generator=g)
    value = 0.3 + 0.5 * torch.rand(count, generator=g)
    return _hsv_to_rgb(hue, saturation, value)


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """(N, 3) RGB in [0, 1] of HSV components (N,) in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _render(spec: SyntheticSpec, p: dict[str, Tensor], g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Paint a chunk: a per-pixel layer index (background, clutter j, body, part), then its colours."""
    n, size, clutter = p["label"].shape[0], spec.image_size, spec.max_clutter
    coords = torch.arange(size, dtype=torch.float32)
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)
    col = lambda name: p[name].view(n, 1, 1)  # noqa: E731
    layer = torch.zeros((n, size, size), dtype=torch.long)  # 0 = background
    # Clutter: plain discs in body colours (class-independent), under the object; later ones on top.
    for j in range(clutter):
        inside = ((x - p["clutter_x"][:, j, None, None]) ** 2 + (y - p["clutter_y"][:, j, None, None]) ** 2
                  <= p["clutter_r"][:, j, None, None] ** 2) & (p["clutter_n"] > j).view(n, 1, 1)
        layer.masked_fill_(inside, 1 + j)
    # Body: a rotated ellipse; part: the head disc, on top of the body.
    dx, dy = x - col("cx"), y - col("cy")
    cos, sin = torch.cos(col("phi")), torch.sin(col("phi"))
    body = ((dx * cos + dy * sin) / col("a")) ** 2 + ((dy * cos - dx * sin) / col("b")) ** 2 <= 1.0
    part = (x - col("hx")) ** 2 + (y - col("hy")) ** 2 <= col("r") ** 2
    layer.masked_fill_(body, clutter + 1)
    layer.masked_fill_(part, clutter + 2)
    # Flat colour of every layer: (n, 3, L) with L = background slot, clutter, body, part.
    part_rgb = part_colors(spec.num_classes)[p["label"]] * p["part_value"][:, None]
    table = torch.cat([torch.zeros(n, 1, 3), p["clutter_rgb"], p["body_rgb"][:, None], part_rgb[:, None]], 1)
    flat = table.transpose(1, 2).gather(2, layer.view(n, 1, -1).expand(n, 3, -1)).view(n, 3, size, size)
    # The body's class-oriented grating modulates its muted colour: 1 + contrast * sin(...) inside it.
    along = x * torch.cos(col("theta")) + y * torch.sin(col("theta"))
    wave = col("contrast") * torch.sin(along * (2 * math.pi / col("period")) + col("phase"))
    shade = torch.where(layer == clutter + 1, 1.0 + wave, 1.0)
    # Background: a 4x4 field of muted colours, smoothly (bilinearly) upsampled: no sharp edges.
    cells = p["bg_cells"].permute(0, 3, 1, 2)
    background = torch.nn.functional.interpolate(cells, size=(size, size), mode="bilinear", align_corners=False)
    image = torch.where((layer == 0)[:, None], background, flat * shade[:, None])
    if spec.noise_std > 0:
        image.add_(torch.randn(image.shape, generator=g), alpha=spec.noise_std)
    image = image.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return image, (body | part).to(torch.uint8), part.to(torch.uint8)
