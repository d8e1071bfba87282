"""Hiding on a CPU in one pass: each row of each channel plane is read once and written once, its
hidden pixels taken from the fill, straight from the patch sizes and the grid (no (B, H, W) mask).

A masked copy needs what `clone()` needs; torch's masked kernels (`torch.where`, `masked_fill_`) run
at a third of memcpy's speed on a CPU, and need a pixel mask first. Here a column mask per image and
row of cells (the same for its `size` rows and every channel) drives a bitwise select per pixel: no
branch (patches of 4 px would mispredict every few pixels), exact bits (NaN and -0.0 included).

Compiled with numba (cached on disk after the first call), images shared over torch's thread count
by numba's parallel layer. Plain Python threads were 1.4x slower right after a torch op (torch's
OpenMP threads still spin on the other cores). That layer (GNU OpenMP here) aborts a forked child
that launches it, so a forked child takes the torch path, as do other dtypes, layouts and devices
(trainers/hide.py).
"""
from __future__ import annotations

import os

import numba
import numpy as np
import torch
from torch import Tensor

_PARENT = os.getpid()


@numba.njit(cache=True, nogil=True)
def _column_masks(sizes, grid, height, width, masks, b):
    """masks[b, i, x] = all ones (-1) where pixel column x of cell row i of image b is hidden, else 0
    (the rows image b's size needs)."""
    size = sizes[b]
    if size == 0:
        return
    for i in range(min(grid.shape[1], (height + size - 1) // size)):
        row, out = grid[b, i], masks[b, i]
        out[:] = 0
        for j in range((width + size - 1) // size):
            if row[j]:
                for x in range(j * size, min(j * size + size, width)):
                    out[x] = -1


@numba.njit(cache=True, nogil=True, parallel=True)
def _hide(images, sizes, grid, masks, fill, out, copy_kept):
    """out[b, c] = images[b, c] with the hidden pixels taken from fill[b, c] (int32 bits; its rows: one
    per image row, or one for all of them)."""
    batch, channels, height, width = images.shape
    per_row = fill.shape[2] > 1
    for b in numba.prange(batch):
        _column_masks(sizes, grid, height, width, masks, b)
        size = sizes[b]
        for c in range(channels):
            for y in range(height):
                source, target = images[b, c, y], out[b, c, y]
                if size == 0:
                    if copy_kept:
                        target[:] = source
                    continue
                values, mask = fill[b, c, y if per_row else 0], masks[b, y // size]
                for x in range(width):  # a bitwise select, vectorised
                    target[x] = (source[x] & ~mask[x]) | (values[x] & mask[x])


def bits(tensor: Tensor) -> np.ndarray:
    """A float32 tensor's memory as int32 (the same bytes)."""
    return tensor.numpy().view(np.int32)


def supported(images: Tensor) -> bool:
    """float32 (B, C, H, W) on a CPU in the standard layout (channels_last keeps the torch path), in
    the process that imported this module (not a forked child)."""
    return images.device.type == "cpu" and images.dtype == torch.float32 and images.ndim == 4 \
        and images.is_contiguous() and os.getpid() == _PARENT


def hide_on_cpu(images: Tensor, sizes: Tensor, grid: Tensor, fill: Tensor, inplace: bool) -> Tensor:
    """`images` (B, C, H, W) float32 on the CPU with the patches of `grid` (B, GH, GW; cells of
    sizes[b] pixels, partial at the right/bottom edge) set to `fill`: one value per channel or per
    image and channel ((C,), (1, C, 1, 1), (B, C, 1, 1)), or a tensor that broadcasts to the batch."""
    batch, channels, height, width = images.shape
    out = images if inplace else torch.empty_like(images)
    sizes_np = np.ascontiguousarray(sizes.to(torch.int64).numpy())
    grid_np = np.ascontiguousarray(grid.numpy())
    masks = np.empty((batch, grid_np.shape[1], width), np.int32)
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    try:
        if fill.ndim <= 1:  # a scalar or one value per channel
            fill = fill.reshape(1, -1, 1, 1)
        rows = height if fill.shape[-2] > 1 else 1  # one row of values serves every row it can
        full = fill.expand(batch, channels, rows, width).contiguous()
        _hide(bits(images), sizes_np, grid_np, masks, bits(full), bits(out), not inplace)
    finally:
        numba.set_num_threads(previous)
    return out
