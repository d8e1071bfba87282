"""Training throughput with and without HaS: what hiding costs in a real step.

    python benchmarks/bench_train_step.py                      # tiny_cnn, 64x64, CPU
    python benchmarks/bench_train_step.py --backbone resnet50_cam --size 224 --batch 64 \
        --device cuda --amp bf16 --channels-last                # the GPU figure
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from _timing import interleaved_medians
from trainers.backbones import build_backbone
from trainers.fills import FillStats
from trainers.hide import PAPER_MIXTURE, HideAndSeek


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny_cnn")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["off", "bf16"], default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (timed after its warm-up)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed sample")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build_backbone(args.backbone, args.classes).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if args.compile else model
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)  # NCHW, as normalised by the engine
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    # The paper's mixture, its sizes scaled from 224 crops to this input.
    mixture = {round(s * args.size / 224): 1.0 for s in PAPER_MIXTURE}
    hider = HideAndSeek(mixture, 0.5, "dataset_mean", FillStats.standard(3), torch.Generator(device).manual_seed(0))
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp == "bf16" else contextlib.nullcontext

    def steps(hide: bool):
        for _ in range(args.steps):
            # As the engine does it: hide the NCHW batch, then change the layout (both paths).
            batch = (hider(images) if hide else images).contiguous(memory_format=memory_format)
            with autocast():
                loss = F.cross_entropy(forward(batch), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    times = interleaved_medians({"off": lambda: steps(False), "on": lambda: steps(True)}, args.repeats, sync)
    # The hiding alone (draw, mask, fill), timed in the same run: its share of a step is the cost
    # with no noise from the rest of the step.
    hiding = interleaved_medians({"hide": lambda: [hider(images) for _ in range(args.steps)]}, args.repeats, sync)
    per_second = {k: args.batch * args.steps / v for k, v in times.items()}
    print(f"{args.backbone} {args.size}x{args.size} batch {args.batch} on {device} amp {args.amp} "
          f"channels_last {args.channels_last} compile {args.compile} threads {torch.get_num_threads()} mixture {sorted(mixture)}")
    print("| HaS | images/s | step (ms) |")
    print("|---|---|---|")
    for key in ("off", "on"):
        print(f"| {key} | {per_second[key]:.0f} | {times[key] / args.steps * 1e3:.1f} |")
    print(f"hiding itself: {hiding['hide'] / args.steps * 1e3:.2f} ms per step = "
          f"{100 * hiding['hide'] / times['off']:.1f}% of a step without HaS")
    print(f"steps with HaS vs without (medians of {args.repeats} interleaved samples): "
          f"{100 * (times['on'] / times['off'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
