"""MaxBoxAccV2 speed: ours vs the tests' straight reimplementation of the wsolevaluation evaluator.

    python benchmarks/bench_max_box_acc.py [--count 500] [--size 224] [--interval 0.001] [--workers 2]

The CAMs are smooth maps like real ones (upsampled noise, blobs, rings, border blobs, plateaus);
both implementations get the same CAMs and must return identical numbers.
"""
from __future__ import annotations

import argparse
import time

import _timing  # noqa: F401 - puts tests/ on the path
from cam_samples import sample_cams
from trainers.boxes import cam_thresholds
from trainers.localize import BoxCurves, check_gt_boxes, max_box_acc, quantize_cams, summarize_curves
from wsol_reference import reference_max_box_acc

REALISTIC_KINDS = ("noise", "blobs", "ring", "border", "plateaus")


def timed(run):
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--interval", type=float, default=0.001)
    parser.add_argument("--workers", type=int, default=2, help="processes of the parallel mode")
    args = parser.parse_args()
    cams, boxes = sample_cams(args.count, args.size, args.size, seed=0, kinds=REALISTIC_KINDS)
    print(f"{args.count} CAMs {args.size}x{args.size}, interval {args.interval}, MaxBoxAccV2 (all contours)")
    ours, t_ours = timed(lambda: max_box_acc(cams, boxes, interval=args.interval))
    # The parallel mode keeps its worker processes: start them once (spawned, so they pay their own
    # imports), then time the evaluation itself.
    thresholds = cam_thresholds(args.interval)
    runner = BoxCurves(thresholds, workers=args.workers)
    warm = 4 * args.workers
    _, t_start = timed(lambda: runner(quantize_cams(cams[:warm]), check_gt_boxes(boxes[:warm], warm)))
    curves, t_parallel = timed(lambda: runner(quantize_cams(cams), check_gt_boxes(boxes, len(cams))))
    runner.close()
    parallel = summarize_curves(curves[0], thresholds, (0.3, 0.5, 0.7))
    reference, t_reference = timed(lambda: reference_max_box_acc(cams, boxes, interval=args.interval))
    same = {d: ours[d] for d in (0.3, 0.5, 0.7)} == reference and parallel == ours
    print(f"numbers: ours {[ours[d] for d in (0.3, 0.5, 0.7)]}, reference {list(reference.values())}, "
          f"identical: {same}")
    print("| implementation | seconds | ms / CAM | speed-up vs reference |")
    print("|---|---|---|---|")
    for name, seconds in (("reference (per threshold findContours)", t_reference),
                          ("ours, one process", t_ours),
                          (f"ours, {args.workers} processes (after a {t_start:.1f} s start)", t_parallel)):
        print(f"| {name} | {seconds:.2f} | {seconds / args.count * 1e3:.1f} | {t_reference / seconds:.1f}x |")
    if not same:
        raise SystemExit("the numbers differ")


if __name__ == "__main__":
    main()
