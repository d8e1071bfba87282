"""The per-patch Python loop by which the published implementations hide (slow, obviously correct)."""
from __future__ import annotations

import torch


def loop_hide(images: torch.Tensor, sizes: list[int], grid: torch.Tensor, fill) -> torch.Tensor:
    """Hide patch (i, j) of image b when grid[b, i, j], looping over images and patches."""
    out = images.clone()
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    if fill.ndim == 1:
        fill = fill.view(-1, 1, 1)  # per-channel values
    fill = torch.broadcast_to(fill, images.shape)
    height, width = images.shape[2:]
    for b, size in enumerate(sizes):
        if size == 0:
            continue
        for top in range(0, height, size):
            for left in range(0, width, size):
                if grid[b, top // size, left // size]:
                    rows, cols = slice(top, top + size), slice(left, left + size)
                    out[b, :, rows, cols] = fill[b, :, rows, cols]
    return out
