"""Hiding speed: vectorised `hide` vs the published per-patch loop, and vs a plain clone of the batch.

    python benchmarks/bench_hide.py [--device cpu|cuda] [--batch 64] [--size 224] [--repeats 7]
"""
from __future__ import annotations

import argparse

import torch

from _timing import interleaved_medians
from has_reference import loop_hide
from trainers.fills import FillStats, FILL_STRATEGIES
from trainers.hide import PAPER_MIXTURE, HideAndSeek, format_mixture, hide, sample_hide_params

MIXTURES = [{4: 1.0}, {16: 1.0}, PAPER_MIXTURE]  # wsolevaluation's default size, a mid size, the paper's mix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--loop-repeats", type=int, default=3, help="the loop is slow: fewer repeats")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator, device=device)
    stats = FillStats.standard(3)
    fill = FILL_STRATEGIES["dataset_mean"]
    print(f"device {device}, batch {tuple(images.shape)} float32, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print("| patch sizes | ours (ms) | per-patch loop (ms) | loop / ours | clone (ms) | ours / clone | engine's HaS step / clone |")
    print("|---|---|---|---|---|---|---|")
    for mixture in MIXTURES:
        params = sample_hide_params(images.shape, mixture, 0.5, generator)
        sizes, grid = params.sizes.tolist(), params.grid

        def ours():  # the whole step: draw parameters, fill values, mask and apply
            drawn = sample_hide_params(images.shape, mixture, 0.5, generator)
            return hide(images, drawn, fill(images, stats, generator))

        # The engine's step: the HideAndSeek module on the normalised batch (draw, fill, apply; a CUDA batch: mask too).
        module = HideAndSeek(mixture, 0.5, "dataset_mean", stats, torch.Generator(device).manual_seed(1),
                             inplace=True).train()
        scratch = images.clone()  # the engine hides its own normalised batch in place
        fast = interleaved_medians({"ours": ours, "clone": images.clone, "engine": lambda: module(scratch)},
                                   args.repeats, sync)
        # The loop gets its parameters drawn beforehand: a conservative baseline.
        slow = interleaved_medians({"loop": lambda: loop_hide(images, sizes, grid, 0.0)}, args.loop_repeats, sync)
        print(f"| {format_mixture(mixture)} | {fast['ours'] * 1e3:.1f} | {slow['loop'] * 1e3:.0f} | "
              f"{slow['loop'] / fast['ours']:.0f}x | {fast['clone'] * 1e3:.1f} | {fast['ours'] / fast['clone']:.2f}x | "
              f"{fast['engine'] / fast['clone']:.2f}x |")


if __name__ == "__main__":
    main()
