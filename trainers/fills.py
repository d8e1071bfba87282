"""Fill strategies: what a hidden pixel becomes. Searchable by name like any other parameter.

Every strategy is `fill(images, stats, generator) -> values` broadcastable to the batch, in the
batch's own (normalised) space. `stats` carries the dataset statistics in that space. (No strategy
needs to know which pixels are hidden: the values are taken where they are; DESIGN.md's contract
passed the pixel mask too, which a CPU batch hidden in one pass never builds.)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainers.registry import Registry

# ImageNet statistics in [0, 1] pixel units, the normalisation of torchvision's pretrained weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FillStats:
    """Dataset statistics expressed in the space of the batch that gets hidden (after normalisation)."""

    mean: Tensor  # (C,) the dataset's mean pixel
    std: Tensor  # (C,) the dataset's per-channel standard deviation
    black: Tensor  # (C,) a black pixel (0 in [0, 1] pixel units)
    white: Tensor  # (C,) a white pixel (1 in [0, 1] pixel units)

    @classmethod
    def from_normalization(
        cls,
        dataset_mean: Sequence[float],
        dataset_std: Sequence[float],
        norm_mean: Sequence[float],
        norm_std: Sequence[float],
    ) -> FillStats:
        """Statistics for a batch normalised as (x - norm_mean) / norm_std; all inputs in [0, 1] units."""
        d_mean, d_std, n_mean, n_std = (torch.tensor(v, dtype=torch.float32) for v in
                                        (dataset_mean, dataset_std, norm_mean, norm_std))
        return cls(
            mean=(d_mean - n_mean) / n_std,
            std=d_std / n_std,
            black=-n_mean / n_std,
            white=(1 - n_mean) / n_std,
        )

    @classmethod
    def standard(cls, channels: int) -> FillStats:
        """A batch normalised with the dataset's own mean and std: mean 0, std 1."""
        return cls.from_normalization([0.5] * channels, [0.5] * channels, [0.5] * channels, [0.5] * channels)

    def channel(self, name: str, like: Tensor) -> Tensor:
        """One statistic as (1, C, 1, 1) on the batch's device and dtype."""
        return getattr(self, name).to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1)


FillFn = Callable[[Tensor, FillStats, torch.Generator], Tensor]
FILL_STRATEGIES: Registry[FillFn] = Registry("fill strategy")

# The blurred copy is the image seen at this resolution, upsampled back (bilinear).
BLUR_RESOLUTION = 8


@FILL_STRATEGIES.register("dataset_mean")
def fill_dataset_mean(images: Tensor, stats: FillStats, generator: torch.Generator) -> Tensor:
    """The paper's: a first-layer filter then sees, in expectation, the same response as at test time."""
    return stats.channel("mean", images)


@FILL_STRATEGIES.register("zero")
def fill_zero(images: Tensor, stats: FillStats, generator: torch.Generator) -> Tensor:
    """Black in pixel space: the naive hiding, whose statistics differ from every real image."""
    return stats.channel("black", images)


@FILL_STRATEGIES.register("image_mean")
def fill_image_mean(images: Tensor, stats: FillStats, generator: torch.Generator) -> Tensor:
    """Each image's own mean colour: matches that image's statistics instead of the dataset's."""
    return images.mean(dim=(2, 3), keepdim=True)


@FILL_STRATEGIES.register("gaussian_noise")
def fill_gaussian_noise(images: Tensor, stats: FillStats, generator: torch.Generator) -> Tensor:
    """Noise with the dataset's mean and std: the energy of a real patch without its content."""
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return stats.channel("mean", images) + stats.channel("std", images) * noise


@FILL_STRATEGIES.register("uniform_noise")
def fill_uniform_noise(images: Tensor, stats: FillStats, generator: torch.Generator) -> Tensor:
    """Uniform over the valid pixel range: maximal-entropy noise, no dataset statistics at all."""
    noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    black = stats.channel("black", images)
    return black + (stats.channel("white", images) - black) * noise


@FILL_STRATEGIES.register("blur")
def fill_blur(images: Tensor, stats: FillStats, generator: torch.Generator) -> Tensor:
    """A strongly blurred copy: keeps colour and layout, removes the discriminative detail."""
    small = F.adaptive_avg_pool2d(images, BLUR_RESOLUTION)
    return F.interpolate(small, size=images.shape[2:], mode="bilinear", align_corners=False)


@FILL_STRATEGIES.register("shuffle")
def fill_shuffle(images: Tensor, stats: FillStats, generator: torch.Generator) -> Tensor:
    """The same region of another image of the batch: natural content that is not this object."""
    batch = images.shape[0]
    if batch < 2:
        return stats.channel("mean", images)  # no other image to take the region from
    shift = int(torch.randint(1, batch, (1,), generator=generator, device=generator.device))
    return images.roll(shift, dims=0)  # a shift in [1, B) never pairs an image with itself
