"""Hide-and-Seek: random patch hiding, with the randomness apart from a pure masking kernel.

`sample_hide_params` draws, per image, a patch size from a mixture and a grid of hidden patches;
`hide` turns those parameters into a pixel mask and fills the hidden pixels, vectorised over the
batch on the batch's own device (no Python loop over images or patches); a float32 batch on a CPU
in one pass without a pixel mask (trainers/hide_cpu.py: the same bits, at about a clone's cost).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainers import hide_cpu
from trainers.fills import FILL_STRATEGIES, FillStats

Mixture = dict[int, float]

# The paper's "mixed": per image and epoch, S is uniform over {0, 16, 32, 44, 56} (0 = not hidden).
PAPER_MIXTURE: Mixture = {0: 1.0, 16: 1.0, 32: 1.0, 44: 1.0, 56: 1.0}


@dataclass(frozen=True)
class HideParams:
    """Which patches of which size are hidden, for every image of one batch."""

    sizes: Tensor  # (B,) int64 patch side in pixels; 0 leaves the image whole
    grid: Tensor  # (B, GH, GW) bool, True = hidden; GH, GW fit the smallest size of the mixture


def parse_mixture(spec: object, name: str = "mixture") -> Mixture:
    """A mixture `{size: weight}` from a dict, an int, or a string ('none', '16', 'mixed:0,16,32')."""
    if isinstance(spec, Mapping):
        raw = dict(spec)
    elif isinstance(spec, bool):
        raise ValueError(f"{name}: {spec!r} is not a mixture; {_MIXTURE_FORMS}")
    elif isinstance(spec, int):
        raw = {spec: 1.0}
    elif isinstance(spec, str):
        raw = _parse_mixture_string(spec.strip(), name)
    else:
        raise ValueError(f"{name}: {spec!r} is not a mixture; {_MIXTURE_FORMS}")
    return validate_mixture(raw, name=name)


_MIXTURE_FORMS = (
    "allowed: a mapping {size: weight}, a size (int, 0 = no hiding), 'none', "
    "'mixed:0,16,32' (uniform over the sizes) or 'weighted:0=1,16=2'"
)


def _parse_mixture_string(text: str, name: str) -> dict[object, object]:
    try:
        if text == "none":
            return {0: 1.0}
        if text.startswith("mixed:"):
            return {int(s): 1.0 for s in text[len("mixed:"):].split(",")}
        if text.startswith("weighted:"):
            pairs = (item.split("=") for item in text[len("weighted:"):].split(","))
            return {int(size): float(weight) for size, weight in pairs}
        return {int(text): 1.0}
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a mixture; {_MIXTURE_FORMS}") from None


def format_mixture(mixture: Mapping[int, float]) -> str:
    """The readable, parseable name of a mixture: 'none', '16', 'mixed:0,16,32', 'weighted:...'."""
    mix = validate_mixture(mixture)
    sizes = sorted(mix)
    if len(set(mix.values())) == 1:
        if len(sizes) == 1:
            return "none" if sizes[0] == 0 else str(sizes[0])
        return "mixed:" + ",".join(map(str, sizes))
    total = sum(mix.values())
    return "weighted:" + ",".join(f"{s}={mix[s] / total:.6g}" for s in sizes)


def validate_mixture(
    mixture: Mapping[object, object], image_size: tuple[int, int] | None = None, name: str = "mixture"
) -> Mixture:
    """Check sizes (ints >= 0, at most the image side) and weights (>= 0, not all zero)."""
    if not isinstance(mixture, Mapping) or not mixture:
        raise ValueError(f"{name}: {mixture!r} is not a non-empty mapping {{size: weight}}")
    clean: Mixture = {}
    for size, weight in mixture.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(
                f"{name}: patch size {size!r} is not allowed; sizes are ints >= 0 (pixels, 0 = no hiding)"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{name}: weight {weight!r} of size {size} is not allowed; weights are finite numbers >= 0")
        if image_size is not None and size > min(image_size):
            raise ValueError(
                f"{name}: patch size {size} is larger than the image {image_size[0]}x{image_size[1]}; "
                f"allowed sizes: 0..{min(image_size)}"
            )
        clean[size] = float(weight)
    if sum(clean.values()) <= 0:
        raise ValueError(f"{name}: all weights are zero in {dict(mixture)!r}; at least one must be > 0")
    return clean


def validate_p_hide(p_hide: object, name: str = "p_hide") -> float:
    if isinstance(p_hide, bool) or not isinstance(p_hide, (int, float)) or not 0.0 <= p_hide <= 1.0:
        raise ValueError(f"{name}: {p_hide!r} is not allowed; a probability in [0, 1]")
    return float(p_hide)


def sample_hide_params(
    batch_shape: tuple[int, ...] | torch.Size,
    mixture: Mapping[int, float],
    p_hide: float,
    generator: torch.Generator,
) -> HideParams:
    """Draw a patch size per image from `mixture` and hide each patch with probability `p_hide`."""
    if len(batch_shape) != 4:
        raise ValueError(f"batch_shape: {tuple(batch_shape)} is not (B, C, H, W)")
    batch, _, height, width = (int(d) for d in batch_shape)
    mix = validate_mixture(mixture, (height, width))
    p_hide = validate_p_hide(p_hide)
    device = generator.device
    kept = {size: weight for size, weight in mix.items() if weight > 0}
    size_table = torch.tensor(list(kept), dtype=torch.long, device=device)
    weights = torch.tensor(list(kept.values()), dtype=torch.float, device=device)
    choice = torch.multinomial(weights, batch, replacement=True, generator=generator)
    sizes = size_table[choice]
    positive = [size for size in kept if size > 0]
    if not positive:
        return HideParams(sizes, torch.zeros((batch, 0, 0), dtype=torch.bool, device=device))
    smallest = min(positive)
    grid_shape = (batch, math.ceil(height / smallest), math.ceil(width / smallest))
    grid = torch.rand(grid_shape, generator=generator, device=device) < p_hide
    return HideParams(sizes, grid)


def hide_mask(params: HideParams, height: int, width: int) -> Tensor:
    """(B, H, W) bool pixel mask of the hidden patches; partial patches at the right/bottom edge."""
    sizes, grid = params.sizes, params.grid
    batch, grid_h, grid_w = grid.shape
    if grid_h == 0:
        return torch.zeros((batch, height, width), dtype=torch.bool, device=grid.device)
    if grid.device.type == "cpu":
        return _mask_by_size(sizes, grid, height, width)
    # On an accelerator: two gathers, no host sync (grouping by size would read the sizes back).
    step = sizes.clamp(min=1)[:, None]  # size 0 never hides; clamp only avoids dividing by zero
    rows = (torch.arange(height, device=grid.device) // step).clamp_(max=grid_h - 1)  # (B, H)
    cols = (torch.arange(width, device=grid.device) // step).clamp_(max=grid_w - 1)  # (B, W)
    mask = grid.gather(1, rows[:, :, None].expand(batch, height, grid_w))  # (B, H, GW)
    mask = mask.gather(2, cols[:, None, :].expand(batch, height, width))  # (B, H, W)
    return mask & (sizes > 0)[:, None, None]


def _mask_by_size(sizes: Tensor, grid: Tensor, height: int, width: int) -> Tensor:
    """The mask built per patch size: each grid cell repeated size x size times (a strided copy),
    2-3x faster on a CPU than gathering every pixel's cell."""
    mask = torch.zeros((len(sizes), height, width), dtype=torch.bool)
    for size in sizes.unique().tolist():
        if size == 0:
            continue
        chosen = (sizes == size).nonzero().squeeze(1)
        cells_h, cells_w = -(-height // size), -(-width // size)  # <= the grid's: it fits the smallest size
        cells = grid[chosen, :cells_h, :cells_w]
        pixels = cells[:, :, None, :, None].expand(-1, cells_h, size, cells_w, size)
        mask[chosen] = pixels.reshape(-1, cells_h * size, cells_w * size)[:, :height, :width]
    return mask


def apply_hide_mask(images: Tensor, mask: Tensor, fill: Tensor | float, inplace: bool = False) -> Tensor:
    """Pixels under `mask` (B, H, W) become `fill`; the rest stay; a new tensor (dtype kept), or
    `images` itself with inplace=True (no 4-byte-per-value allocation to fault in: the engine's way)."""
    if images.ndim != 4 or mask.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match images {tuple(images.shape)}; need (B, H, W)")
    fill = _checked_fill(images, fill)
    channels = images.shape[1]
    if fill.numel() in (1, channels) and fill.ndim <= 1 or fill.shape == (1, channels, 1, 1):
        # One value per channel (the mean, zero fills): one masked copy per channel plane reads the
        # batch once and writes it once, like a clone (a broadcast where over (B, C, H, W) is ~1.7x that).
        values = fill.reshape(-1).expand(channels)
        out = images if inplace else torch.empty_like(images)
        for channel in range(channels):
            torch.where(mask, values[channel], images[:, channel], out=out[:, channel])
        return out
    if fill.ndim == 1 and fill.numel() == channels:
        fill = fill.view(-1, 1, 1)  # per-channel values
    return torch.where(mask[:, None], fill, images, out=images) if inplace else torch.where(mask[:, None], fill, images)


def _checked_fill(images: Tensor, fill: Tensor | float) -> Tensor:
    """`fill` as a tensor of the batch's dtype and device that broadcasts to it (a scalar, (C,), ...)."""
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    channels = images.shape[1]
    shape = (channels, 1, 1) if fill.ndim == 1 and fill.numel() == channels else fill.shape
    try:
        torch.broadcast_shapes(shape, images.shape)
    except RuntimeError:
        raise ValueError(
            f"fill: shape {tuple(fill.shape)} does not broadcast to the batch {tuple(images.shape)}; "
            "allowed: a scalar, (C,), or a tensor broadcastable to (B, C, H, W)"
        ) from None
    return fill


def hide(images: Tensor, params: HideParams, fill: Tensor | float, inplace: bool = False) -> Tensor:
    """Hide the patches chosen by `params` in `images` (B, C, H, W), filling them with `fill`: a new
    tensor, or `images` itself with inplace=True. float32 on a CPU: one pass, no pixel mask (hide_cpu)."""
    if images.ndim != 4:
        raise ValueError(f"images: shape {tuple(images.shape)} is not (B, C, H, W)")
    if params.sizes.shape[0] != images.shape[0]:
        raise ValueError(f"params: drawn for {params.sizes.shape[0]} images, the batch has {images.shape[0]}")
    if hide_cpu.supported(images):
        return hide_cpu.hide_on_cpu(images, params.sizes, params.grid, _checked_fill(images, fill), inplace)
    return apply_hide_mask(images, hide_mask(params, *images.shape[2:]), fill, inplace)


class HideAndSeek(nn.Module):
    """HaS as a transform on a normalised batch; hides in training mode only, never in eval mode."""

    def __init__(
        self,
        mixture: Mapping[int, float] | str | int,
        p_hide: float = 0.5,
        fill: str = "dataset_mean",
        stats: FillStats | None = None,
        generator: torch.Generator | None = None,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        self.inplace = inplace  # hide in the given batch (the engine's fresh normalised one)
        self.mixture = parse_mixture(mixture)
        self.p_hide = validate_p_hide(p_hide)
        self.fill_name = fill
        self.fill_fn = FILL_STRATEGIES[fill]
        self.stats = stats if stats is not None else FillStats.standard(3)
        self.generator = generator if generator is not None else torch.Generator()
        self.active = self.p_hide > 0 and any(size > 0 and w > 0 for size, w in self.mixture.items())

    def forward(self, images: Tensor) -> Tensor:
        if not self.training or not self.active:
            return images
        if images.device.type != self.generator.device.type:
            raise ValueError(
                f"generator: on {self.generator.device}, the batch is on {images.device}; "
                "make the generator on the batch's device"
            )
        params = sample_hide_params(images.shape, self.mixture, self.p_hide, self.generator)
        return hide(images, params, self.fill_fn(images, self.stats, self.generator), inplace=self.inplace)

    def extra_repr(self) -> str:
        return f"mixture={format_mixture(self.mixture)}, p_hide={self.p_hide}, fill={self.fill_name}"
